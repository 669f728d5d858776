"""SnapshotStore: durable snapshots, their history, and per-group pointers.

The interface every backend implements. `sqlite.SQLiteStore` is the embedded default;
`postgres.PostgresStore` is shared by several replicas (controlplane/replicas/).

Invariants every backend keeps:
- `publish` is atomic: the snapshot, its history entry and the pointer move land together
  or not at all, and all of it is durable before `publish` returns (so before anything
  serves the snapshot).
- Publishing the version a group's `stable` already holds changes nothing.
- `get` returns exactly the snapshot that was stored (same version, same bytes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from controlplane.snapshot import Snapshot

DEFAULT_GROUP = "default"
STABLE = "stable"  # what the group's fleet gets
CANDIDATE = "candidate"  # under test by the canary gate
LAST_GOOD = "last_good"  # newest promoted version every connected node ACKed, with no NACK
POINTERS = (STABLE, CANDIDATE, LAST_GOOD)


class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


KEEP = _Keep()  # `transition(rollout=KEEP)`: leave the group's rollout record as it is


@dataclass(frozen=True)
class HistoryEntry:
    id: int
    group: str
    action: str
    version: str
    parent_version: str | None
    created_at: float
    actor: str
    message: str


@dataclass(frozen=True)
class PublishResult:
    entry: HistoryEntry
    changed: bool  # False when the group already held this version


class StoreError(RuntimeError):
    pass


class SnapshotStore(Protocol):
    def publish(self, group: str, snapshot: Snapshot, *, message: str, actor: str) -> PublishResult:
        """Store `snapshot` and point `group`'s stable at it, atomically."""
        ...

    def transition(
        self,
        group: str,
        *,
        action: str,
        version: str,
        actor: str,
        message: str,
        snapshot: Snapshot | None = None,
        pointers: Mapping[str, str | None] | None = None,
        rollout: Mapping[str, Any] | _Keep | None = KEEP,
    ) -> HistoryEntry:
        """One atomic step: store `snapshot` (if given), move `pointers` (None removes one),
        replace the group's rollout record (None removes it), and append a history entry."""
        ...

    def save_rollout(self, group: str, record: Mapping[str, Any]) -> None:
        """Replace the group's rollout record (the gate's evidence so far), nothing else."""
        ...

    def get(self, version: str) -> Snapshot | None: ...

    def rollouts(self) -> dict[str, dict[str, Any]]:
        """The persisted rollout record of every group that has one."""
        ...

    def pointer(self, group: str, name: str = STABLE) -> str | None: ...

    def pointers(self) -> dict[str, dict[str, str]]:
        """{group: {pointer name: version}} for every group."""
        ...

    def history(self, group: str | None = None, limit: int = 100) -> list[HistoryEntry]:
        """Newest first."""
        ...

    def close(self) -> None: ...
