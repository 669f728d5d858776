"""Assignments: which snapshot each node is served right now.

- Every node of a group gets the group's stable snapshot; a group with none of its own is
  served group `default`'s.
- While a group has a rollout, its canary nodes (as the rollout's selector decides) get the
  candidate instead, including canaries that connect mid-rollout.
- Every change starts a new epoch (`epoch`): the streams it wakes number their responses
  within it, so that streams doing the same thing send the same bytes (stream.py, nonces).
- Secrets go only to their owners: a node gets the secrets its group's listeners, clusters
  and other resources reference, and none from a group it falls back on (see
  Snapshot.as_served).
Any change tells the listeners, which re-resolve the streams they own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from controlplane.snapshot import Snapshot
from controlplane.store import DEFAULT_GROUP
from controlplane.xds.stream import NodeInfo

Listener = Callable[[], None]


class Selector(Protocol):
    def matches(self, node: NodeInfo) -> bool: ...


class Assignments:
    def __init__(self) -> None:
        self._stable: dict[str, Snapshot] = {}
        self._rollouts: dict[str, tuple[Snapshot, Selector]] = {}
        self._listeners: list[Listener] = []
        self._epoch = 0

    def epoch(self) -> int:
        """How many times the assignments changed: it only grows."""
        return self._epoch

    def effective_group(self, group: str) -> str:
        """The group whose pointers govern nodes that name `group` as their node.cluster."""
        return group if group in self._stable or group in self._rollouts else DEFAULT_GROUP

    def resolve(self, node: NodeInfo) -> Snapshot | None:
        group = self.effective_group(node.group)
        rollout = self._rollouts.get(group)
        if rollout is not None and rollout[1].matches(node):
            return rollout[0].as_served(owner=group == node.group)
        if (own := self._stable.get(group)) is not None:
            return own.as_served(owner=group == node.group)
        if (fallback := self._stable.get(DEFAULT_GROUP)) is not None:
            return fallback.as_served(owner=node.group == DEFAULT_GROUP)
        return None

    def is_canary(self, node: NodeInfo) -> bool:
        rollout = self._rollouts.get(self.effective_group(node.group))
        return rollout is not None and rollout[1].matches(node)

    def stable(self, group: str) -> Snapshot | None:
        return self._stable.get(group)

    def candidate(self, group: str) -> Snapshot | None:
        rollout = self._rollouts.get(group)
        return rollout[0] if rollout else None

    def set_stable(self, group: str, snapshot: Snapshot) -> None:
        if self._stable.get(group) != snapshot:
            self._stable[group] = snapshot
            self._changed()

    def start_rollout(self, group: str, candidate: Snapshot, selector: Selector) -> None:
        self._rollouts[group] = (candidate, selector)
        self._changed()

    def end_rollout(self, group: str) -> None:
        """Canaries go back to stable (on abort), or stable already is the candidate."""
        if self._rollouts.pop(group, None) is not None:
            self._changed()

    def groups(self) -> list[str]:
        return sorted(set(self._stable) | set(self._rollouts))

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def _changed(self) -> None:
        self._epoch += 1
        for listener in self._listeners:
            listener()
