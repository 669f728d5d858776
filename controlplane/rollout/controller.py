"""The rollout controller: the one owner of every group's pointers (stable, candidate,
last_good) while the server runs.

It performs what the gate decides: each step is committed to the store first, then applied
to the assignments (which pushes it to the fleet). It also runs the fresh probe and the
traffic checks (off the event loop; the gate judges their results), records
last_good once a promoted version is ACKed fleet-wide, performs rollbacks, and runs the
guard (guard.py) after a promotion, rolling the group back when it trips.

Invariants:
- A group without a policy, or with a guard-only policy, publishes straight to stable.
- last_good does not move while a guard watches the group. A guard lives in memory: at
  start-up, a stable that is not last_good is guarded again, for a whole window.
- At most one rollout per group; publishing while one is active is refused.
- A rollout found active at start-up (the server restarted mid-rollout) is aborted: part of
  its evidence lived in memory, so it can never be promoted by accident. A replica that
  takes over the lead instead resumes it from the record the old leader saved each time
  its evidence grew (`load(resume=True)`), re-observing every canary from there.
- With replicas, only the leader runs this loop; followers `follow` what it stores.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from controlplane.observability.metrics import Metrics
from controlplane.rollout.gate import (
    Decision,
    NodeObservation,
    Phase,
    ProbeState,
    Rollout,
    TrafficCheckState,
)
from controlplane.rollout.guard import Guard, GuardedNode, GuardPhase
from controlplane.rollout.policy import PROBE_METADATA_KEY, RolloutPolicy
from controlplane.rollout.probe import ProbeResult, XdsEndpoint, run_probe
from controlplane.rollout.stored_state import StoredState, read_stored
from controlplane.rollout.traffic import PrometheusClient, evaluate
from controlplane.snapshot import Snapshot
from controlplane.store import CANDIDATE, LAST_GOOD, STABLE, SnapshotStore, StoreError
from controlplane.xds.assignments import Assignments
from controlplane.xds.evidence import FleetEvidence, NodeEvidence
from controlplane.xds.fleet import Fleet

log = structlog.get_logger("rollout")

TICK_SECONDS = 0.2
CONVERGENCE_LOOK_SECONDS = 0.02  # a waiter for convergence looks at most 50 times a second
GATE_ACTOR = "xdscp-gate"
GUARD_ACTOR = "xdscp-guard"


class RolloutError(Exception):
    """A request that cannot be carried out now; nothing was changed."""


class NotFoundError(RolloutError):
    pass


@dataclass(frozen=True)
class PublishOutcome:
    version: str
    parent_version: str | None
    outcome: str  # "promoted" (no policy), "staged" (canary rollout), "unchanged"


@dataclass(frozen=True)
class RollbackOutcome:
    version: str
    previous_version: str | None
    aborted_rollout: bool
    started_at: float


@dataclass(frozen=True)
class Convergence:
    version: str
    total: int
    acked: int
    seconds: float
    lagging: list[tuple[str, str]]  # (node id, why: "STALE", "WARMING" or the NACK text)
    last_ack_at: float | None = None  # when the last node to get there ACKed


class RolloutController:
    def __init__(
        self,
        store: SnapshotStore,
        assignments: Assignments,
        fleet: Fleet,
        policies: Mapping[str, RolloutPolicy],
        *,
        probe_xds: XdsEndpoint | None = None,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
        evidence: FleetEvidence | None = None,
    ) -> None:
        """`evidence`: the fleet the gate, the guard and last_good judge; by default this
        server's own streams (replicas pass one that includes the others')."""
        self._store = store
        self._assignments = assignments
        self._fleet = fleet  # this server's own streams: the probe's is one of them
        self._evidence = evidence or FleetEvidence(fleet, assignments)
        self._policies = dict(policies)
        self.probe_xds = probe_xds  # set by the app once the xDS port is bound
        self._clock = clock
        self._rollouts: dict[str, Rollout] = {}
        self._probes: dict[str, asyncio.Task[None]] = {}
        self._traffic: dict[str, asyncio.Task[None]] = {}
        self._lock = asyncio.Lock()
        self._ticker: asyncio.Task[None] | None = None
        self._metrics = metrics or Metrics()
        # group -> (version, command time, actor): rollbacks whose fleet-wide ACK is not seen
        self._rollbacks: dict[str, tuple[str, float, str]] = {}
        self._guards: dict[str, Guard] = {}  # watching only
        self._last_guards: dict[str, Guard] = {}  # each group's newest guard, whatever its phase
        self._seen_generation = -1
        self._last_good_failing = False  # warned once until it works again
        self._saved: dict[str, dict[str, Any]] = {}  # each group's rollout record, as stored

    # -- lifecycle ------------------------------------------------------------------------

    async def load(self, *, resume: bool = False) -> None:
        """Take over what the store holds: serve each group's stable version. A rollout found
        active is aborted when the server restarted (its evidence lived in memory), and
        continued from the evidence its leader persisted when `resume` (this replica takes
        over the lead)."""
        state = await asyncio.to_thread(read_stored, self._store, {})
        for group, named in state.pointers.items():
            if (snapshot := state.snapshot(group, STABLE)) is not None:
                self._assignments.set_stable(group, snapshot)
                if named.get(LAST_GOOD) not in (None, named[STABLE]):
                    self._start_guard(group, named[STABLE])  # its window restarts
        for group, record in state.rollouts.items():
            rollout = Rollout.from_record(record)
            if rollout.phase.active and not (resume and self._resume(group, rollout, state)):
                rollout.abort(self._clock(), "control plane restarted mid-rollout")
                await self._record(rollout, "abort", GATE_ACTOR, {CANDIDATE: None})
                log.warning(
                    "rollout aborted", group=group, version=rollout.candidate, reason=rollout.reason
                )
            self._rollouts[group] = rollout
            self._saved[group] = rollout.to_record()

    def _resume(self, group: str, rollout: Rollout, state: StoredState) -> bool:
        """Continue a rollout another leader ran, from its persisted record: the canaries'
        ACKs it counted, its bake, its traffic tallies. A probe it was running runs again.
        False if it cannot continue (its policy or candidate is gone): it is aborted."""
        policy = self._policies.get(group)
        candidate = state.snapshot(group, CANDIDATE)
        if policy is None or policy.canary is None or candidate is None:
            return False
        if candidate.version != rollout.candidate:
            return False
        if self._assignments.candidate(group) is not candidate:
            self._assignments.start_rollout(group, candidate, policy.canary)
        if policy.fresh_probe is not None and rollout.probe_state is ProbeState.RUNNING:
            self._probes[group] = asyncio.create_task(self._run_probe(group, candidate, policy))
        if policy.traffic is not None:
            self._traffic[group] = asyncio.create_task(self._run_traffic(group, rollout, policy))
        log.info(
            "rollout resumed",
            group=group,
            version=rollout.candidate,
            progress=rollout.progress(policy),
        )
        return True

    def follow(self, state: StoredState) -> dict[str, str]:
        """A follower serves what the leader stored: each group's stable, and its candidate
        to the canaries while a rollout is active. Idempotent: called on every change the
        leader makes, and periodically. Returns the groups whose stable it moved, to what."""
        moved = {}
        for group in state.pointers:
            stable = state.snapshot(group, STABLE)
            served = self._assignments.stable(group)
            if stable is not None and (served is None or served.version != stable.version):
                self._assignments.set_stable(group, stable)
                moved[group] = stable.version
        self._rollouts = {}
        for group, record in state.rollouts.items():
            rollout = self._rollouts[group] = Rollout.from_record(record)
            policy = self._policies.get(group)
            candidate = state.snapshot(group, CANDIDATE)
            if (
                rollout.phase.active
                and policy is not None
                and policy.canary is not None
                and candidate is not None
                and candidate.version == rollout.candidate
            ):
                served = self._assignments.candidate(group)
                if served is None or served.version != candidate.version:
                    self._assignments.start_rollout(group, candidate, policy.canary)
            else:
                self._assignments.end_rollout(group)
        return moved

    def snapshots_served(self) -> dict[str, Snapshot]:
        """The stable and candidate snapshots served now, by version (not read again)."""
        served = {}
        for group in self._assignments.groups():
            for snapshot in (self._assignments.stable(group), self._assignments.candidate(group)):
                if snapshot is not None:
                    served[snapshot.version] = snapshot
        return served

    def start(self) -> None:
        self._ticker = asyncio.create_task(self._tick_forever())

    async def step_down(self) -> None:
        """This replica lost the lead: stop the gate, the probes, the checks and the guards.
        What they knew lives on in the store, where the next leader resumes it."""
        await self.stop()
        self._ticker = None
        self._probes.clear()
        self._traffic.clear()
        self._guards.clear()
        self._rollbacks.clear()
        self._seen_generation = -1

    async def stop(self) -> None:
        tasks = [
            t
            for t in (self._ticker, *self._probes.values(), *self._traffic.values())
            if t is not None
        ]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- operator commands ----------------------------------------------------------------

    async def publish(
        self, group: str, snapshot: Snapshot, *, message: str, actor: str
    ) -> PublishOutcome:
        async with self._lock:
            stable = await asyncio.to_thread(self._store.pointer, group, STABLE)
            policy = self._policies.get(group)
            if policy is None or policy.canary is None or stable is None:
                # With no stable yet there is nothing to canary against and nothing to go
                # back to (as Flagger initialises a primary without analysis).
                result = await asyncio.to_thread(
                    self._store.publish, group, snapshot, message=message, actor=actor
                )
                self._assignments.set_stable(group, snapshot)
                if result.changed:
                    self._start_guard(group, snapshot.version)
                outcome = "promoted" if result.changed else "unchanged"
                return PublishOutcome(snapshot.version, result.entry.parent_version, outcome)
            if stable == snapshot.version:
                return PublishOutcome(snapshot.version, stable, "unchanged")
            active = self._active(group)
            if active is not None and active.candidate == snapshot.version:
                # The same publish again (e.g. after a cut-off answer): nothing changes.
                return PublishOutcome(snapshot.version, stable, "staged")
            if active is not None:
                raise RolloutError(
                    f"group {group} is already rolling out {active.candidate} ({active.phase.value}); "
                    "promote or abort it first"
                )
            assert policy.canary is not None
            rollout = Rollout(
                group=group,
                candidate=snapshot.version,
                previous_stable=stable,
                staged_at=self._clock(),
                actor=actor,
                message=message,
                probe_state=ProbeState.NOT_CONFIGURED
                if policy.fresh_probe is None
                else ProbeState.RUNNING,
                traffic=[]
                if policy.traffic is None
                else [TrafficCheckState(c.name) for c in policy.traffic.checks],
            )
            await asyncio.to_thread(
                self._store.transition,
                group,
                action="stage",
                version=snapshot.version,
                actor=actor,
                message=message,
                snapshot=snapshot,
                pointers={CANDIDATE: snapshot.version},
                rollout=rollout.to_record(),
            )
            self._rollouts[group] = rollout
            self._saved[group] = rollout.to_record()
            self._assignments.start_rollout(group, snapshot, policy.canary)
            log.info(
                "rollout staged",
                group=group,
                version=snapshot.version,
                canary=policy.canary.describe(),
            )
            if policy.fresh_probe is not None:
                self._probes[group] = asyncio.create_task(self._run_probe(group, snapshot, policy))
            if policy.traffic is not None:
                self._traffic[group] = asyncio.create_task(
                    self._run_traffic(group, rollout, policy)
                )
            return PublishOutcome(snapshot.version, stable, "staged")

    async def promote(self, group: str, *, actor: str, reason: str) -> Rollout:
        async with self._lock:
            rollout = self._require_active(group)
            if rollout.phase is not Phase.AWAITING_PROMOTION:
                raise RolloutError(_not_ready(rollout, self._policies[group], self._clock()))
            rollout.promote(self._clock(), reason or f"promoted by {actor}")
            await self._apply(group, rollout, Decision.PROMOTE, actor)
            return rollout

    async def abort(self, group: str, *, actor: str, reason: str) -> Rollout:
        async with self._lock:
            rollout = self._require_active(group)
            rollout.abort(self._clock(), reason or f"aborted by {actor}")
            await self._apply(group, rollout, Decision.ABORT, actor)
            return rollout

    async def rollback(
        self, group: str, *, to_version: str | None, actor: str, reason: str
    ) -> RollbackOutcome:
        async with self._lock:
            # Mid-rollout, last_good is usually stable itself: aborting is the rollback.
            target = to_version or (
                await asyncio.to_thread(self._store.pointer, group, LAST_GOOD)
                if self._active(group)
                else await asyncio.to_thread(self._previous_good, group)
            )
            if target is None:
                raise RolloutError(
                    f"group {group} has no last_good version to go back to; "
                    "name one with --to VERSION"
                )
            snapshot = await asyncio.to_thread(self._store.get, target)
            if snapshot is None:
                raise NotFoundError(f"version {target} is not in the store; nothing changed")
            started_at = self._clock()
            rollout = self._active(group)
            if rollout is not None:
                rollout.abort(started_at, f"rollback by {actor}: {reason}".rstrip(": "))
                await self._apply(group, rollout, Decision.ABORT, actor)
            previous = await asyncio.to_thread(self._store.pointer, group, STABLE)
            await asyncio.to_thread(
                self._store.transition,
                group,
                action="rollback",
                version=target,
                actor=actor,
                message=reason,
                pointers={STABLE: target},
            )
            self._assignments.set_stable(group, snapshot)
            self._rollbacks[group] = (target, started_at, actor)
            ended = self._guards.pop(group, None)  # what it watched is gone
            if ended is not None:
                ended.cancel(self._clock(), f"rolled back to {target} by {actor}")
            self._metrics.rollouts.labels(group, "rolled_back").inc()
            log.warning(
                "rollback",
                group=group,
                version=target,
                previous_version=previous,
                actor=actor,
                reason=reason,
            )
            return RollbackOutcome(target, previous, rollout is not None, started_at)

    async def wait_for_convergence(
        self, group: str, version: str, *, since: float, timeout: float
    ) -> Convergence:
        """Until every connected node of `group` ACKed `version` (or `timeout` passes),
        checked whenever this server's fleet progresses, and at least every 0.25 s (for
        nodes on other replicas)."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            if not self._evidence.progress(group, version).lagging:
                # Converged as last read: read the other replicas now, so that a node one
                # of them serves and this one had not heard of yet still counts.
                await self._evidence.refresh_remote()
                if not self._evidence.progress(group, version).lagging:
                    break
            await self._evidence.wait_progress(min(remaining, 0.25))
            # Each look walks every stream, and a converging fleet progresses on every ACK.
            await asyncio.sleep(min(CONVERGENCE_LOOK_SECONDS, max(0.0, remaining)))
        return self.convergence(group, version, since)

    def convergence(self, group: str, version: str, since: float) -> Convergence:
        found = self._evidence.convergence(group, version)
        lagging = [
            (node.node_id, node.rejection or ("WARMING" if node.warming else "STALE"))
            for node in found.lagging
        ]
        return Convergence(
            version,
            found.total,
            found.total - len(lagging),
            self._clock() - since,
            lagging,
            found.last_ack_at,
        )

    def rollout(self, group: str) -> Rollout | None:
        return self._rollouts.get(group)

    def rollouts(self) -> dict[str, Rollout]:
        return dict(self._rollouts)

    def policy(self, group: str) -> RolloutPolicy | None:
        return self._policies.get(group)

    def guards(self) -> dict[str, Guard]:
        """The guards watching now, by group."""
        return {g: guard for g, guard in self._guards.items() if guard.phase is GuardPhase.WATCHING}

    def last_guards(self) -> dict[str, Guard]:
        """Each group's newest guard, watching or ended, by group."""
        return dict(self._last_guards)

    def guarded_groups(self) -> set[str]:
        """Groups whose policy has a guard."""
        return {group for group, policy in self._policies.items() if policy.guard is not None}

    # -- the gate's loop ------------------------------------------------------------------

    async def _tick_forever(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # never let one bad tick stop the gate
                log.exception("rollout tick failed")
            await asyncio.sleep(TICK_SECONDS)

    async def tick(self) -> None:
        async with self._lock:
            now = self._clock()
            # A pointer moving (publish, promote, rollback) also moves the fleet.
            fleet_moved = self._evidence.generation != self._seen_generation
            self._seen_generation = self._evidence.generation
            for group, rollout in list(self._rollouts.items()):
                if not rollout.phase.active:
                    continue
                decision = rollout.observe(self._policies[group], now, self._observe(group))
                if decision is not None:
                    await self._apply(group, rollout, decision, GATE_ACTOR)
                elif (record := rollout.to_record()) != self._saved.get(group):
                    # The evidence so far, for a leader that takes over from this one.
                    await asyncio.to_thread(self._store.save_rollout, group, record)
                    self._saved[group] = record
            tripped = self._watch_guards(now)
            if fleet_moved:  # both walk the fleet: only worth it when something happened
                try:
                    await self._record_last_good()
                except StoreError as error:  # e.g. the database is down: retry next tick
                    self._seen_generation = -1
                    if not self._last_good_failing:
                        log.warning("last_good not recorded, retrying", error=str(error))
                    self._last_good_failing = True
                else:
                    self._last_good_failing = False
                self._record_rollback_durations()
        await self._roll_back_tripped(tripped)

    def _record_rollback_durations(self) -> None:
        for group, (version, started_at, actor) in list(self._rollbacks.items()):
            progress = self._evidence.progress(group, version)
            if progress.lagging:
                continue
            del self._rollbacks[group]
            seconds = max(0.0, (progress.last_ack_at or started_at) - started_at)
            self._metrics.rollback_duration.labels(group).observe(seconds)
            log.info(
                "rollback converged",
                group=group,
                version=version,
                actor=actor,
                nodes=progress.total,
                acked=f"{progress.total}/{progress.total}",
                seconds=seconds,
            )

    # -- the guard ------------------------------------------------------------------------

    def _start_guard(self, group: str, version: str) -> None:
        """Watch `group` on its new stable `version`, if its policy has a guard."""
        policy = self._policies.get(group)
        if policy is None or policy.guard is None:
            return
        replaced = self._guards.pop(group, None)
        if replaced is not None:
            replaced.cancel(self._clock(), f"{version} became stable")
        last_good = self._store.pointer(group, LAST_GOOD)
        if last_good is None or last_good == version:
            log.warning(
                "guard not started: no last_good to roll back to",
                group=group,
                version=version,
            )
            return
        guard = Guard(group, version, last_good, self._clock(), policy.guard)
        self._guards[group] = self._last_guards[group] = guard
        log.info(
            "guard watching",
            group=group,
            version=version,
            rollback_to=last_good,
            seconds=policy.guard.seconds,
            first_sync_seconds=policy.guard.first_sync_seconds,
        )

    def _watch_guards(self, now: float) -> list[Guard]:
        """Observe every guard; return those that tripped (the caller rolls them back)."""
        tripped = []
        for group, guard in list(self._guards.items()):
            phase = guard.observe(now, self._guarded_nodes(group))
            if phase is None:
                continue
            if phase is GuardPhase.PASSED:
                del self._guards[group]
                log.info("guard passed", group=group, version=guard.version, reason=guard.reason)
                self._seen_generation = -1  # last_good may move now, fleet quiet or not
                continue
            self._metrics.guard_trips.labels(group).inc()
            log.error(
                "guard tripped: rolling back",
                group=group,
                version=guard.version,
                rollback_to=guard.rollback_to,
                reason=guard.reason,
            )
            tripped.append(guard)  # kept (holding last_good) until the rollback removes it
        return tripped

    async def _roll_back_tripped(self, tripped: list[Guard]) -> None:
        for guard in tripped:
            try:
                await self.rollback(
                    guard.group,
                    to_version=guard.rollback_to,
                    actor=GUARD_ACTOR,
                    reason=guard.reason,
                )
            except RolloutError as error:  # e.g. last_good gone from the store
                log.error("guard could not roll back", group=guard.group, error=str(error))
                self._guards.pop(guard.group, None)

    def _guarded_nodes(self, group: str) -> list[GuardedNode]:
        return [
            GuardedNode(
                stream_id=node.key,
                node_id=node.node_id,
                version=node.version,
                connected_at=node.status.connected_at,
                started_empty=node.status.started_empty,
                first_synced=node.first_synced,
                missing=node.first_sync_missing,
                rejection=node.rejection,
            )
            for node in self._evidence.nodes(group)
        ]

    def _observe(self, group: str) -> list[NodeObservation]:
        return [_observation(node) for node in self._evidence.nodes(group)]

    async def _apply(self, group: str, rollout: Rollout, decision: Decision, actor: str) -> None:
        if decision is Decision.PROMOTE:
            candidate = self._assignments.candidate(group)
            assert candidate is not None
            await self._record(
                rollout, "promote", actor, {STABLE: rollout.candidate, CANDIDATE: None}
            )
            self._assignments.set_stable(group, candidate)
            self._assignments.end_rollout(group)
            self._start_guard(group, rollout.candidate)
            self._metrics.rollouts.labels(group, "promoted").inc()
            log.info(
                "rollout promoted", group=group, version=rollout.candidate, reason=rollout.reason
            )
        elif decision is Decision.ABORT:
            await self._record(rollout, "abort", actor, {CANDIDATE: None})
            self._assignments.end_rollout(group)
            self._metrics.rollouts.labels(group, "aborted").inc()
            log.warning(
                "rollout aborted", group=group, version=rollout.candidate, reason=rollout.reason
            )
        else:
            await self._record(rollout, "await_promotion", actor, {})
            log.info("rollout awaiting promotion", group=group, version=rollout.candidate)
        if not rollout.phase.active:
            for tasks in (self._probes, self._traffic):
                if (task := tasks.pop(group, None)) is not None:
                    task.cancel()

    async def _record(
        self, rollout: Rollout, action: str, actor: str, pointers: dict[str, str | None]
    ) -> None:
        """Commit one step of a rollout: its record, the pointers it moves, its history."""
        record = rollout.to_record()
        await asyncio.to_thread(
            self._store.transition,
            rollout.group,
            action=action,
            version=rollout.candidate,
            actor=actor,
            message=rollout.reason,
            pointers=pointers,
            rollout=record,
        )
        self._saved[rollout.group] = record

    async def _record_last_good(self) -> None:
        """last_good: the stable version once every connected node of its group ACKed it."""
        pointers = await asyncio.to_thread(self._store.pointers)
        for group in self._assignments.groups():
            stable = pointers.get(group, {}).get(STABLE)
            if (
                stable is None
                or pointers[group].get(LAST_GOOD) == stable
                or self._active(group)
                or group in self._guards  # a guard may still roll it back
            ):
                continue
            progress = self._evidence.progress(group, stable)
            if progress.total and not progress.lagging:
                await asyncio.to_thread(
                    self._store.transition,
                    group,
                    action="last_good",
                    version=stable,
                    actor=GATE_ACTOR,
                    message=f"ACKed by all {progress.total} connected node(s)",
                    pointers={LAST_GOOD: stable},
                )
                log.info("last_good", group=group, version=stable, nodes=progress.total)

    async def _run_probe(self, group: str, candidate: Snapshot, policy: RolloutPolicy) -> None:
        assert policy.fresh_probe is not None and self.probe_xds is not None
        result: ProbeResult = await run_probe(
            policy.fresh_probe,
            group=group,
            candidate=candidate,
            xds=self.probe_xds,
            is_synced=self._node_synced,
            metadata={PROBE_METADATA_KEY: "true"},
        )
        (log.info if result.ok else log.warning)(
            "fresh probe finished",
            group=group,
            version=candidate.version,
            ok=result.ok,
            reason=result.reason,
            seconds=result.seconds,
            **({} if result.ok else {"envoy_log_tail": result.log_tail}),
        )
        async with self._lock:
            rollout = self._rollouts.get(group)
            if (
                rollout is not None
                and rollout.candidate == candidate.version
                and rollout.phase.active
            ):
                rollout.probe_finished(result.ok, result.report(), result.node_id)

    async def _run_traffic(self, group: str, rollout: Rollout, policy: RolloutPolicy) -> None:
        """Evaluate the traffic checks whenever the gate says they are due, until the rollout
        ends (its end cancels this task)."""
        assert policy.traffic is not None
        client = PrometheusClient(policy.traffic.prometheus, policy.traffic.timeout_seconds)
        while rollout.phase.active:
            await asyncio.sleep(TICK_SECONDS)
            try:
                await self._traffic_round(group, rollout, policy, client)
            except Exception:  # one bad round must not stop the checks (the deadline bounds all)
                log.exception("traffic checks failed", group=group, version=rollout.candidate)

    async def _traffic_round(
        self, group: str, rollout: Rollout, policy: RolloutPolicy, client: PrometheusClient
    ) -> None:
        assert policy.traffic is not None
        async with self._lock:
            now = self._clock()
            if self._rollouts.get(group) is not rollout or not rollout.traffic_due(policy, now):
                return
            assert rollout.evidence_complete_at is not None
            window = now - rollout.evidence_complete_at
            canaries = sorted(
                {
                    n.node_id
                    for n in self._observe(group)
                    if n.canary and not n.probe and n.version == rollout.candidate
                }
            )
        results = await asyncio.to_thread(
            evaluate, policy.traffic, client, canaries=canaries, group=group, window_seconds=window
        )
        async with self._lock:
            if self._rollouts.get(group) is not rollout or not rollout.phase.active:
                return
            rollout.traffic_results(policy, self._clock(), results)
        for result in results:
            self._metrics.traffic_evaluations.labels(group, result.name, result.outcome.value).inc()
            log.info(
                "traffic check",
                group=group,
                version=rollout.candidate,
                check=result.name,
                result=result.outcome.value,
                value=result.value,
                detail=result.detail,
                query=result.query,
            )

    def _previous_good(self, group: str) -> str | None:
        """The newest version that was last_good and is not what the group holds now: when
        the current stable already is last_good, rolling back means the one before it."""
        stable = self._store.pointer(group, STABLE)
        for entry in self._store.history(group, limit=10_000):
            if entry.action == "last_good" and entry.version != stable:
                return entry.version
        return None

    def _node_synced(self, node_id: str) -> bool:
        return any(s.node is not None and s.node.id == node_id and s.synced() for s in self._fleet)

    def _active(self, group: str) -> Rollout | None:
        rollout = self._rollouts.get(group)
        return rollout if rollout is not None and rollout.phase.active else None

    def _require_active(self, group: str) -> Rollout:
        rollout = self._active(group)
        if rollout is None:
            raise RolloutError(f"group {group} has no rollout in progress")
        return rollout


def _not_ready(rollout: Rollout, policy: RolloutPolicy, now: float) -> str:
    """Why `promote` is refused while the gate still works on the candidate."""
    bake_left = rollout.bake_left(policy, now)
    if rollout.pending:
        waiting = "; ".join(p.describe(rollout.candidate, now) for p in rollout.pending)
        return f"the candidate {rollout.candidate} waits for canaries: {waiting}; wait, or abort it"
    if bake_left:
        return (
            f"the candidate {rollout.candidate} passed its canaries and is baking: "
            f"{bake_left:.0f}s of the {policy.bake_seconds:g}s bake left; wait, or abort it"
        )
    return (
        f"the candidate {rollout.candidate} has not passed its canaries yet "
        f"({rollout.progress(policy)}); wait, or abort it"
    )


def _observation(node: NodeEvidence) -> NodeObservation:
    return NodeObservation(
        stream_id=node.key,
        node_id=node.node_id,
        canary=node.canary,
        connected_at=node.status.connected_at,
        started_empty=node.status.started_empty,
        version=node.version,
        synced=node.synced,
        rejection=node.rejection,
        probe=node.probe,
        owed=node.owed,
    )
