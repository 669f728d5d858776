"""The grpc.aio shell around the stream state machines: read, feed, write, repeat.

Serves ADS and the per-type discovery services, state of the world and delta. Only this
module maps protocol errors to gRPC status codes. A bad request ends its own stream and
nothing else. Time reaches a stream only as a tick at the deadline it asks for.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator, Iterable
from typing import Protocol

import grpc
import structlog
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import DecodeError
from structlog.typing import FilteringBoundLogger as BoundLogger

from controlplane import resources
from controlplane.observability.metrics import Metrics, StreamEventCounts
from controlplane.xds import first_sync, limits, ordering
from controlplane.xds.assignments import Assignments
from controlplane.xds.delta import DeltaStream
from controlplane.xds.fleet import Fleet
from controlplane.xds.identity import Certificate, IdentityRefused
from controlplane.xds.stream import (
    RemoteProtocolError,
    Request,
    RequestKind,
    Send,
    SotwStream,
    TypeState,
    XdsStream,
)

log = structlog.get_logger("xds")

_D = "envoy.service.discovery.v3."
# (gRPC service, state-of-the-world method, delta method, the type it serves; None = all, ADS)
SERVICES: tuple[tuple[str, str | None, str | None, str | None], ...] = (
    (_D + "AggregatedDiscoveryService", "StreamAggregatedResources", "DeltaAggregatedResources", None),
    ("envoy.service.cluster.v3.ClusterDiscoveryService", "StreamClusters", "DeltaClusters", resources.CLUSTER),
    ("envoy.service.endpoint.v3.EndpointDiscoveryService", "StreamEndpoints", "DeltaEndpoints", resources.ENDPOINT),
    ("envoy.service.listener.v3.ListenerDiscoveryService", "StreamListeners", "DeltaListeners", resources.LISTENER),
    ("envoy.service.route.v3.RouteDiscoveryService", "StreamRoutes", "DeltaRoutes", resources.ROUTE),
    ("envoy.service.route.v3.ScopedRoutesDiscoveryService", "StreamScopedRoutes", "DeltaScopedRoutes", resources.SCOPED_ROUTE),
    ("envoy.service.route.v3.VirtualHostDiscoveryService", None, "DeltaVirtualHosts", resources.VIRTUAL_HOST),
    ("envoy.service.secret.v3.SecretDiscoveryService", "StreamSecrets", "DeltaSecrets", resources.SECRET),
    ("envoy.service.runtime.v3.RuntimeDiscoveryService", "StreamRuntime", "DeltaRuntime", resources.RUNTIME),
    ("envoy.service.extension.v3.ExtensionConfigDiscoveryService", "StreamExtensionConfigs", "DeltaExtensionConfigs", resources.EXTENSION_CONFIG),
)  # fmt: skip

NACK_LOG_INTERVAL_SECONDS = 10.0  # per stream and type: one NACK line, then a count
ERROR_LOG_INTERVAL_SECONDS = 1.0  # per protocol error reason, server-wide
LARGE_REQUEST_BYTES = 256 << 10  # about 6,000 names: a few milliseconds of work
# After each large request the loop is left to everything else for this long before the
# next large one: a flood of them cannot hold up small requests (or /healthz) for more than
# one large request at a time.
LARGE_REQUEST_PAUSE_SECONDS = 0.005
NODE_ID_LOG_CHARS = 256  # node id and group in each log line of a stream

_INTERNAL_ERROR = "internal error; see the server log"

# HTTP/2 keepalive on xDS connections. Envoy's `connection_keepalive` pings the server; with
# gRPC's defaults, pings more often than every 5 minutes on a connection that sends no data
# are answered with GOAWAY too_many_pings, and Envoy reconnects. So client pings are accepted
# down to every 0.5 s (Envoy jitters its interval by 15%, so 1 s may come as 0.85 s), and the
# server pings idle connections itself to find peers that died without closing them.
KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.http2.min_ping_interval_without_data_ms", 500),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.keepalive_time_ms", 30_000),  # server ping after 30 s without activity
    ("grpc.keepalive_timeout_ms", 10_000),  # no answer within 10 s: the peer is gone
    ("grpc.http2.max_pings_without_data", 0),  # keep pinging however long a stream is idle
)


class XdsServer:
    def __init__(
        self,
        assignments: Assignments,
        fleet: Fleet,
        metrics: Metrics,
        *,
        warming_timeout: float = ordering.DEFAULT_WARMING_TIMEOUT_SECONDS,
        first_sync_timeout: float = first_sync.DEFAULT_FIRST_SYNC_TIMEOUT_SECONDS,
        trust_domain: str | None = None,
    ) -> None:
        """`trust_domain` (with mTLS on the port): client certificates decide what nodes
        may claim, as identity.py reads them."""
        self._assignments = assignments
        self._warming_timeout = warming_timeout
        self._first_sync_timeout = first_sync_timeout
        self._trust_domain = trust_domain
        # Streams ended by a protocol error: one line per reason every second, server-wide,
        # however many clients misbehave.
        self._error_log = LogRateLimit(ERROR_LOG_INTERVAL_SECONDS)
        # Large requests take the event loop for tens of milliseconds each: they are handled
        # one at a time, with a pause for everything else between two of them.
        self._large_requests = asyncio.Lock()
        self._metrics = metrics
        self._fleet = fleet
        self._ids = itertools.count(1)
        self._deadlines = Deadlines()
        # Bound once, shared by every stream (a bound method is an object per stream).
        self._resolve, self._epoch = assignments.resolve, assignments.epoch
        # Debug lines are not even built at other levels (the level is set at start-up).
        self._log_debug = log.is_enabled_for(logging.DEBUG)

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        handlers = []
        for service, sotw, delta, only in SERVICES:
            types = None if only is None else (only,)
            methods = {}
            if sotw is not None:
                methods[sotw] = self._handler(SotwStream, discovery_pb2.DiscoveryRequest, types)
            if delta is not None:
                methods[delta] = self._handler(
                    DeltaStream, discovery_pb2.DeltaDiscoveryRequest, types
                )
            handlers.append(grpc.method_handlers_generic_handler(service, methods))
        return handlers

    def _handler(
        self,
        protocol: type[XdsStream],
        request_type: type[Request],
        types: Iterable[str] | None,
    ) -> grpc.RpcMethodHandler:
        async def handle(_: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
            stream = protocol(
                next(self._ids),
                self._resolve,
                types=types,
                warming_timeout=self._warming_timeout,
                first_sync_timeout=self._first_sync_timeout,
                certificate=self._certificate(context),
                epoch=self._epoch,
            )
            await _Session(self, stream, request_type, context).run()

        # No (de)serializers: a request is parsed by the session (after its size is known),
        # and a response leaves as the bytes the stream encoded.
        return grpc.stream_stream_rpc_method_handler(handle)

    def _certificate(self, context: grpc.aio.ServicerContext) -> Certificate | None:
        """The client's certificate; None on the Unix socket or when mTLS is off."""
        if self._trust_domain is None:
            return None
        return Certificate.from_auth_context(self._trust_domain, context.auth_context())

    @contextlib.asynccontextmanager
    async def _large_turn(self) -> AsyncIterator[None]:
        """Large requests are handled one at a time, each followed by a pause in which
        everything else that is ready runs (small ones go straight through)."""
        async with self._large_requests:
            yield
            await asyncio.sleep(LARGE_REQUEST_PAUSE_SECONDS)

    def _counts(self, type_url: str, stream: XdsStream) -> StreamEventCounts:
        return self._metrics.stream_events.of(type_url, self._group(stream))

    def _group(self, stream: XdsStream) -> str:
        """The metrics label: the group whose pointers serve the node (a bounded set)."""
        return self._assignments.effective_group(stream.group or "")

    def _record_send(self, session: _Session, send: Send) -> None:
        counts = self._counts(send.type_url, session.stream)
        counts.pushes += 1
        counts.pushed_bytes += len(send.payload)
        # Per push and per ACK lines are debug: a publish to N nodes makes thousands of them,
        # and at info they cost more CPU than the pushes. NACKs stay warnings.
        if not self._log_debug:
            return
        session.bound.debug(
            "push",
            type_url=send.type_url,
            version=send.version,
            nonce=send.nonce,
            bytes=len(send.payload),
            **({"removed": list(send.removed)} if send.removed else {}),
        )

    def _record_request(self, session: _Session, kind: RequestKind, state: TypeState) -> None:
        if kind is RequestKind.UNSUPPORTED:
            # No series for it: its type URL is the client's to choose.
            self._metrics.ignored_requests.labels("unsupported_type").inc()
            if session.first_time(("type", state.type_url)):
                session.bound.warning(
                    "request for a type not served: ignored", type_url=state.type_url
                )
            return
        counts = self._counts(state.type_url, session.stream)  # (at 0 from the first request)
        if kind is RequestKind.ACK:
            counts.acks += 1
            if self._log_debug:
                session.bound.debug("ack", version=state.acked_version, **_about(state))
        elif kind is RequestKind.NACK:
            counts.nacks += 1
            suppressed = session.nack_log().allow(state.type_url, time.monotonic())
            if suppressed is not None:
                session.bound.warning(
                    "nack",
                    version=state.nacked_version,
                    error=state.nack_error,
                    suppressed=suppressed,
                    **_about(state),
                )
        elif self._log_debug and kind is RequestKind.STALE:
            session.bound.debug("stale request ignored", **_about(state))
        elif self._log_debug and kind is RequestKind.UPDATE:
            session.bound.debug("subscription update", names=len(state.names), **_about(state))
        if state.type_url == resources.SECRET and kind in (RequestKind.INITIAL, RequestKind.UPDATE):
            self._report_unserved_secrets(session, state.names)

    @staticmethod
    def _report_unserved_secrets(session: _Session, names: frozenset[str]) -> None:
        """Once per stream and name: a secret asked for and not served (see Snapshot.as_served),
        which leaves the listener or cluster that needs it warming on the Envoy."""
        stream = session.stream
        served = stream.snapshot.resources(resources.SECRET) if stream.snapshot else {}
        missing = sorted(n for n in names if n not in served and session.first_time(("secret", n)))
        if missing:
            session.bound.warning(
                "secrets not served",
                why="not published in the node's group, not referenced by the group's config, "
                "or the group falls back on default's config",
                names=[limits.clip(n, 256) for n in missing[:20]],
                more=max(0, len(missing) - 20),
            )

    def _record_stuck(self, session: _Session) -> None:
        """A node ran out of time for its first sync, or completed it after all."""
        stream, bound = session.stream, session.bound
        if stream.stuck:
            bound.warning(
                "node stuck starting up",
                missing=list(stream.first_sync_missing()),
                first_sync_timeout=self._first_sync_timeout,
            )
        else:
            bound.info("node finished starting up after being stuck")
        self._fleet.progressed()

    def _record_convergence(self, stream: XdsStream, converged_on: str | None) -> str | None:
        """Observe, once per snapshot, how long this node took to ACK all of it."""
        snapshot = stream.snapshot
        if snapshot is None or snapshot.version == converged_on or not stream.synced():
            return converged_on
        if stream.assigned_at is not None:
            self._metrics.convergence.labels(self._group(stream)).observe(
                max(0.0, time.time() - stream.assigned_at)
            )
        return snapshot.version


class LogRateLimit:
    """At most one log line per key every `interval` seconds; the lines left out are
    counted into the next one (the metrics count every event)."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._last: dict[str, tuple[float, int]] = {}  # key -> (logged at, left out since)

    def allow(self, key: str, now: float) -> int | None:
        """None to leave this event out of the log, else how many were left out before it."""
        logged_at, suppressed = self._last.get(key, (-self._interval, 0))
        if now - logged_at < self._interval:
            self._last[key] = (logged_at, suppressed + 1)
            return None
        self._last[key] = (now, 0)
        return suppressed


class _Session:
    """One stream's shell. Its handler reads requests; wake-ups (the group's snapshot may
    have changed) and ticks (the stream's deadline came) arrive as loop callbacks between
    reads. Each event runs the sans-IO stream to completion, without awaiting, and queues
    what it sends; one writer at a time drains the queue, in order. So a stream costs one
    task while idle, and a push to it one callback and one short task (as the bench's floor).
    While a write is in progress, wake-ups and ticks wait for it and the next request is not
    read: a client that reads slowly holds one event's responses, never a backlog.
    """

    __slots__ = (
        "context",
        "converged_on",
        "deadline",
        "ending",
        "logged",
        "nacks_logged",
        "outbox",
        "peer",
        "request_type",
        "server",
        "stream",
        "task",
        "tick_due",
        "wake_due",
        "was_stuck",
        "writer",
    )

    def __init__(
        self,
        server: XdsServer,
        stream: XdsStream,
        request_type: type[Request],
        context: grpc.aio.ServicerContext,
    ) -> None:
        self.server = server
        self.stream = stream
        self.request_type = request_type
        self.context = context
        self.peer = context.peer()
        # (type URL, encoded response): a list, not a deque (760 bytes even when empty)
        self.outbox: list[tuple[str, bytes]] = []
        self.writer: asyncio.Task[None] | None = None  # draining the outbox, if any
        self.wake_due = False
        self.tick_due = False  # a deadline came while writing: looked at when the writes end
        # Set by close() (OK) or by a failure outside the handler: why the handler ends.
        self.ending: tuple[grpc.StatusCode, str] | None = None
        self.task = asyncio.current_task()
        self.deadline: float | None = None  # when the stream asked to be ticked (Deadlines)
        self.converged_on: str | None = None
        self.was_stuck = False
        self.nacks_logged: LogRateLimit | None = None  # by type; made at the first NACK
        # Logged once per stream: ("type", URL) of types not served, ("secret", name) of
        # secrets asked for and not served. None until the first.
        self.logged: set[tuple[str, str]] | None = None

    @property
    def bound(self) -> BoundLogger:
        """The stream's logger, made for each line rather than kept: a fleet holds
        thousands of streams, and logs little of each at info."""
        node = self.stream.node
        if node is None:
            return log.bind(stream_id=self.stream.stream_id, peer=self.peer)
        return log.bind(
            stream_id=self.stream.stream_id,
            peer=self.peer,
            node_id=limits.clip(node.id, NODE_ID_LOG_CHARS),
            group=limits.clip(node.group, NODE_ID_LOG_CHARS),
        )

    def nack_log(self) -> LogRateLimit:
        if self.nacks_logged is None:
            self.nacks_logged = LogRateLimit(NACK_LOG_INTERVAL_SECONDS)
        return self.nacks_logged

    def first_time(self, key: tuple[str, str]) -> bool:
        """True once per stream and key: what is logged once."""
        if self.logged is None:
            self.logged = set()
        elif key in self.logged:
            return False
        self.logged.add(key)
        return True

    async def run(self) -> None:
        server = self.server
        try:
            while (raw := await self.context.read()) is not grpc.aio.EOF:
                if self.writer is not None:
                    # A request is handled once what is queued is written: a client that
                    # reads no responses is read no further (its requests wait in gRPC's
                    # flow-controlled window), and nothing piles up here.
                    await self.writer
                if len(raw) > LARGE_REQUEST_BYTES:  # type: ignore[arg-type]
                    async with server._large_turn():
                        self._on_request(raw)  # type: ignore[arg-type]
                else:
                    self._on_request(raw)  # type: ignore[arg-type]
                del raw  # not kept while the stream idles
                if self.outbox and self.writer is None:
                    self.writer = self.task
                    await self._drain()
        except asyncio.CancelledError:
            if self.ending is None:
                raise  # gRPC ended the call
            self.task.uncancel()  # type: ignore[union-attr]
            code, message = self.ending
            if code is not grpc.StatusCode.OK:
                await self.context.abort(code, message)
        except RemoteProtocolError as error:
            suppressed = server._error_log.allow(error.reason, time.monotonic())
            if suppressed is not None:
                self.bound.warning(
                    "protocol error",
                    reason=error.reason,
                    error=limits.clip(str(error)),
                    suppressed=suppressed,
                )
            server._metrics.stream_errors.labels(error.reason).inc()
            await self.context.abort(grpc.StatusCode.INVALID_ARGUMENT, limits.clip(str(error)))
        except IdentityRefused as error:
            suppressed = server._error_log.allow(error.reason, time.monotonic())
            if suppressed is not None:
                self.bound.warning(
                    "identity refused",
                    reason=error.reason,
                    node_id=limits.clip(error.node_id, NODE_ID_LOG_CHARS),
                    group=limits.clip(error.group, NODE_ID_LOG_CHARS),
                    error=limits.clip(str(error)),
                    suppressed=suppressed,
                )
            server._metrics.identity_refusals.labels(error.reason).inc()
            await self.context.abort(grpc.StatusCode.PERMISSION_DENIED, limits.clip(str(error)))
        except Exception:  # a bug of ours: logged in full here, never shown to the client
            self._log_failure()
            await self.context.abort(grpc.StatusCode.INTERNAL, _INTERNAL_ERROR)
        finally:
            if self.ending is None:
                self.ending = (grpc.StatusCode.CANCELLED, "the stream ended")  # wakes, ticks: none
            server._deadlines.move(self, None)
            if self.writer is not None:
                self.writer.cancel()
            if self.stream in server._fleet:
                server._fleet.remove(self.stream)
                self.bound.info("stream closed")

    def _on_request(self, raw: bytes) -> None:
        server, stream = self.server, self.stream
        kind, state, sends = stream.receive(_parse(self.request_type, raw), len(raw))
        if stream not in server._fleet and stream.node is not None:
            server._fleet.add(stream, self)
            self.bound.info("stream opened", protocol=stream.protocol)
        server._record_request(self, kind, state)
        if kind in (RequestKind.ACK, RequestKind.NACK):
            server._fleet.progressed()
        if kind is not RequestKind.UNSUPPORTED:  # (even a NACK may drop its last names)
            self.converged_on = server._record_convergence(stream, self.converged_on)
        self._queue(sends)

    def _queue(self, sends: list[Send]) -> None:
        """After each event of the stream: queue what it sends, and tell the fleet."""
        self.server._fleet.touched(self.stream)
        for send in sends:
            self.server._record_send(self, send)
            self.outbox.append((send.type_url, send.payload))
        if self.stream.stuck != self.was_stuck:
            self.was_stuck = self.stream.stuck
            self.server._record_stuck(self)
        self.server._deadlines.move(self, self.stream.next_deadline())

    async def _drain(self) -> None:
        """Write the queued responses in order: run by the task its caller set as
        self.writer, one at a time."""
        try:
            while self.outbox:
                batch, self.outbox = self.outbox, []  # what is queued meanwhile comes next
                moved = False
                for type_url, payload in batch:
                    await self.context.write(payload)
                    moved = self.stream.on_written(type_url) or moved
                if moved:
                    self.server._deadlines.move(self, self.stream.next_deadline())
                # What came while writing, looked at now: a stream that writes slowly
                # holds one event's responses at a time, however often it is woken.
                if self.wake_due:
                    self._wake()
                if self.tick_due:
                    self.tick_due = False
                    self._tick()
        except Exception:  # the call ended under the write: the handler sees it and ends
            self.outbox.clear()
        finally:
            self.writer = None

    def _start_drain(self) -> None:
        if self.outbox and self.writer is None:
            self.writer = asyncio.get_running_loop().create_task(self._drain())

    # --- StreamControl: what the fleet asks -----------------------------------------------

    def wake(self) -> None:
        """The group's snapshot may have changed: looked at once, however often asked (by
        the writer when its writes are done, if one is writing)."""
        if not self.wake_due:
            self.wake_due = True
            if self.writer is None:
                asyncio.get_running_loop().call_soon(self._on_wake)

    def close(self) -> None:
        """End the stream cleanly (OK), as on shutdown."""
        self._end(grpc.StatusCode.OK, "")

    # --- Events outside the handler -------------------------------------------------------

    def _on_wake(self) -> None:
        if self.writer is None and self.wake_due:  # (else the writer looks when done)
            self._wake()
            self._start_drain()

    def _wake(self) -> None:
        """Queue what the stream's current snapshot sends."""
        self.wake_due = False
        stream = self.stream
        if stream.node is None or self.ending is not None:
            return
        try:
            before = stream.snapshot
            sends = stream.on_snapshot(self.server._assignments.resolve(stream.node))
            if stream.snapshot is not before:
                # Its evidence changed (the version it is assigned) even if nothing needs
                # sending, e.g. a rollback to what it still holds.
                self.server._fleet.progressed()
            self._queue(sends)
        except Exception:
            self._log_failure()
            self._end(grpc.StatusCode.INTERNAL, _INTERNAL_ERROR)

    def on_tick(self) -> None:
        """The deadline the stream asked for came (Deadlines)."""
        if self.ending is not None:
            return
        if self.writer is not None:
            # Deadlines counted from a response (stream.on_written) start when it is
            # written: look once the writes in progress are done. A first sync that ran
            # out of time is marked now (a write may never end).
            self.tick_due = True
            self._tick(send=False)
            return
        self._tick()
        self._start_drain()

    def _tick(self, *, send: bool = True) -> None:
        """The stream's deadline came: queue what it sends or, without `send`, only mark a
        first sync that ran out of time."""
        try:
            if send:
                self._queue(self.stream.on_tick())
            else:
                self.stream.check_first_sync()
                self._queue([])
        except Exception:
            self._log_failure()
            self._end(grpc.StatusCode.INTERNAL, _INTERNAL_ERROR)

    def _end(self, code: grpc.StatusCode, message: str) -> None:
        if self.ending is None and self.task is not None:
            self.ending = (code, message)
            self.task.cancel()

    def _log_failure(self) -> None:
        self.bound.exception("stream failed", reason="internal")
        self.server._metrics.stream_errors.labels("internal").inc()


class Ticked(Protocol):
    deadline: float | None  # when it asked to be ticked, kept by Deadlines

    def on_tick(self) -> None: ...


class Deadlines:
    """When each stream asked to be ticked, on one loop timer per slot of SLOT_SECONDS
    rather than one per stream: a push moves the deadlines of a whole fleet (a type starts
    or stops waiting for an ACK), and moving one is a set operation. A tick comes at most a
    slot late, never early; the deadlines it serves are seconds long (ordering.py,
    first_sync.py)."""

    SLOT_SECONDS = 0.05

    def __init__(self) -> None:
        self._slots: dict[int, set[Ticked]] = {}  # slot -> the sessions due in it

    def move(self, session: Ticked, deadline: float | None) -> None:
        """`session` is due at `deadline` (on the streams' monotonic clock) now, or never."""
        if deadline == session.deadline:
            return
        if session.deadline is not None:
            due = self._slots.get(self._slot(session.deadline))
            if due is not None:
                due.discard(session)
        session.deadline = deadline
        if deadline is not None:
            slot = self._slot(deadline)
            due = self._slots.get(slot)
            if due is None:
                due = self._slots[slot] = set()
                delay = max(0.0, slot * self.SLOT_SECONDS - time.monotonic())
                asyncio.get_running_loop().call_later(delay, self._fire, slot)
            due.add(session)

    def _slot(self, deadline: float) -> int:
        return math.ceil(deadline / self.SLOT_SECONDS)

    def _fire(self, slot: int) -> None:
        due = self._slots.pop(slot, ())
        for session in due:
            session.deadline = None
        for session in due:
            try:
                session.on_tick()
            except Exception as error:  # as the loop reports a failed callback; others tick
                asyncio.get_running_loop().call_exception_handler(
                    {"message": "stream tick failed", "exception": error}
                )


def _about(state: TypeState) -> dict[str, str | None]:
    """What a log line about a request says of its type."""
    return {"type_url": limits.clip(state.type_url), "nonce": state.latest_nonce}


def _parse(request_type: type[Request], raw: bytes) -> Request:
    try:
        return request_type.FromString(raw)
    except DecodeError:
        name = request_type.DESCRIPTOR.name
        raise RemoteProtocolError(
            f"malformed {name}: {len(raw):,} bytes that do not decode", "malformed"
        ) from None
