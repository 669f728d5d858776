"""The floor: the least a grpc.aio server must do to serve the bench fleet, for comparison.

    python -m tests.bench.floor [--style direct|queue] CONFIG_DIR [CONFIG_DIR ...]

A minimal grpc.aio server, in its own process like xdscp, with generic stream-stream handlers
on the ADS methods (state of the world and delta). It serves the same bytes xdscp would: it
loads each config directory exactly as `xdsctl publish` does (controlplane.config +
controlplane.snapshot.Snapshot) and answers with responses built by controlplane.xds.wire
from the snapshot's pre-serialized entries, encoded once per distinct response and shared
by every stream. Versions are the snapshot's per-type versions, so a simulated Envoy cannot
tell the two servers apart by what it holds.

What it keeps per stream is the least the protocol needs: per type, the names asked for,
the latest nonce, whether a response awaits its ACK, and (delta) what the client holds.
It keeps ADS order: CDS, EDS, LDS, RDS in that order, a response awaiting its ACK holding
the types after it, with one exception. Envoy asks for the EDS of the clusters a CDS update
adds (or removes, or, over state of the world, changes) before it ACKs that update, and holds
the ACK until those clusters have their endpoints (tests/bench/fleet.py, checked against a
real Envoy by tests/integration/test_simulator_matches_envoy.py). So an EDS request that
arrives while a CDS response awaits its ACK releases EDS: it is answered at once, and at most
a CDS and an EDS response are in flight. Holding EDS until then (rather than pushing it along
with CDS) keeps one EDS response per push. (A cluster changed in place over delta is not
asked for again, and would stall here; the bench config never changes one in place.)
It does nothing else: no store, no metrics, no logs, no validation, no NACK handling beyond
counting them, no fleet view.

--style direct (the default) is the leanest grpc.aio shape: the handler reads with
context.read() and writes with context.write(), and a publish starts a task per stream that
has something to send. --style queue is the shape of xdscp's shell (an async generator fed
by a per-stream queue that a reader task and publishes put into): the difference between
the two is what that shape costs.

Control is a line protocol on stdin/stdout (the parent owns both pipes):
- at start it prints `serving PORT` (it binds 127.0.0.1 on a free port);
- `publish K` makes config K (0-based, in argument order) current and wakes every stream;
  it answers `published K EPOCH` (time.time() once every stream was woken);
- `stats` answers one JSON line (streams open, requests, ACKs, NACKs, responses sent);
- `stop` or end of input stops the server (also SIGINT/SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
SOTW_METHOD = "StreamAggregatedResources"
DELTA_METHOD = "DeltaAggregatedResources"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
ADS_ORDER = (CDS, EDS, LDS, RDS)  # the types the bench config has, in xdscp's ADS order
WILDCARD_TYPES = frozenset((CDS, LDS))
SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", 64 << 20),
    # gRPC cancels new streams once 1,000 wait for the application (the default): a connect
    # storm of thousands of streams must not hit that here.
    ("grpc.server.max_pending_requests", 100000),
    ("grpc.server.max_pending_requests_hard_limit", 100000),
]
_WAKE = object()
_END = object()
STYLES = ("direct", "queue")


def load_snapshots(directories: list[Path]) -> list[Any]:
    """Each directory as the Snapshot `xdsctl publish` would build from it."""
    from controlplane.config import load_directory
    from controlplane.snapshot import Snapshot

    snapshots = []
    for directory in directories:
        loaded = load_directory(directory)
        snapshots.append(Snapshot.from_messages((r.type_url, r.message) for r in loaded))
    return snapshots


class Encoded:
    """Responses encoded once and shared by every stream, by what they carry."""

    def __init__(self, snapshots: list[Any]) -> None:
        self.snapshots = snapshots
        self._sotw: dict[tuple[int, str, frozenset[str] | None], tuple[str, str, bytes]] = {}
        self._delta: dict[tuple[Any, ...], tuple[str, str, bytes, dict[str, str]]] = {}

    def version(self, index: int, type_url: str) -> str:
        return self.snapshots[index].of_type(type_url).version

    def sotw(
        self, index: int, type_url: str, names: frozenset[str] | None
    ) -> tuple[str, str, bytes]:
        """(version, nonce, response) of config `index` for `names` (None: every resource)."""
        key = (index, type_url, names)
        found = self._sotw.get(key)
        if found is None:
            from controlplane.xds import wire

            current = self.snapshots[index].of_type(type_url)
            nonce = f"s{len(self._sotw)}"
            payload = wire.sotw_response(
                current.version, type_url, nonce, current.entries_for(names)
            )
            found = self._sotw[key] = (current.version, nonce, payload)
        return found

    def delta(
        self,
        index: int,
        type_url: str,
        names: frozenset[str] | None,
        held: tuple[str, frozenset[str] | None] | None,
        held_versions: dict[str, str],
    ) -> tuple[str, str, bytes, dict[str, str]] | None:
        """(version, nonce, response, what the client holds once it ACKs) bringing a client
        that holds `held` (type version and names, None: nothing) to config `index` for
        `names`; None when nothing differs."""
        key = (index, type_url, names, held)
        found = self._delta.get(key)
        if found is None:
            from controlplane.xds import wire

            current = self.snapshots[index].of_type(type_url)
            wanted = {
                name: resource.version
                for name, resource in current.by_name.items()
                if names is None or name in names
            }
            changed = sorted(n for n, v in wanted.items() if held_versions.get(n) != v)
            removed = tuple(
                sorted(
                    n for n in held_versions if n not in wanted and (names is None or n in names)
                )
            )
            if held is not None and not changed and not removed:
                return None
            nonce = f"d{len(self._delta)}"
            entries = b"".join(current.by_name[n].delta_entry for n in changed)
            payload = wire.delta_response(current.version, type_url, nonce, entries, removed)
            found = self._delta[key] = (current.version, nonce, payload, wanted)
        return found


class _Type:
    __slots__ = (
        "awaiting",
        "eds_asked",
        "held",
        "held_versions",
        "names",
        "nonce",
        "pending",
        "sent",
        "subscribed",
    )

    def __init__(self) -> None:
        self.subscribed = False
        self.names: frozenset[str] | None = None  # None: wildcard
        self.nonce = ""
        self.awaiting = False
        self.eds_asked = False  # CDS: an EDS request arrived since the response in flight
        self.sent: tuple[str, frozenset[str] | None] | None = None  # (version, names) last sent
        # delta: what the client holds once ACKed (type version, names) and its versions
        self.held: tuple[str, frozenset[str] | None] | None = None
        self.held_versions: dict[str, str] = {}
        self.pending: dict[str, str] = {}  # held_versions once the response in flight is ACKed


class _Stream:
    """One ADS stream of the floor: its per-type state and how to reach it."""

    __slots__ = ("context", "delta", "parse", "queue", "types", "writing")

    def __init__(self, delta: bool, context: Any, queue: asyncio.Queue[object] | None) -> None:
        from envoy.service.discovery.v3 import discovery_pb2

        self.delta = delta
        self.parse = (
            discovery_pb2.DeltaDiscoveryRequest if delta else discovery_pb2.DiscoveryRequest
        ).FromString
        self.types = {t: _Type() for t in ADS_ORDER}
        self.context = context
        self.queue = queue  # style "queue": requests and wake-ups, like xdscp's shell
        self.writing = False  # style "direct": a write is in progress


class Floor:
    """style "direct": the handler reads with context.read() and writes with
    context.write(); a publish starts one task per stream that has something to send.
    style "queue": xdscp's shell shape (an async generator fed by a queue that a reader task
    and publishes put into), to tell the cost of that shape from gRPC's."""

    def __init__(self, snapshots: list[Any], style: str = "direct") -> None:
        if style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}")
        self.encoded = Encoded(snapshots)
        self.style = style
        self.current = 0
        self.streams: set[_Stream] = set()
        self.stats = {"streams_opened": 0, "requests": 0, "acks": 0, "nacks": 0, "responses": 0}
        self._tasks: set[asyncio.Task[None]] = set()

    def publish(self, index: int) -> float:
        self.current = index
        for stream in self.streams:
            if stream.queue is not None:
                stream.queue.put_nowait(_WAKE)
            elif not stream.writing:
                task = asyncio.create_task(self._pump(stream))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        return time.time()

    def handlers(self) -> Any:
        import grpc

        def handler(delta: bool) -> Any:
            if self.style == "direct":

                async def direct(requests: Any, context: grpc.aio.ServicerContext) -> None:
                    await self.serve_direct(context, delta)

                # No (de)serializers: requests arrive as bytes, responses leave as given.
                return grpc.stream_stream_rpc_method_handler(direct)

            async def queued(
                requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
            ) -> AsyncIterator[bytes]:
                async for payload in self.serve_queued(requests, delta):
                    yield payload

            return grpc.stream_stream_rpc_method_handler(queued)

        return grpc.method_handlers_generic_handler(
            ADS_SERVICE, {SOTW_METHOD: handler(False), DELTA_METHOD: handler(True)}
        )

    async def serve_direct(self, context: Any, delta: bool) -> None:
        import grpc

        stream = _Stream(delta, context, None)
        self.streams.add(stream)
        self.stats["streams_opened"] += 1
        try:
            while (raw := await context.read()) is not grpc.aio.EOF:
                self._request(stream, raw)
                await self._pump(stream)
        finally:
            self.streams.discard(stream)

    async def _pump(self, stream: _Stream) -> None:
        """Write what is due, one response at a time (one write in flight per stream)."""
        if stream.writing:
            return  # the writer re-checks what is due after its write
        stream.writing = True
        try:
            while (payload := self._due(stream.types, stream.delta)) is not None:
                self.stats["responses"] += 1
                await stream.context.write(payload)
        except Exception:  # the stream ended under the write: its handler cleans up
            pass
        finally:
            stream.writing = False

    async def serve_queued(
        self, requests: AsyncIterator[bytes], delta: bool
    ) -> AsyncIterator[bytes]:
        queue: asyncio.Queue[object] = asyncio.Queue()
        stream = _Stream(delta, None, queue)
        reader = asyncio.create_task(_read_into(requests, queue))
        self.streams.add(stream)
        self.stats["streams_opened"] += 1
        try:
            while (event := await queue.get()) is not _END:
                if event is not _WAKE:
                    self._request(stream, event)  # type: ignore[arg-type]
                payload = self._due(stream.types, delta)
                if payload is not None:
                    self.stats["responses"] += 1
                    yield payload
        finally:
            self.streams.discard(stream)
            reader.cancel()

    def _request(self, stream: _Stream, raw: bytes) -> None:
        stats = self.stats
        stats["requests"] += 1
        request = stream.parse(raw)
        state = stream.types.get(request.type_url)
        if state is None:
            return
        if request.type_url == EDS:
            stream.types[CDS].eds_asked = True  # releases EDS past an unACKed CDS (_due)
        if request.response_nonce and request.response_nonce != state.nonce:
            return  # answers an older response: stale, ignored
        if request.response_nonce and state.awaiting:
            state.awaiting = False
            if request.HasField("error_detail"):
                stats["nacks"] += 1
            else:
                stats["acks"] += 1
                if stream.delta:
                    state.held = state.sent
                    state.held_versions = state.pending
        if stream.delta:
            _delta_subscribe(state, request, request.type_url)
        else:
            state.subscribed = True
            names = frozenset(request.resource_names)
            state.names = (
                None if not names and request.type_url in WILDCARD_TYPES else _shared(names)
            )

    def _due(self, types: dict[str, _Type], delta: bool) -> bytes | None:
        """The next response in ADS order, if any: a response awaiting its ACK holds the
        types after it, except that EDS passes a CDS response once the client asked for EDS
        since it was sent (Envoy ACKs CDS only once the clusters it added have endpoints)."""
        index = self.current
        cds_awaiting = False
        for type_url in ADS_ORDER:
            state = types[type_url]
            if not state.subscribed:
                continue
            if cds_awaiting and type_url != EDS:
                return None
            if state.awaiting:
                if type_url == CDS and state.eds_asked:
                    cds_awaiting = True
                    continue
                return None
            want = (self.encoded.version(index, type_url), state.names)
            if state.sent == want:
                continue
            if delta:
                found = self.encoded.delta(
                    index, type_url, state.names, state.held, state.held_versions
                )
                state.sent = want
                if found is None:  # the client holds all of it already
                    state.held = want
                    continue
                _, nonce, payload, pending = found
                state.pending = pending
            else:
                _, nonce, payload = self.encoded.sotw(index, type_url, state.names)
                state.sent = want
            state.nonce = nonce
            state.awaiting = True
            state.eds_asked = False
            return payload
        return None


_SHARED: dict[frozenset[str], frozenset[str]] = {}


def _shared(names: frozenset[str]) -> frozenset[str]:
    """One object per distinct set of names: every stream asks for the same ones, and
    thousands of streams need not each keep a copy (xdscp does the same)."""
    if len(_SHARED) >= 4096:
        _SHARED.clear()
    return _SHARED.setdefault(names, names)


def _delta_subscribe(state: _Type, request: Any, type_url: str) -> None:
    subscribe = set(request.resource_names_subscribe)
    unsubscribe = set(request.resource_names_unsubscribe)
    if not state.subscribed:
        state.subscribed = True
        # The first request naming nothing is the legacy wildcard (CDS and LDS).
        state.names = None if not subscribe and type_url in WILDCARD_TYPES else frozenset()
    if state.names is None:
        if not subscribe:
            return
        state.names = frozenset()  # naming resources ends the legacy wildcard
    if subscribe or unsubscribe:
        state.names = _shared(frozenset((state.names | subscribe) - unsubscribe))
        if unsubscribe:  # the client forgets what it no longer asks for
            state.held_versions = {
                n: v for n, v in state.held_versions.items() if n not in unsubscribe
            }


async def _read_into(requests: AsyncIterator[bytes], queue: asyncio.Queue[object]) -> None:
    import grpc

    try:
        async for raw in requests:
            queue.put_nowait(raw)
    except (asyncio.CancelledError, grpc.aio.AioRpcError):
        pass
    finally:
        queue.put_nowait(_END)


async def serve(directories: list[Path], address: str, style: str) -> None:
    import grpc

    floor = Floor(load_snapshots(directories), style)
    server = grpc.aio.server(handlers=[floor.handlers()], options=SERVER_OPTIONS)
    port = server.add_insecure_port(address)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    buffered = b""

    def on_input() -> None:
        nonlocal buffered
        chunk = os.read(sys.stdin.fileno(), 4096)
        if not chunk:  # the parent closed our stdin: it is gone or done
            stop.set()
            return
        buffered += chunk
        while b"\n" in buffered:
            line, buffered = buffered.split(b"\n", 1)
            command(line.decode().split())

    def command(words: list[str]) -> None:
        if words == ["stop"]:
            stop.set()
        elif words[:1] == ["publish"] and len(words) == 2:
            index = int(words[1])
            if not 0 <= index < len(floor.encoded.snapshots):
                _say(f"error no config {index}")
                return
            _say(f"published {index} {floor.publish(index):.6f}")
        elif words == ["stats"]:
            _say(json.dumps({**floor.stats, "streams_open": len(floor.streams)}))
        elif words:
            _say(f"error unknown command {' '.join(words)!r}")

    loop.add_reader(sys.stdin.fileno(), on_input)
    _say(f"serving {port}")
    try:
        await stop.wait()
    finally:
        loop.remove_reader(sys.stdin.fileno())
        await server.stop(1)


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.floor", description=__doc__)
    parser.add_argument("configs", nargs="+", type=Path, help="config directories (0, 1, ...)")
    parser.add_argument("--address", default="127.0.0.1:0", help="loopback only")
    parser.add_argument(
        "--style",
        choices=STYLES,
        default="direct",
        help="direct: context.read()/write(); queue: xdscp's shell shape (see Floor)",
    )
    args = parser.parse_args(argv)
    if not args.address.startswith("127.0.0.1:"):
        parser.error("the floor listens on 127.0.0.1 only")
    asyncio.run(serve(args.configs, args.address, args.style))


if __name__ == "__main__":
    main()
