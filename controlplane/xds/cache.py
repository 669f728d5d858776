"""ActiveSnapshots: which snapshot each node group is served right now.

A group with no snapshot of its own is served group `default`'s. Changing a group's snapshot
tells every listener, which in turn re-resolves the streams it owns.
"""

from __future__ import annotations

from collections.abc import Callable

from controlplane.snapshot import Snapshot
from controlplane.store import DEFAULT_GROUP

Listener = Callable[[], None]


class ActiveSnapshots:
    def __init__(self) -> None:
        self._by_group: dict[str, Snapshot] = {}
        self._listeners: list[Listener] = []

    def resolve(self, group: str) -> Snapshot | None:
        return self._by_group.get(group) or self._by_group.get(DEFAULT_GROUP)

    def set(self, group: str, snapshot: Snapshot) -> None:
        if self._by_group.get(group) == snapshot:
            return
        self._by_group[group] = snapshot
        for listener in self._listeners:
            listener()

    def groups(self) -> dict[str, Snapshot]:
        return dict(self._by_group)

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)
