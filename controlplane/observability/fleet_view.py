"""The scrape-time view of the control plane that the metrics collector reads."""

from __future__ import annotations

from collections import Counter

import structlog

from controlplane.rollout.controller import RolloutController
from controlplane.store import SnapshotStore, StoreError
from controlplane.xds.assignments import Assignments
from controlplane.xds.fleet import Fleet

log = structlog.get_logger("metrics")


class ControlPlaneView:
    def __init__(
        self,
        fleet: Fleet,
        assignments: Assignments,
        store: SnapshotStore,
        controller: RolloutController,
    ) -> None:
        self._fleet = fleet
        self._assignments = assignments
        self._store = store
        self._controller = controller

    def stream_counts(self) -> dict[str, int]:
        return dict(Counter(stream.protocol for stream in self._fleet))

    def node_counts(self) -> dict[str, tuple[int, int]]:
        connected: Counter[str] = Counter()
        lagging: Counter[str] = Counter()
        for stream in self._fleet:
            if stream.node is None:
                continue
            group = self._assignments.effective_group(stream.node.group)
            connected[group] += 1
            lagging[group] += not stream.synced()
        groups = set(connected) | set(self._assignments.groups())
        return {group: (connected[group], lagging[group]) for group in sorted(groups)}

    def pointers(self) -> dict[str, dict[str, str]]:
        """From the store; {} (and a warning) while it is unavailable: a scrape then lacks
        xdscp_group_version_info rather than failing whole."""
        try:
            return self._store.pointers()
        except StoreError as error:
            log.warning(
                "metrics without group versions: the store is unavailable", error=str(error)
            )
            return {}

    def stable_sizes(self) -> dict[str, int]:
        return {
            group: snapshot.size_bytes
            for group in self._assignments.groups()
            if (snapshot := self._assignments.stable(group)) is not None
        }

    def rollout_phases(self) -> dict[str, str]:
        return {group: r.phase.value for group, r in self._controller.rollouts().items()}

    def stuck_counts(self) -> dict[str, int]:
        stuck: Counter[str] = Counter()
        for stream in self._fleet:
            if stream.node is not None and stream.stuck:
                stuck[self._assignments.effective_group(stream.node.group)] += 1
        groups = set(stuck) | set(self._assignments.groups())
        return {group: stuck[group] for group in sorted(groups)}

    def guards_watching(self) -> dict[str, int]:
        watching = self._controller.guards()
        return {
            group: int(group in watching)
            for group in sorted(self._controller.guarded_groups() | set(watching))
        }
