"""The canary gate: one group's rollout as a state machine over fleet observations and time.

No I/O and no clock of its own: `observe(now, nodes)` takes what the fleet looks like and
returns a decision (promote, abort, wait for a human) or None. Tests drive it with simulated
nodes and a fake clock.

Phases:  canary --(evidence + bake)--> promoted            (auto_promote)
         canary --(evidence + bake)--> awaiting_promotion --(promote)--> promoted
         canary | awaiting_promotion --(any failure signal, abort)--> aborted

Every canary on the candidate is classified by `kind_of` (the one rule): one whose stream
opened before staging, or that reconnected reporting config it held (a running Envoy whose
stream was cut), proves the candidate as an *existing* Envoy; one that started holding
nothing after staging (a new or restarted Envoy) proves it as a *fresh* one. Until it has
ACKed every type, a canary is *pending*, and so is one that disconnected, until it comes
back: a restart is not a loss. The bake ends only with no canary pending.

Failure signals, each an abort naming the node: a canary NACKs the candidate; a canary does
not ACK within ack_timeout (counted per stream); a canary that disconnected does not
reconnect within ack_timeout, or disconnects more than MAX_CANARY_DISCONNECTS times (a crash
loop); the fresh probe fails; a traffic check fails `failure_limit` times (each evaluation an
input from the controller, see traffic.py); the deadline passes (while still in canary).

With a `traffic` policy, promotion also needs `min_passes` passing evaluations of every
check. Checks are evaluated from the start of the bake (evidence complete), every
`interval_seconds` (`traffic_due`), for as long as the rollout is active.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from controlplane.rollout.policy import RolloutPolicy
from controlplane.rollout.traffic import CheckResult, NoData, Outcome

# A canary whose streams drop more often than this in one rollout is crash-looping on it.
MAX_CANARY_DISCONNECTS = 3
EXISTING, FRESH = "existing", "fresh"


class Phase(enum.Enum):
    CANARY = "canary"
    AWAITING_PROMOTION = "awaiting_promotion"
    PROMOTED = "promoted"
    ABORTED = "aborted"

    @property
    def active(self) -> bool:
        return self in (Phase.CANARY, Phase.AWAITING_PROMOTION)


class ProbeState(enum.Enum):
    NOT_CONFIGURED = "not_configured"
    RUNNING = "running"
    PASSED = "passed"
    FAILED = "failed"
    CANCELLED = "cancelled"  # the rollout ended while it ran; its Envoy is torn down


@dataclass(frozen=True)
class NodeObservation:
    """One open stream of the group, as the gate needs to see it."""

    stream_id: Hashable  # one stream, fleet-wide
    node_id: str
    canary: bool
    connected_at: float
    started_empty: bool  # held nothing when it connected
    version: str | None  # the snapshot it is assigned
    synced: bool  # ACKed every type of that snapshot
    rejection: str | None = None  # Envoy's error text if it NACKed that snapshot
    probe: bool = False  # the gate's own fresh probe
    owed: tuple[str, ...] = ()  # types (CLUSTER, ...) not yet ACKed at `version`


def kind_of(node: NodeObservation, staged_at: float) -> str:
    """EXISTING or FRESH: how a canary's ACK of the candidate counts (see the docstring)."""
    if node.connected_at < staged_at or not node.started_empty:
        return EXISTING
    return FRESH


@dataclass(frozen=True)
class Pending:
    """A canary the gate waits for, and what it still owes."""

    node_id: str
    waiting_for: str  # "ack" (of `types`, or of every type if empty) or "reconnect"
    since: float  # when it was first sent the candidate on this stream, or disconnected
    types: tuple[str, ...] = ()

    def describe(self, candidate: str, now: float) -> str:
        if self.waiting_for == "reconnect":
            return f"{self.node_id}: reconnect (disconnected {now - self.since:.0f}s ago)"
        owed = ",".join(self.types) or "every type"
        return f"{self.node_id}: ACK of {owed} for {candidate}"


@dataclass
class _Canary:
    """One canary node across its streams during a rollout (never persisted)."""

    streams: dict[int, float] = field(default_factory=dict)  # open stream -> first seen
    disconnects: int = 0
    disconnected_at: float | None = None


@dataclass
class TrafficCheckState:
    """What the gate knows of one traffic check: its last evaluation and its tallies."""

    name: str
    state: str = "pending"  # pending, or the last Outcome's value
    value: float | None = None
    query: str = ""  # as last sent
    detail: str = ""
    passes: int = 0
    failures: int = 0
    evaluated_at: float | None = None


class Decision(enum.Enum):
    PROMOTE = "promote"
    ABORT = "abort"
    AWAIT_PROMOTION = "await_promotion"


@dataclass
class Rollout:
    group: str
    candidate: str
    previous_stable: str | None
    staged_at: float
    actor: str
    message: str
    phase: Phase = Phase.CANARY
    reason: str = ""
    ended_at: float | None = None
    existing_acked: list[str] = field(default_factory=list)
    fresh_acked: list[str] = field(default_factory=list)
    probe_state: ProbeState = ProbeState.NOT_CONFIGURED
    probe_reason: str = ""
    evidence_complete_at: float | None = None  # the bake started then
    traffic: list[TrafficCheckState] = field(default_factory=list)
    traffic_evaluated_at: float | None = None  # when the last round of checks was started
    # Never persisted: node id -> its streams; the canaries waited for, as last observed.
    _canaries: dict[str, _Canary] = field(default_factory=dict)
    pending: list[Pending] = field(default_factory=list)

    def observe(
        self, policy: RolloutPolicy, now: float, nodes: Iterable[NodeObservation]
    ) -> Decision | None:
        if not self.phase.active:
            return None
        nodes = list(nodes)
        failure = self._failure(policy, now, nodes)
        if failure is not None:
            return self._abort(now, failure)
        if self.phase is Phase.AWAITING_PROMOTION:
            return None
        self._collect_evidence(nodes)
        if not self._evidence_complete(policy):
            return None
        if self.evidence_complete_at is None:
            self.evidence_complete_at = now
        if now - self.evidence_complete_at < policy.bake_seconds or self.pending:
            return None
        if not self._traffic_passed(policy):
            return None
        if policy.auto_promote:
            return self.promote(now, "canaries passed")
        self.phase = Phase.AWAITING_PROMOTION
        self.reason = "canaries passed; waiting for `xdsctl rollout promote`"
        return Decision.AWAIT_PROMOTION

    def promote(self, now: float, reason: str) -> Decision:
        self.phase, self.reason, self.ended_at = Phase.PROMOTED, reason, now
        self.pending = []
        self._cancel_probe()
        return Decision.PROMOTE

    def bake_ends_at(self, policy: RolloutPolicy) -> float | None:
        if self.evidence_complete_at is None:
            return None
        return self.evidence_complete_at + policy.bake_seconds

    def bake_left(self, policy: RolloutPolicy, now: float) -> float | None:
        """Seconds of bake still to run; None before the evidence is complete or once over."""
        ends = self.bake_ends_at(policy)
        if ends is None or self.phase is not Phase.CANARY:
            return None
        return max(0.0, ends - now)

    def abort(self, now: float, reason: str) -> Decision:
        return self._abort(now, reason)

    def probe_finished(self, passed: bool, reason: str, node_id: str) -> None:
        """The probe's Envoy started from nothing on the candidate: fresh evidence if it passed
        (its stream is gone by the time the next observation could count it)."""
        self.probe_state = ProbeState.PASSED if passed else ProbeState.FAILED
        self.probe_reason = reason
        if passed and node_id not in self.fresh_acked:
            self.fresh_acked.append(node_id)

    def traffic_due(self, policy: RolloutPolicy, now: float) -> bool:
        """Whether the controller should evaluate the traffic checks now (and it records
        that it starts a round): once the bake began, every interval_seconds."""
        if policy.traffic is None or not self.phase.active or self.evidence_complete_at is None:
            return False
        last = self.traffic_evaluated_at or self.evidence_complete_at
        if now - last < policy.traffic.interval_seconds:
            return False
        self.traffic_evaluated_at = now
        return True

    def traffic_results(
        self, policy: RolloutPolicy, now: float, results: list[CheckResult]
    ) -> None:
        """One round of traffic checks; the next observe() judges the tallies."""
        if policy.traffic is None or not self.phase.active:
            return
        no_data_fails = policy.traffic.on_no_data is NoData.ABORT
        for result in results:
            state = self._traffic_state(result.name)
            state.state, state.value, state.query = result.outcome.value, result.value, result.query
            state.detail, state.evaluated_at = result.detail, now
            if result.outcome is Outcome.PASS:
                state.passes += 1
            elif result.outcome is Outcome.FAIL or no_data_fails:
                state.failures += 1

    def _traffic_state(self, name: str) -> TrafficCheckState:
        for state in self.traffic:
            if state.name == name:
                return state
        self.traffic.append(TrafficCheckState(name))
        return self.traffic[-1]

    def _traffic_passed(self, policy: RolloutPolicy) -> bool:
        if policy.traffic is None:
            return True
        return all(
            self._traffic_state(c.name).passes >= policy.traffic.min_passes
            for c in policy.traffic.checks
        )

    def _traffic_failure(self, policy: RolloutPolicy) -> str | None:
        if policy.traffic is None:
            return None
        for check in policy.traffic.checks:
            state = self._traffic_state(check.name)
            if state.failures < policy.traffic.failure_limit:
                continue
            times = f" ({state.failures} failing evaluations)" if state.failures > 1 else ""
            if state.state == Outcome.FAIL.value:
                return (
                    f"traffic check {check.name} failed{times}: {state.query} = "
                    f"{state.value:g}, threshold {check.threshold()}"
                )
            return (
                f"traffic check {check.name} failed{times}: {state.query}: {state.detail} "
                "(on_no_data: abort)"
            )
        return None

    def progress(self, policy: RolloutPolicy) -> str:
        probe = "" if policy.fresh_probe is None else f", probe {self.probe_state.value}"
        traffic = ""
        if policy.traffic is not None:
            traffic = "".join(
                f", traffic {c.name} {self._traffic_state(c.name).passes}/"
                f"{policy.traffic.min_passes}"
                for c in policy.traffic.checks
            )
        return (
            f"existing {len(self.existing_acked)}/{policy.min_existing}, "
            f"fresh {len(self.fresh_acked)}/{policy.min_fresh}{probe}{traffic}"
        )

    def _abort(self, now: float, reason: str) -> Decision:
        self.phase, self.reason, self.ended_at = Phase.ABORTED, reason, now
        self.pending = []
        self._cancel_probe()
        return Decision.ABORT

    def _cancel_probe(self) -> None:
        """A rollout that ends stops its probe: it never shows `running` after the end."""
        if self.probe_state is ProbeState.RUNNING:
            self.probe_state = ProbeState.CANCELLED
            self.probe_reason = f"cancelled: the rollout {self.phase.value}"

    def _failure(
        self, policy: RolloutPolicy, now: float, nodes: list[NodeObservation]
    ) -> str | None:
        on_candidate = [n for n in nodes if n.canary and n.version == self.candidate]
        for node in on_candidate:
            if node.rejection is not None:
                return f"canary {node.node_id} NACKed the candidate: {node.rejection}"
        pending: list[Pending] = []
        failure = self._track_canaries(policy, now, on_candidate, pending)
        if failure is not None:
            return failure
        for node in on_candidate:
            if node.probe or node.synced:
                continue
            first_seen = self._canaries[node.node_id].streams[node.stream_id]
            if now - first_seen > policy.ack_timeout_seconds:
                return (
                    f"canary {node.node_id} did not ACK the candidate within "
                    f"{policy.ack_timeout_seconds:g}s"
                )
            pending.append(Pending(node.node_id, "ack", first_seen, node.owed))
        self.pending = sorted(pending, key=lambda p: p.node_id)
        if self.probe_state is ProbeState.FAILED:
            first_line = self.probe_reason.split("\n", 1)[0]  # the rest is Envoy's log
            return f"fresh probe failed: {first_line}"
        if (traffic := self._traffic_failure(policy)) is not None:
            return traffic
        if self.phase is Phase.CANARY and now - self.staged_at > policy.deadline_seconds:
            waiting = "".join(
                f"; waiting for {p.describe(self.candidate, now)}" for p in self.pending
            )
            return (
                f"deadline of {policy.deadline_seconds:g}s passed "
                f"({self.progress(policy)}{waiting})"
            )
        return None

    def _track_canaries(
        self,
        policy: RolloutPolicy,
        now: float,
        on_candidate: list[NodeObservation],
        pending: list[Pending],
    ) -> str | None:
        """Follow each canary across its streams: a lost stream is a disconnect, a node with
        no open stream is pending until it reconnects (or the limits abort the rollout)."""
        open_streams: dict[str, set[int]] = {}
        for node in on_candidate:
            if node.probe:  # the probe's Envoy is meant to go away
                continue
            open_streams.setdefault(node.node_id, set()).add(node.stream_id)
            self._canaries.setdefault(node.node_id, _Canary()).streams.setdefault(
                node.stream_id, now
            )
        for node_id, canary in sorted(self._canaries.items()):
            still_open = open_streams.get(node_id, set())
            lost = [s for s in canary.streams if s not in still_open]
            for stream_id in lost:
                del canary.streams[stream_id]
            canary.disconnects += len(lost)
            if canary.disconnects > MAX_CANARY_DISCONNECTS:
                return (
                    f"canary {node_id} disconnected {canary.disconnects} times during the "
                    f"rollout (more than {MAX_CANARY_DISCONNECTS}: a crash loop?)"
                )
            if still_open:
                canary.disconnected_at = None
                continue
            if canary.disconnected_at is None:
                canary.disconnected_at = now
            if now - canary.disconnected_at > policy.ack_timeout_seconds:
                return (
                    f"canary {node_id} disconnected during the rollout and did not reconnect "
                    f"within {policy.ack_timeout_seconds:g}s"
                )
            pending.append(Pending(node_id, "reconnect", canary.disconnected_at))
        return None

    def _collect_evidence(self, nodes: list[NodeObservation]) -> None:
        for node in nodes:
            if not (node.canary and node.version == self.candidate and node.synced):
                continue
            acked = (
                self.existing_acked
                if kind_of(node, self.staged_at) == EXISTING
                else self.fresh_acked
            )
            if node.node_id not in acked:
                acked.append(node.node_id)

    def _evidence_complete(self, policy: RolloutPolicy) -> bool:
        probe_ok = self.probe_state in (ProbeState.NOT_CONFIGURED, ProbeState.PASSED)
        return (
            len(self.existing_acked) >= policy.min_existing
            and len(self.fresh_acked) >= policy.min_fresh
            and probe_ok
        )

    def to_record(self) -> dict[str, Any]:
        record = asdict(self)
        record.pop("_canaries")
        record.pop("pending")
        record["phase"] = self.phase.value
        record["probe_state"] = self.probe_state.value
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Rollout:
        fields = dict(record)
        fields["phase"] = Phase(fields["phase"])
        fields["probe_state"] = ProbeState(fields["probe_state"])
        fields["traffic"] = [TrafficCheckState(**t) for t in fields.get("traffic", [])]
        return cls(**fields)
