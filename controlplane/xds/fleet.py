"""The fleet registry: which node holds which version of each type.

Streams register while they are open. `status()` reads their state machines and compares
each type with the snapshot the node's group should hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from controlplane.resources import ADS_ORDER
from controlplane.snapshot import Snapshot
from controlplane.xds import ordering
from controlplane.xds.stream import TypeState, XdsStream


class StreamControl(Protocol):
    """What the fleet may ask of a stream's shell."""

    def wake(self) -> None:
        """Re-resolve the stream's snapshot and push what changed."""

    def close(self) -> None:
        """End the stream cleanly (on shutdown)."""


class SyncState(enum.Enum):
    SYNCED = "SYNCED"  # ACKed the version it should hold
    STALE = "STALE"  # sent (or due) but not ACKed
    # Clusters sent and not ACKed: Envoy holds the CDS ACK until every new or changed cluster
    # has warmed (an EDS cluster, until its endpoints arrive). Listeners and routes that use
    # them wait, for at most the warming timeout.
    WARMING = "WARMING"
    NACKED = "NACKED"  # rejected the version it should hold
    NOT_SENT = "NOT_SENT"  # never sent anything of this type


@dataclass(frozen=True)
class TypeStatus:
    type_url: str
    state: SyncState
    expected_version: str | None
    sent_version: str | None
    sent_at: float | None
    acked_version: str | None
    acked_at: float | None
    nacked_version: str | None
    nacked_at: float | None
    nack_error: str | None


@dataclass(frozen=True)
class NodeStatus:
    node_id: str
    group: str
    build_version: str
    user_agent: str
    protocol: str
    stream_id: int
    connected_at: float
    snapshot_version: str | None
    types: tuple[TypeStatus, ...]
    # Started empty and did not ACK every type it is served within the first-sync timeout
    # (xds/first_sync.py): since when, and what it still lacks.
    started_empty: bool = False  # held nothing when it connected
    stuck: bool = False
    stuck_since: float | None = None
    missing: tuple[str, ...] = ()
    replica: str = ""  # the replica whose stream it is (empty with one server)


def type_status(state: TypeState, snapshot: Snapshot | None) -> TypeStatus:
    expected = snapshot.of_type(state.type_url).version if snapshot else None
    if state.sent_version is None:
        sync = SyncState.NOT_SENT
    elif state.acked_version == expected and not state.awaiting_ack:
        sync = SyncState.SYNCED
    elif state.nacked_version == expected and not state.awaiting_ack:
        sync = SyncState.NACKED
    elif state.awaiting_ack and state.type_url in ordering.WARMS_BEFORE_ACK:
        sync = SyncState.WARMING
    else:
        sync = SyncState.STALE
    return TypeStatus(
        state.type_url,
        sync,
        expected,
        state.sent_version,
        state.sent_at,
        state.acked_version,
        state.acked_at,
        state.nacked_version,
        state.nacked_at,
        state.nack_error,
    )


# In a set from Fleet.watch: more streams changed than it is worth listing; re-read them all.
REREAD_ALL = -1
# A watched set holds at most this many ids beyond the open streams: one nobody looks at any
# more (a tally of a version long superseded) stays small however many streams come and go.
WATCH_SLACK = 1024


class Fleet:
    def __init__(self) -> None:
        self._streams: dict[int, tuple[XdsStream, StreamControl]] = {}
        self.generation = 0  # bumped on every change a watcher could care about
        self.events = 0  # bumped on every event of any stream (touched)
        self._progress: asyncio.Event | None = None
        # Sets of ids of the streams that came, went or took an event since their owner
        # last looked (see `watch`).
        self._watchers: list[set[int]] = []

    def add(self, stream: XdsStream, control: StreamControl) -> None:
        self._streams[stream.stream_id] = (stream, control)
        self.touched(stream)
        self.progressed()

    def remove(self, stream: XdsStream) -> None:
        self._streams.pop(stream.stream_id, None)
        self.touched(stream)
        self.progressed()

    def get(self, stream_id: int) -> XdsStream | None:
        found = self._streams.get(stream_id)
        return found[0] if found else None

    def watch(self) -> set[int]:
        """A set the fleet adds the id of every stream to that comes, goes or takes an
        event (a request, a snapshot, a tick) from now on, or REREAD_ALL once that would be
        more than the open streams and WATCH_SLACK; its owner empties it as it looks, and
        gives it back with `unwatch`."""
        changed: set[int] = set()
        self._watchers.append(changed)
        return changed

    def unwatch(self, changed: set[int]) -> None:
        self._watchers = [w for w in self._watchers if w is not changed]

    def touched(self, stream: XdsStream) -> None:
        """The stream took an event: what it holds may have changed (the shell calls this
        after each one)."""
        self.events += 1
        bound = len(self._streams) + WATCH_SLACK
        for changed in self._watchers:
            changed.add(stream.stream_id)
            if len(changed) > bound:
                changed.clear()
                changed.add(REREAD_ALL)

    def progressed(self) -> None:
        """A stream ACKed, NACKed, came or went: wake whoever waits on the fleet."""
        self.generation += 1
        if self._progress is not None:
            self._progress.set()
            self._progress = None

    async def wait_progress(self, timeout: float) -> None:
        """Until the fleet progresses, or `timeout` seconds."""
        if self._progress is None:
            self._progress = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._progress.wait(), timeout)

    def wake_all(self) -> None:
        """Assignments changed: every stream re-resolves what it should hold."""
        for _, control in self._streams.values():
            control.wake()
        self.progressed()

    def close_all(self) -> None:
        for _, control in self._streams.values():
            control.close()

    def names_in_use(self) -> set[int]:
        """Identities of the subscriptions (shared name sets) the open streams hold."""
        return {
            id(names)
            for stream, _ in self._streams.values()
            for state in stream.types.values()
            for names in (state.names, state.sent_names, state.held_key and state.held_key[1])
            if names
        }

    def __iter__(self) -> Iterator[XdsStream]:
        return iter([stream for stream, _ in self._streams.values()])

    def __contains__(self, stream: object) -> bool:
        return isinstance(stream, XdsStream) and stream.stream_id in self._streams

    def __len__(self) -> int:
        return len(self._streams)

    def status(self) -> list[NodeStatus]:
        statuses = [node_status(stream) for stream in self if stream.node is not None]
        return sorted(statuses, key=lambda s: (s.group, s.node_id, s.stream_id))


def node_status(stream: XdsStream, replica: str = "") -> NodeStatus:
    """A stream that has made its first request (so names its node), as the status shows it."""
    assert stream.node is not None
    return NodeStatus(
        node_id=stream.node.id,
        group=stream.node.group,
        build_version=stream.node.build_version,
        user_agent=stream.node.user_agent,
        protocol=stream.protocol,
        stream_id=stream.stream_id,
        connected_at=stream.started_at,
        snapshot_version=stream.snapshot.version if stream.snapshot else None,
        types=tuple(
            type_status(stream.types[t.type_url], stream.snapshot)
            for t in ADS_ORDER
            if t.type_url in stream.types and stream.types[t.type_url].subscribed
        ),
        started_empty=stream.started_empty,
        stuck=stream.stuck,
        stuck_since=stream.stuck_since if stream.stuck else None,
        missing=stream.first_sync_missing() if stream.stuck else (),
        replica=replica,
    )
