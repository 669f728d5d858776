"""What the store says every group serves: its pointers, its rollout record, and the
snapshots they name. Read in one go (off the event loop) by a server starting, a replica
taking the lead, and a follower catching up with the leader."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from controlplane.snapshot import Snapshot
from controlplane.store import CANDIDATE, STABLE, SnapshotStore


@dataclass(frozen=True)
class StoredState:
    pointers: dict[str, dict[str, str]]  # {group: {pointer name: version}}
    rollouts: dict[str, dict[str, Any]]  # {group: rollout record}
    snapshots: dict[str, Snapshot]  # every stable and candidate, by version

    def snapshot(self, group: str, pointer: str) -> Snapshot | None:
        version = self.pointers.get(group, {}).get(pointer)
        return self.snapshots.get(version) if version is not None else None


def read_stored(store: SnapshotStore, known: Mapping[str, Snapshot]) -> StoredState:
    """The store's state; snapshots in `known` (by version) are not read again."""
    pointers = store.pointers()
    rollouts = store.rollouts()
    snapshots: dict[str, Snapshot] = {}
    for named in pointers.values():
        for name in (STABLE, CANDIDATE):
            version = named.get(name)
            if version is None or version in snapshots:
                continue
            snapshot = known.get(version) or store.get(version)
            if snapshot is not None:
                snapshots[version] = snapshot
    return StoredState(pointers, rollouts, snapshots)
