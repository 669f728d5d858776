"""The admin gRPC API (protos/controlplane/admin/v1/admin.proto) that xdsctl calls."""

from __future__ import annotations

import grpc
import structlog
from google.protobuf.message import DecodeError

from controlplane.admin.v1 import admin_pb2, admin_pb2_grpc
from controlplane.publish import Publisher
from controlplane.resources import UnknownTypeError
from controlplane.snapshot import ConsistencyError, DuplicateResourceError
from controlplane.store import HistoryEntry, SnapshotStore
from controlplane.xds.fleet import Fleet, NodeStatus

log = structlog.get_logger("admin")

_REFUSED = (UnknownTypeError, DecodeError, ConsistencyError, DuplicateResourceError)


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(self, publisher: Publisher, store: SnapshotStore, fleet: Fleet) -> None:
        self._publisher = publisher
        self._store = store
        self._fleet = fleet

    async def Publish(
        self, request: admin_pb2.PublishRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.PublishResponse:
        try:
            published = await self._publisher.publish(
                request.group,
                request.resources,
                message=request.message,
                actor=request.actor or context.peer(),
            )
        except _REFUSED as error:
            log.warning("publish refused", group=request.group, error=str(error))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return admin_pb2.PublishResponse(
            version=published.version,
            changed=published.changed,
            parent_version=published.parent_version or "",
            counts=published.counts,
        )

    async def ListSnapshots(
        self, request: admin_pb2.ListSnapshotsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListSnapshotsResponse:
        entries = self._store.history(request.group or None, request.limit or 100)
        groups = {
            group: admin_pb2.GroupPointers(pointers=pointers)
            for group, pointers in self._store.pointers().items()
            if not request.group or group == request.group
        }
        return admin_pb2.ListSnapshotsResponse(
            entries=[_history_entry(e) for e in entries], groups=groups
        )

    async def GetFleetStatus(
        self, request: admin_pb2.GetFleetStatusRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetFleetStatusResponse:
        return admin_pb2.GetFleetStatusResponse(
            nodes=[_node_status(n) for n in self._fleet.status()]
        )


def _history_entry(entry: HistoryEntry) -> admin_pb2.HistoryEntry:
    return admin_pb2.HistoryEntry(
        id=entry.id,
        group=entry.group,
        action=entry.action,
        version=entry.version,
        parent_version=entry.parent_version or "",
        created_at=entry.created_at,
        actor=entry.actor,
        message=entry.message,
    )


def _node_status(node: NodeStatus) -> admin_pb2.NodeStatus:
    return admin_pb2.NodeStatus(
        node_id=node.node_id,
        group=node.group,
        build_version=node.build_version,
        user_agent=node.user_agent,
        protocol=node.protocol,
        stream_id=node.stream_id,
        connected_at=node.connected_at,
        snapshot_version=node.snapshot_version or "",
        types=[
            admin_pb2.TypeStatus(
                type_url=t.type_url,
                state=t.state.value,
                expected_version=t.expected_version or "",
                sent_version=t.sent_version or "",
                sent_at=t.sent_at or 0.0,
                acked_version=t.acked_version or "",
                acked_at=t.acked_at or 0.0,
                nacked_version=t.nacked_version or "",
                nacked_at=t.nacked_at or 0.0,
                nack_error=t.nack_error or "",
            )
            for t in node.types
        ],
    )
