"""The canary gate: one group's rollout as a state machine over fleet observations and time.

No I/O and no clock of its own: `observe(now, nodes)` takes what the fleet looks like and
returns a decision (promote, abort, wait for a human) or None. Tests drive it with simulated
nodes and a fake clock.

Phases:  canary --(evidence + bake)--> promoted            (auto_promote)
         canary --(evidence + bake)--> awaiting_promotion --(promote)--> promoted
         canary | awaiting_promotion --(any failure signal, abort)--> aborted

Failure signals, each an abort naming the node: a canary NACKs the candidate; a canary that
was on the candidate disconnects; a canary does not ACK within ack_timeout; the fresh probe
fails; a traffic check fails `failure_limit` times (each evaluation an input from the
controller, see traffic.py); the deadline passes (while still in canary).

With a `traffic` policy, promotion also needs `min_passes` passing evaluations of every
check. Checks are evaluated from the start of the bake (evidence complete), every
`interval_seconds` (`traffic_due`), for as long as the rollout is active.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from controlplane.rollout.policy import RolloutPolicy
from controlplane.rollout.traffic import CheckResult, NoData, Outcome


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


@dataclass(frozen=True)
class NodeObservation:
    """One open stream of the group, as the gate needs to see it."""

    stream_id: int
    node_id: str
    canary: bool
    connected_at: float
    started_empty: bool  # held nothing when it connected
    version: str | None  # the snapshot it is assigned
    synced: bool  # ACKed every type of that snapshot
    rejection: str | None = None  # Envoy's error text if it NACKed that snapshot
    probe: bool = False  # the gate's own fresh probe


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
    evidence_complete_at: float | None = None
    traffic: list[TrafficCheckState] = field(default_factory=list)
    traffic_evaluated_at: float | None = None  # when the last round of checks was started
    # stream id -> (node id, when it was first seen on the candidate); never persisted
    _canaries: dict[int, tuple[str, float]] = field(default_factory=dict)

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
        if now - self.evidence_complete_at < policy.bake_seconds:
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
        return Decision.PROMOTE

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
        return Decision.ABORT

    def _failure(
        self, policy: RolloutPolicy, now: float, nodes: list[NodeObservation]
    ) -> str | None:
        on_candidate = [n for n in nodes if n.canary and n.version == self.candidate]
        for node in on_candidate:
            if node.rejection is not None:
                return f"canary {node.node_id} NACKed the candidate: {node.rejection}"
        open_streams = {n.stream_id for n in nodes}
        for stream_id, (node_id, _) in self._canaries.items():
            if stream_id not in open_streams:
                return f"canary {node_id} disconnected during the rollout"
        for node in on_candidate:
            if not node.probe:
                self._canaries.setdefault(node.stream_id, (node.node_id, now))
            first_seen = self._canaries.get(node.stream_id, (node.node_id, now))[1]
            if not node.synced and now - first_seen > policy.ack_timeout_seconds:
                return (
                    f"canary {node.node_id} did not ACK the candidate within "
                    f"{policy.ack_timeout_seconds:g}s"
                )
        if self.probe_state is ProbeState.FAILED:
            return f"fresh probe failed: {self.probe_reason}"
        if (traffic := self._traffic_failure(policy)) is not None:
            return traffic
        if self.phase is Phase.CANARY and now - self.staged_at > policy.deadline_seconds:
            return f"deadline of {policy.deadline_seconds:g}s passed ({self.progress(policy)})"
        return None

    def _collect_evidence(self, nodes: list[NodeObservation]) -> None:
        for node in nodes:
            if not (node.canary and node.version == self.candidate and node.synced):
                continue
            existing = node.connected_at < self.staged_at
            fresh = not existing and node.started_empty
            if existing and node.node_id not in self.existing_acked:
                self.existing_acked.append(node.node_id)
            elif fresh and node.node_id not in self.fresh_acked:
                self.fresh_acked.append(node.node_id)

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
