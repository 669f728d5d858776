"""Per-node views of the admin API: the summary fields of `xdsctl status` and the per-type
answer of `xdsctl config-dump` (GetNodeConfig).

A node's role, state and held version are read from its open stream, its group's policy and
the assignments, at the moment of the call; nothing here changes what a node is served.
Invariants:
- `state` is STUCK for a node whose first sync overran, else the worst state of its types,
  in STATE_ORDER; a node with no type subscribed yet is NOT_SENT.
- `held_version` names a snapshot only if every subscribed type's ACKed version is that
  snapshot's (as the node is served it, secrets filtered): never a guess. The snapshots
  looked at are the one it should hold, its group's stable and candidate, and the group's
  last RECENT_VERSIONS history entries (read from the store only when a node holds none of
  those in memory); a node holding an older one shows none.
- Resources leave redacted unless the request asks for secrets (the interceptor makes that
  need the write role), and an answer over the message limit is refused, naming the limit.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping

from google.protobuf import any_pb2

from controlplane.admin import limits
from controlplane.admin.v1 import admin_pb2
from controlplane.redaction import redact_resource
from controlplane.rollout.policy import RolloutPolicy
from controlplane.snapshot import Resource, Snapshot
from controlplane.store import DEFAULT_GROUP, SnapshotStore
from controlplane.xds.assignments import Assignments
from controlplane.xds.fleet import Fleet, SyncState
from controlplane.xds.stream import TypeState, XdsStream, names_to_send

# Worst first: the state a node shows is the first of these any of its types is in.
STATE_ORDER = (
    SyncState.NACKED,
    SyncState.WARMING,
    SyncState.STALE,
    SyncState.NOT_SENT,
    SyncState.SYNCED,
)


RECENT_VERSIONS = 10  # history entries per group whose versions a node may be shown holding
RECENT_CACHE = 256  # versions whose type versions are kept in memory, least recent dropped


class NodeConfigTooLarge(Exception):
    """The answer would exceed the admin API's message limit (the text names it)."""


def node_state(type_states: Iterable[str]) -> str:
    present = set(type_states)
    if not present:
        return SyncState.NOT_SENT.value
    return next(s.value for s in STATE_ORDER if s.value in present)


def subscribed_names(state: TypeState, snapshot: Snapshot | None) -> list[str]:
    """The resources of `snapshot` the node should hold of this type: every one if it
    subscribed with the wildcard, else the names it asked for that exist."""
    if snapshot is None:
        return []
    by_name = snapshot.resources(state.type_url)
    wanted = names_to_send(state)
    return sorted(by_name if wanted is None else (name for name in wanted if name in by_name))


TypeVersions = Mapping[str, str]  # type URL -> type version, as a node is served it


def held_version(stream: XdsStream, known: Iterable[tuple[str, TypeVersions]]) -> str:
    """The first of the `known` (version, type versions) whose every subscribed type the
    stream's client ACKed, or ""."""
    subscribed = [s for s in stream.types.values() if s.subscribed]
    if not subscribed or any(s.acked_version is None for s in subscribed):
        return ""
    for version, types in known:
        if all(s.acked_version == types.get(s.type_url) for s in subscribed):
            return version
    return ""


def served_type_versions(snapshot: Snapshot, *, owner: bool) -> TypeVersions:
    return snapshot.as_served(owner=owner).type_versions()


class NodeViews:
    def __init__(
        self,
        fleet: Fleet,
        assignments: Assignments,
        policy: Callable[[str], RolloutPolicy | None],
        store: SnapshotStore,
    ) -> None:
        self._fleet = fleet
        self._assignments = assignments
        self._policy = policy
        self._store = store
        # version -> (type versions served to the owner group, to a group falling back on it)
        self._recent: OrderedDict[str, tuple[TypeVersions, TypeVersions]] = OrderedDict()
        self._recent_by_group: dict[str, list[str]] = {}
        self._reading = threading.Lock()  # one read_recent at a time (each in a thread)

    def groups(self) -> list[str]:
        """The groups `read_recent` should read: read in the event loop, which owns them."""
        return sorted({*self._assignments.groups(), DEFAULT_GROUP})

    def read_recent(self, groups: Iterable[str]) -> None:
        """Learn the type versions of each group's last RECENT_VERSIONS history entries,
        which a node may still hold (the stable before a publish or a rollback). Blocking:
        it reads the store; run it in a thread, and `annotate` in the event loop."""
        with self._reading:
            self._read_recent(groups)

    def _read_recent(self, groups: Iterable[str]) -> None:
        by_group: dict[str, list[str]] = {}
        for group in groups:
            versions = list(
                dict.fromkeys(e.version for e in self._store.history(group, RECENT_VERSIONS))
            )
            by_group[group] = versions
            for version in versions:
                if version in self._recent:
                    self._recent.move_to_end(version)
                    continue
                snapshot = self._store.get(version)
                if snapshot is None:
                    continue
                self._recent[version] = (
                    served_type_versions(snapshot, owner=True),
                    served_type_versions(snapshot, owner=False),
                )
                while len(self._recent) > RECENT_CACHE:
                    self._recent.popitem(last=False)
        self._recent_by_group = by_group

    @staticmethod
    def needs_recent(nodes: Iterable[admin_pb2.NodeStatus]) -> bool:
        """Whether a node ACKed every type, yet of no snapshot in memory: only the store's
        recent versions (read_recent) can name what it holds."""
        return any(
            not n.held_version and n.types and all(t.acked_version for t in n.types) for n in nodes
        )

    def annotate_all(self, nodes: list[admin_pb2.NodeStatus]) -> list[admin_pb2.NodeStatus]:
        """`annotate` each of `nodes`, finding their streams in one pass over the fleet."""
        streams = {s.stream_id: s for s in self._fleet}
        return [self.annotate(n, streams.get(n.stream_id)) for n in nodes]

    def annotate(
        self, node: admin_pb2.NodeStatus, stream: XdsStream | None
    ) -> admin_pb2.NodeStatus:
        """Fill in the per-node summary fields of a GetFleetStatus entry (in place) from the
        stream it was read from (None: closed since)."""
        # STUCK (a new Envoy whose first sync overran, see xds/first_sync.py) outranks the rest.
        node.state = "STUCK" if node.stuck else node_state(t.state for t in node.types)
        if stream is None or stream.node is None:
            return node  # gone since the list was read
        served_group = self._assignments.effective_group(stream.node.group)
        policy = self._policy(served_group)
        node.served_group = served_group
        selector = policy.canary if policy is not None else None  # a guard-only policy has none
        node.canary = selector is not None and selector.matches(stream.node)
        node.held_version = held_version(stream, self._known(stream, served_group))
        return node

    def _known(self, stream: XdsStream, served_group: str) -> Iterator[tuple[str, TypeVersions]]:
        """What the stream's node may hold, most likely first: what it should hold, its
        group's stable and candidate, then the group's recent versions (read_recent)."""
        assert stream.node is not None
        owner = served_group == stream.node.group
        if stream.snapshot is not None:
            yield stream.snapshot.version, stream.snapshot.type_versions()
        for snapshot in (
            self._assignments.stable(served_group),
            self._assignments.candidate(served_group),
        ):
            if snapshot is not None:
                yield snapshot.version, served_type_versions(snapshot, owner=owner)
        for version in self._recent_by_group.get(served_group, []):
            if (recent := self._recent.get(version)) is not None:
                yield version, recent[0 if owner else 1]

    def streams_of(self, node_id: str) -> list[XdsStream]:
        return sorted(
            (s for s in self._fleet if s.node is not None and s.node.id == node_id),
            key=lambda s: s.stream_id,
        )

    def config_type(
        self, stream: XdsStream, state: TypeState, status: admin_pb2.TypeStatus
    ) -> tuple[admin_pb2.NodeConfigType, list[Resource]]:
        """A type's entry of GetNodeConfig, with the names it should hold, and those
        resources (for `attach_resources`)."""
        names = subscribed_names(state, stream.snapshot)
        entry = admin_pb2.NodeConfigType(status=status, names=names, wildcard=state.wildcard)
        by_name = stream.snapshot.resources(state.type_url) if stream.snapshot else {}
        return entry, [by_name[name] for name in names]

    @staticmethod
    def attach_resources(
        entries: list[tuple[admin_pb2.NodeConfigType, list[Resource]]], include_secrets: bool
    ) -> None:
        """Put each entry's resources in it, redacted unless `include_secrets`. CPU work
        on immutable resources: run it in a thread."""
        for entry, held in entries:
            for resource in held:
                shown = resource if include_secrets else redact_resource(resource)
                entry.resources.append(any_pb2.Any(type_url=shown.type_url, value=shown.body))

    @staticmethod
    def check_size(response: admin_pb2.NodeConfigResponse) -> None:
        if (error := limits.too_large("this node's config", response.ByteSize())) is not None:
            raise NodeConfigTooLarge(f"{error}: ask for one --type, or for names only")
