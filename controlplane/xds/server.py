"""The grpc.aio shell around SotwStream: read, feed the state machine, write, repeat.

Serves ADS and the per-type discovery services. Only this module maps protocol errors to
gRPC status codes. A bad request ends its own stream and nothing else.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterable

import grpc
import structlog
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import DecodeError

from controlplane import resources
from controlplane.xds import wire
from controlplane.xds.assignments import Assignments
from controlplane.xds.fleet import Fleet
from controlplane.xds.stream import RemoteProtocolError, RequestKind, Send, SotwStream, TypeState

log = structlog.get_logger("xds")

# (gRPC service, method, the types it serves; None = every type over ADS)
SOTW_SERVICES: tuple[tuple[str, str, str | None], ...] = (
    ("envoy.service.discovery.v3.AggregatedDiscoveryService", "StreamAggregatedResources", None),
    ("envoy.service.cluster.v3.ClusterDiscoveryService", "StreamClusters", resources.CLUSTER),
    ("envoy.service.endpoint.v3.EndpointDiscoveryService", "StreamEndpoints", resources.ENDPOINT),
    ("envoy.service.listener.v3.ListenerDiscoveryService", "StreamListeners", resources.LISTENER),
    ("envoy.service.route.v3.RouteDiscoveryService", "StreamRoutes", resources.ROUTE),
    ("envoy.service.secret.v3.SecretDiscoveryService", "StreamSecrets", resources.SECRET),
)

_WAKE = object()  # the group's snapshot may have changed
_END = object()  # the client closed its side


class XdsServer:
    def __init__(self, assignments: Assignments, fleet: Fleet) -> None:
        self._assignments = assignments
        self._fleet = fleet
        self._ids = itertools.count(1)

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        return [
            grpc.method_handlers_generic_handler(
                service, {method: self._handler(None if only is None else (only,))}
            )
            for service, method, only in SOTW_SERVICES
        ]

    def _handler(self, types: Iterable[str] | None) -> grpc.RpcMethodHandler:
        async def handle(
            request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[bytes]:
            stream = SotwStream(next(self._ids), self._assignments.resolve, types=types)
            async for payload in self._serve(stream, request_iterator, context):
                yield payload

        return grpc.stream_stream_rpc_method_handler(
            handle, request_deserializer=None, response_serializer=wire.passthrough
        )

    async def _serve(
        self,
        stream: SotwStream,
        request_iterator: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[bytes]:
        events: asyncio.Queue[object] = asyncio.Queue()
        reader = asyncio.create_task(_read_into(request_iterator, events))
        bound = log.bind(stream_id=stream.stream_id, peer=context.peer())
        try:
            while (event := await events.get()) is not _END:
                if event is _WAKE:
                    if stream.node is None:
                        continue
                    sends = stream.on_snapshot(self._assignments.resolve(stream.node))
                else:
                    kind, state, sends = stream.receive(_parse(event))  # type: ignore[arg-type]
                    if stream not in self._fleet and stream.node is not None:
                        self._fleet.add(stream, _QueueControl(events))
                        bound = bound.bind(node_id=stream.node.id, group=stream.group)
                        bound.info("stream opened", protocol=stream.protocol)
                    _log_request(bound, kind, state)
                for send in sends:
                    _log_send(bound, send)
                    yield send.payload
        except RemoteProtocolError as error:
            bound.warning("protocol error", error=str(error))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        finally:
            reader.cancel()
            if stream in self._fleet:
                self._fleet.remove(stream)
                bound.info("stream closed")


class _QueueControl:
    def __init__(self, events: asyncio.Queue[object]) -> None:
        self._events = events

    def wake(self) -> None:
        self._events.put_nowait(_WAKE)

    def close(self) -> None:
        self._events.put_nowait(_END)


def _parse(raw: bytes) -> discovery_pb2.DiscoveryRequest:
    try:
        return discovery_pb2.DiscoveryRequest.FromString(raw)
    except DecodeError as error:
        raise RemoteProtocolError(f"malformed DiscoveryRequest: {error}") from None


async def _read_into(request_iterator: AsyncIterator[bytes], events: asyncio.Queue[object]) -> None:
    try:
        async for raw in request_iterator:
            events.put_nowait(raw)
    except (asyncio.CancelledError, grpc.aio.AioRpcError):
        pass
    finally:
        events.put_nowait(_END)


def _log_send(bound: structlog.typing.FilteringBoundLogger, send: Send) -> None:
    bound.debug(
        "push",
        type_url=send.type_url,
        version=send.version,
        nonce=send.nonce,
        bytes=len(send.payload),
    )


def _log_request(
    bound: structlog.typing.FilteringBoundLogger, kind: RequestKind, state: TypeState
) -> None:
    fields = {"type_url": state.type_url, "nonce": state.latest_nonce}
    if kind is RequestKind.NACK:
        bound.warning("nack", version=state.nacked_version, error=state.nack_error, **fields)
    elif kind is RequestKind.ACK:
        bound.info("ack", version=state.acked_version, **fields)
    elif kind is RequestKind.STALE:
        bound.debug("stale request ignored", **fields)
