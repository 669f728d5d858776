"""Publishing: resources -> validated Snapshot -> durable store -> served.

The order is the guarantee: a snapshot is built and checked, committed to the store, and
only then made active. A failure at any step leaves both the store and the fleet untouched.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

import structlog
from google.protobuf import any_pb2
from google.protobuf.message import Message

from controlplane import resources
from controlplane.snapshot import Snapshot
from controlplane.store import DEFAULT_GROUP, SnapshotStore
from controlplane.xds.cache import ActiveSnapshots

log = structlog.get_logger("publish")


@dataclass(frozen=True)
class Published:
    version: str
    parent_version: str | None
    changed: bool
    counts: dict[str, int]


class Publisher:
    def __init__(self, store: SnapshotStore, active: ActiveSnapshots) -> None:
        self._store = store
        self._active = active
        self._lock = asyncio.Lock()

    def load_stable(self) -> int:
        """Serve every group's stored stable version again (after a restart)."""
        loaded = 0
        for group, pointers in self._store.pointers().items():
            snapshot = self._store.get(pointers["stable"]) if "stable" in pointers else None
            if snapshot is not None:
                self._active.set(group, snapshot)
                loaded += 1
        return loaded

    async def publish(
        self, group: str, packed: Iterable[any_pb2.Any], *, message: str, actor: str
    ) -> Published:
        """Raises UnknownTypeError, DecodeError or ConsistencyError (nothing stored)."""
        group = group or DEFAULT_GROUP
        items = [(item.type_url, _unpack_resource(item)) for item in packed]
        # Canonicalizing and serializing a large config takes a while: keep the loop serving.
        snapshot = await asyncio.to_thread(Snapshot.from_messages, items)
        async with self._lock:
            result = await asyncio.to_thread(
                self._store.publish, group, snapshot, message=message, actor=actor
            )
            self._active.set(group, snapshot)
        log.info(
            "publish",
            group=group,
            version=snapshot.version,
            parent_version=result.entry.parent_version,
            changed=result.changed,
            actor=actor,
            message=message,
            bytes=snapshot.size_bytes,
        )
        return Published(
            snapshot.version, result.entry.parent_version, result.changed, snapshot.counts()
        )


def _unpack_resource(item: any_pb2.Any) -> Message:
    message = resources.resource_type(item.type_url).message_class()
    message.ParseFromString(item.value)
    return message
