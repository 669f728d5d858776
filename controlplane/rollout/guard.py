"""The guard: keeps watching a group for a while after a new stable version reached it.

Running Envoys can accept a config that an Envoy starting on it cannot finish initializing
on (the incident this project answers): the canaries pass, and the fleet breaks at the next
scale-up. The guard watches the group's nodes on the new stable for `seconds` after the
promotion (or the straight publish) and trips on either failure signal:
- a node NACKs the guarded version;
- a node that started empty (from nothing) on the guarded version has not finished its
  first sync (xds/first_sync.py) `first_sync_seconds` after it connected (or after the
  guard started, for a node that was already starting).

A pure state machine, like gate.py: `observe(now, nodes)` with observations built from the
fleet, no I/O and no clock of its own. The controller performs what it decides: a trip is a
rollback to last_good, and last_good does not move while a guard watches.

Phases:  watching --(seconds pass, no failure)--> passed
         watching --(a failure signal)----------> tripped
"""

from __future__ import annotations

import enum
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

from controlplane.rollout.policy import GuardPolicy


class GuardPhase(enum.Enum):
    WATCHING = "watching"
    PASSED = "passed"
    TRIPPED = "tripped"
    CANCELLED = "cancelled"  # a rollback (or a newer stable) ended it first


@dataclass(frozen=True)
class GuardedNode:
    """One open stream of the group, as the guard needs to see it."""

    stream_id: Hashable  # one stream, fleet-wide
    node_id: str
    version: str | None  # the snapshot it is assigned
    connected_at: float
    started_empty: bool  # held nothing when it connected
    first_synced: bool  # ACKed every type it is served at least once
    missing: tuple[str, ...] = ()  # what its first sync lacks, e.g. "never asked for LDS"
    rejection: str | None = None  # Envoy's error text if it NACKed its snapshot


@dataclass
class Guard:
    group: str
    version: str  # the new stable it watches
    rollback_to: str  # last_good when the guard started: where a trip takes the group
    started_at: float
    policy: GuardPolicy
    phase: GuardPhase = GuardPhase.WATCHING
    reason: str = ""
    ended_at: float | None = None

    def observe(self, now: float, nodes: Iterable[GuardedNode]) -> GuardPhase | None:
        """The phase the guard moved to, if it moved."""
        if self.phase is not GuardPhase.WATCHING:
            return None
        failure = self._failure(now, nodes)
        if failure is not None:
            return self._end(GuardPhase.TRIPPED, now, failure)
        if now - self.started_at >= self.policy.seconds:
            return self._end(
                GuardPhase.PASSED, now, f"no NACK and no stuck node in {self.policy.seconds:g}s"
            )
        return None

    def cancel(self, now: float, reason: str) -> None:
        if self.phase is GuardPhase.WATCHING:
            self._end(GuardPhase.CANCELLED, now, reason)

    def remaining(self, now: float) -> float:
        return max(0.0, self.started_at + self.policy.seconds - now)

    def _failure(self, now: float, nodes: Iterable[GuardedNode]) -> str | None:
        bound = self.policy.first_sync_seconds
        for node in nodes:
            if node.version != self.version:
                continue
            if node.rejection is not None:
                return f"node {node.node_id} NACKed {self.version}: {node.rejection}"
            starting_since = max(node.connected_at, self.started_at)
            if node.started_empty and not node.first_synced and now - starting_since > bound:
                missing = "; ".join(node.missing) or "first sync not complete"
                return (
                    f"node {node.node_id} started on {self.version} and did not finish its "
                    f"first sync within {bound:g}s: {missing}"
                )
        return None

    def _end(self, phase: GuardPhase, now: float, reason: str) -> GuardPhase:
        self.phase, self.reason, self.ended_at = phase, reason, now
        return phase
