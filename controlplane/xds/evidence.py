"""Fleet evidence: each open stream as plain data, whichever replica serves it.

The rollout controller (gate, guard, last_good, convergence) and the admin API's fleet status
read the fleet only through `FleetEvidence`. With one server it is this process's streams;
with replicas (controlplane/replicas/) it adds the evidence the other replicas wrote to the
shared database, so every decision and every N/M counts the whole fleet.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Hashable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from controlplane import resources
from controlplane.rollout.policy import PROBE_METADATA_KEY
from controlplane.store import StoreError
from controlplane.xds.assignments import Assignments
from controlplane.xds.fleet import (
    REREAD_ALL,
    Fleet,
    NodeStatus,
    SyncState,
    TypeStatus,
    node_status,
)
from controlplane.xds.stream import XdsStream


@dataclass(frozen=True)
class NodeEvidence:
    status: NodeStatus  # what `xdsctl status` shows, with the replica it is on
    group: str  # the group whose pointers govern it (its own, or "default" it falls back on)
    canary: bool  # served the group's candidate while it has a rollout
    probe: bool  # the gate's own fresh probe
    synced: bool  # ACKed every type of the snapshot it is assigned
    warming: bool  # clusters sent and not ACKed yet (Envoy warms them first)
    rejection: str | None  # Envoy's error text if it NACKed its snapshot
    owed: tuple[str, ...]  # types (CLUSTER, ...) not ACKed at its snapshot
    first_synced: bool  # ACKed every type it is served at least once
    first_sync_missing: tuple[str, ...]  # what its first sync still lacks
    last_ack_at: float | None  # its latest ACK of a subscribed type

    @property
    def key(self) -> Hashable:
        """Identifies the stream fleet-wide: stream ids are only unique within a replica."""
        return (self.status.replica, self.status.stream_id)

    @property
    def node_id(self) -> str:
        return self.status.node_id

    @property
    def version(self) -> str | None:
        return self.status.snapshot_version

    def holds(self, version: str) -> bool:
        return self.version == version and self.synced


def of_stream(stream: XdsStream, assignments: Assignments, replica: str = "") -> NodeEvidence:
    assert stream.node is not None
    return NodeEvidence(
        status=node_status(stream, replica),
        group=assignments.effective_group(stream.node.group),
        canary=assignments.is_canary(stream.node),
        probe=stream.node.metadata.get(PROBE_METADATA_KEY) == "true",
        synced=stream.synced(),
        warming=stream.warming(),
        rejection=stream.rejection(),
        owed=_owed(stream),
        first_synced=stream.first_synced_at is not None,
        first_sync_missing=stream.first_sync_missing(),
        last_ack_at=_last_ack_at(stream),
    )


def _owed(stream: XdsStream) -> tuple[str, ...]:
    """The types (CLUSTER, ...) a stream has not ACKed at the snapshot it is assigned."""
    if stream.snapshot is None:
        return ()
    return tuple(
        resources.BY_URL[url].short_name.upper()
        for url, state in stream.types.items()
        if state.subscribed
        and url in resources.BY_URL
        and (state.awaiting_ack or state.acked_version != stream.snapshot.of_type(url).version)
    )


def to_json(evidence: NodeEvidence) -> str:
    record = asdict(evidence)
    for state in record["status"]["types"]:
        state["state"] = state["state"].value
    return json.dumps(record, separators=(",", ":"))


def from_json(text: str) -> NodeEvidence:
    """ValueError if `text` is not evidence as `to_json` writes it."""
    try:
        record: dict[str, Any] = json.loads(text)
        status = dict(record.pop("status"))
        status["types"] = tuple(
            TypeStatus(**{**t, "state": SyncState(t["state"])}) for t in status["types"]
        )
        status["missing"] = tuple(status["missing"])
        for name in ("owed", "first_sync_missing"):
            record[name] = tuple(record[name])
        return NodeEvidence(status=NodeStatus(**status), **record)
    except (TypeError, KeyError, AttributeError, ValueError) as error:
        raise ValueError(f"not node evidence: {error}") from None


class RemoteEvidence(Protocol):
    """The other replicas' evidence, as last read from the shared database."""

    generation: int  # grows whenever what `nodes` returns changed

    def nodes(self) -> list[NodeEvidence]: ...

    async def refresh(self) -> None:
        """Read again what the other replicas wrote (StoreError if that fails)."""


class FleetEvidence:
    def __init__(self, fleet: Fleet, assignments: Assignments, replica: str = "") -> None:
        self._fleet = fleet
        self._assignments = assignments
        self.replica = replica
        self.remote: RemoteEvidence | None = None  # set when replicas share a database
        self._progress_cache: tuple[tuple[str, str, int, int], GroupProgress] | None = None
        self._tallies: dict[tuple[str, str], _LocalTally] = {}  # oldest first

    def local(self) -> list[NodeEvidence]:
        return [
            of_stream(stream, self._assignments, self.replica)
            for stream in self._fleet
            if stream.node is not None
        ]

    def nodes(self, group: str | None = None) -> list[NodeEvidence]:
        """Every node of the fleet (of `group`, if given)."""
        everything = self.local() + (self.remote.nodes() if self.remote is not None else [])
        return [e for e in everything if group is None or e.group == group]

    def statuses(self) -> list[NodeStatus]:
        return sorted(
            (e.status for e in self.nodes()),
            key=lambda s: (s.group, s.node_id, s.replica, s.stream_id),
        )

    @property
    def local_generation(self) -> int:
        """Grows whenever one of this server's own nodes came, went, ACKed or NACKed."""
        return self._fleet.generation

    @property
    def generation(self) -> int:
        """Grows whenever any node anywhere came, went, ACKed or NACKed."""
        return self._fleet.generation + (self.remote.generation if self.remote else 0)

    async def refresh_remote(self) -> None:
        """The other replicas' evidence as they last wrote it, not as last read (up to a
        heartbeat ago): a judgement that ends a wait must count every node written by now.
        Without the database, what was last read stands."""
        if self.remote is not None:
            with contextlib.suppress(StoreError):
                await self.remote.refresh()

    async def wait_progress(self, timeout: float) -> None:
        """Until this replica's fleet progresses, or `timeout` (other replicas' progress is
        seen by polling: callers wait in short slices)."""
        await self._fleet.wait_progress(timeout)

    def progress(self, group: str, version: str) -> GroupProgress:
        """How many nodes of `group` hold `version` and how many lag, without building any
        node's evidence. Checked on every ACK while a fleet converges, by several waiters:
        computed once per fleet generation and stream event (a stream may come to hold a
        version on a request that is not an ACK, or on a tick)."""
        key = (group, version, self.generation, self._fleet.events)
        if self._progress_cache is not None and self._progress_cache[0] == key:
            return self._progress_cache[1]
        total, lagging, last_ack_at = self._tally(group, version).look()
        for evidence in self.remote.nodes() if self.remote is not None else ():
            if evidence.group != group:
                continue
            total += 1
            if not evidence.holds(version):
                lagging += 1
            elif evidence.last_ack_at is not None:
                last_ack_at = max(evidence.last_ack_at, last_ack_at or evidence.last_ack_at)
        found = GroupProgress(total, lagging, last_ack_at)
        self._progress_cache = (key, found)
        return found

    def _tally(self, group: str, version: str) -> _LocalTally:
        tally = self._tallies.pop((group, version), None)
        if tally is None:
            tally = _LocalTally(self._fleet, self._assignments, group, version)
            if len(self._tallies) >= TALLIES_KEPT:
                self._tallies.pop(next(iter(self._tallies))).close()
        self._tallies[(group, version)] = tally  # now the newest
        return tally

    def _members(self, group: str) -> Iterator[XdsStream]:
        """This replica's streams of nodes that `group`'s pointers govern."""
        return (s for s in self._fleet if _governed_by(s, group, self._assignments))

    def convergence(self, group: str, version: str) -> GroupConvergence:
        """`progress`, and the evidence of each node that lags."""
        found = self.progress(group, version)
        lagging = [
            of_stream(stream, self._assignments, self.replica)
            for stream in self._members(group)
            if not _holds(stream, version)
        ]
        if self.remote is not None:
            lagging += [e for e in self.remote.nodes() if e.group == group and not e.holds(version)]
        return GroupConvergence(found.total, lagging, found.last_ack_at)


def _governed_by(stream: XdsStream, group: str, assignments: Assignments) -> bool:
    """The stream's node is one that `group`'s pointers govern."""
    node = stream.node
    return node is not None and assignments.effective_group(node.group) == group


def _last_ack_at(stream: XdsStream) -> float | None:
    """When the stream last ACKed a type it subscribes to."""
    return max(
        (t.acked_at for t in stream.types.values() if t.subscribed and t.acked_at), default=None
    )


def _holds(stream: XdsStream, version: str) -> bool:
    """The stream is assigned `version` and ACKed every type of it (NodeEvidence.holds)."""
    return stream.snapshot is not None and stream.snapshot.version == version and stream.synced()


TALLIES_KEPT = 8  # (group, version) pairs whose local progress is kept up to date


class _LocalTally:
    """Which of this replica's streams of a group hold a version. A converging fleet is
    looked at on every ACK: each look reads again only the streams that took an event since
    the one before (Fleet.watch), and all of them when the assignments changed."""

    def __init__(self, fleet: Fleet, assignments: Assignments, group: str, version: str) -> None:
        self._fleet = fleet
        self._assignments = assignments
        self._group = group
        self._version = version
        self._changed = fleet.watch()
        self._epoch: int | None = None  # of the assignments when every stream was read
        self._members: set[int] = set()
        self._holders: dict[int, float] = {}  # member stream id -> its latest ACK

    def look(self) -> tuple[int, int, float | None]:
        """(members, members that do not hold the version, latest ACK of those that do)."""
        if self._epoch != self._assignments.epoch() or REREAD_ALL in self._changed:
            self._epoch = self._assignments.epoch()
            self._changed.clear()
            self._members.clear()
            self._holders.clear()
            for stream in self._fleet:
                self._read(stream.stream_id, stream)
        else:
            while self._changed:
                stream_id = self._changed.pop()
                self._read(stream_id, self._fleet.get(stream_id))
        return (
            len(self._members),
            len(self._members) - len(self._holders),
            max(self._holders.values(), default=None),
        )

    def _read(self, stream_id: int, stream: XdsStream | None) -> None:
        self._members.discard(stream_id)
        self._holders.pop(stream_id, None)
        if stream is None or not _governed_by(stream, self._group, self._assignments):
            return
        self._members.add(stream_id)
        if _holds(stream, self._version):
            self._holders[stream_id] = _last_ack_at(stream) or 0.0

    def close(self) -> None:
        self._fleet.unwatch(self._changed)


@dataclass(frozen=True)
class GroupProgress:
    total: int
    lagging: int
    last_ack_at: float | None  # when the last node to hold the version ACKed it


@dataclass(frozen=True)
class GroupConvergence:
    total: int
    lagging: list[NodeEvidence]
    last_ack_at: float | None  # when the last node to hold the version ACKed it
