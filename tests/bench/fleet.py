"""A fleet of simulated Envoys: real ADS gRPC clients, spread over worker processes.

Each simulated Envoy opens one ADS stream
(`/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources`) and
behaves as Envoy does in state-of-the-world:

- the first request carries Node(id="sim-<i>", cluster=<group>, user_agent_name="envoy-sim");
- it asks for CDS and LDS as wildcards (no names), and on a reconnect sends the versions it
  holds and the EDS/RDS names it had;
- every response is ACKed with the response's version_info and nonce;
- after a CDS response it decodes the clusters and, when the EDS names changed or a cluster
  was added or changed (Envoy rebuilds those and re-subscribes), sends the EDS request
  (names = eds_cluster_config.service_name or the cluster name) *before* the CDS ACK, as
  Envoy does (its mux pauses EDS while CDS is applied, then resumes);
- after an LDS response it subscribes RDS to every HttpConnectionManager's
  rds.route_config_name, when that set changed, before the LDS ACK.

The nodes run on `workers` processes (default os.cpu_count()), each one asyncio loop with a
handful of grpc.aio channels (own TCP connections) carrying many streams, so the simulator
does not share the control plane's GIL. The parent talks to each worker over a Pipe:

- `watch(key, {type_url: version})`: from now on, each worker records, per node, the first
  time (node-side `time.time()` just after writing the ACK) its ACKed versions match;
- `query(key)`: how many nodes match right now, how many have matched since the watch, and
  (optionally) each node's first-match timestamp;
- `wait_until_all(key, timeout)`: poll `query` until every node matches (bounded).

Use as a context manager, or call `close()`: workers are always stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"

READY_TIMEOUT_SECONDS = 60.0
COMMAND_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 15.0
RECONNECT_BASE_SECONDS = 0.2
RECONNECT_MAX_SECONDS = 2.0


class FleetError(RuntimeError):
    """A worker died, did not answer in time, or reported a failure."""


# -- the parent's side ------------------------------------------------------------------------


@dataclass
class FleetCount:
    """One poll of every worker for one watch."""

    total: int  # simulated nodes
    current: int  # nodes whose ACKed versions match the watch's target right now
    matched: int  # nodes that matched at some point since the watch began
    streams_open: int
    connects: int  # streams opened, reconnects included
    stream_errors: int  # streams that ended with an error (each is retried)
    responses: dict[str, int]  # by type URL, since the fleet started
    response_bytes: int
    last_errors: list[str]
    times: dict[str, float] = field(default_factory=dict)  # node id -> first match (epoch s)

    @property
    def all_current(self) -> bool:
        return self.current == self.total


@dataclass
class WaitResult:
    ok: bool  # every node matched before the timeout
    waited: float  # wall seconds the parent polled
    count: FleetCount


class SimulatedFleet:
    def __init__(
        self,
        xds_target: str,
        nodes: int,
        *,
        group: str = "bench",
        workers: int | None = None,
        channels_per_worker: int = 4,
        first_node: int = 0,
    ) -> None:
        if nodes < 1:
            raise ValueError("need at least one node")
        self.xds_target = xds_target
        self.nodes = nodes
        self.group = group
        self.workers = max(1, min(workers or os.cpu_count() or 1, nodes))
        self.channels_per_worker = max(1, channels_per_worker)
        self.first_node = first_node
        self._context = multiprocessing.get_context("spawn")  # never fork a grpc process
        self._procs: list[Any] = []
        self._conns: list[Connection] = []

    def __enter__(self) -> SimulatedFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def node_ids(self, worker: int) -> list[int]:
        per, extra = divmod(self.nodes, self.workers)
        start = worker * per + min(worker, extra)
        size = per + (1 if worker < extra else 0)
        return [self.first_node + i for i in range(start, start + size)]

    def start(self, timeout: float = READY_TIMEOUT_SECONDS) -> SimulatedFleet:
        """Start the worker processes; return once each is ready (nothing connected yet)."""
        try:
            for w in range(self.workers):
                parent_end, child_end = self._context.Pipe()
                proc = self._context.Process(
                    target=_worker_main,
                    args=(
                        child_end,
                        w,
                        self.node_ids(w),
                        self.xds_target,
                        self.group,
                        self.channels_per_worker,
                    ),
                    name=f"sim-fleet-{w}",
                    daemon=True,
                )
                proc.start()
                child_end.close()
                self._procs.append(proc)
                self._conns.append(parent_end)
            for w in range(self.workers):
                self._receive(w, timeout, expect="ready")
        except BaseException:
            self.close()
            raise
        return self

    def connect(self) -> float:
        """Every node opens its stream now (a connect storm). Returns the start (epoch s)."""
        started = time.time()
        self._broadcast(("connect",))
        return started

    def watch(self, key: str, target: dict[str, str]) -> None:
        """Record each node's first time its ACKed versions equal `target` (from now on)."""
        self._broadcast(("watch", key, dict(target)))

    def query(self, key: str, *, times: bool = False) -> FleetCount:
        replies = self._broadcast(("query", key, times))
        count = FleetCount(
            total=self.nodes,
            current=0,
            matched=0,
            streams_open=0,
            connects=0,
            stream_errors=0,
            responses={},
            response_bytes=0,
            last_errors=[],
        )
        for reply in replies:
            count.current += reply["current"]
            count.matched += reply["matched"]
            count.streams_open += reply["streams_open"]
            count.connects += reply["connects"]
            count.stream_errors += reply["stream_errors"]
            count.response_bytes += reply["response_bytes"]
            for type_url, n in reply["responses"].items():
                count.responses[type_url] = count.responses.get(type_url, 0) + n
            count.last_errors.extend(reply["last_errors"])
            count.times.update(reply["times"])
        return count

    def lagging(self, key: str, limit: int = 10) -> list[dict[str, Any]]:
        """Up to `limit` nodes not matching the watch right now, with what they hold."""
        out: list[dict[str, Any]] = []
        for reply in self._broadcast(("lagging", key, limit)):
            out.extend(reply)
        return out[:limit]

    def wait_until_all(self, key: str, timeout: float, *, poll: float = 0.05) -> WaitResult:
        """Poll until every node's ACKed versions match the watch `key` (or `timeout`)."""
        started = time.monotonic()
        while True:
            count = self.query(key)
            waited = time.monotonic() - started
            if count.all_current:
                return WaitResult(True, waited, self.query(key, times=True))
            if waited >= timeout:
                return WaitResult(False, waited, self.query(key, times=True))
            time.sleep(poll)

    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]

    def close(self) -> None:
        """Stop every worker: ask, then terminate, then kill. Safe to call twice."""
        for conn in self._conns:
            with contextlib.suppress(OSError, ValueError):
                conn.send(("stop",))
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        for proc in self._procs:
            proc.join(max(0.1, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []

    def _broadcast(self, command: tuple[Any, ...]) -> list[Any]:
        for w, conn in enumerate(self._conns):
            try:
                conn.send(command)
            except (OSError, ValueError) as error:
                raise FleetError(f"worker {w} is gone: {error}") from None
        return [self._receive(w, COMMAND_TIMEOUT_SECONDS) for w in range(len(self._conns))]

    def _receive(self, w: int, timeout: float, expect: str | None = None) -> Any:
        conn, proc = self._conns[w], self._procs[w]
        deadline = time.monotonic() + timeout
        while not conn.poll(0.1):
            if not proc.is_alive():
                raise FleetError(f"worker {w} exited with {proc.exitcode}")
            if time.monotonic() >= deadline:
                raise FleetError(f"worker {w} did not answer within {timeout:g}s")
        try:
            kind, payload = conn.recv()
        except EOFError:
            raise FleetError(f"worker {w} closed its pipe (exit {proc.exitcode})") from None
        if kind == "error":
            raise FleetError(f"worker {w}: {payload}")
        if expect is not None and kind != expect:
            raise FleetError(f"worker {w} answered {kind!r}, expected {expect!r}")
        return payload


# -- the worker's side ------------------------------------------------------------------------


def _worker_main(
    conn: Connection,
    index: int,
    node_ids: list[int],
    xds_target: str,
    group: str,
    channels: int,
) -> None:
    # The parent owns Ctrl-C and stops us through the pipe (or terminates us).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        asyncio.run(_Worker(conn, index, node_ids, xds_target, group, channels).run())
    except Exception as error:  # report, then die: the parent sees the exit
        with contextlib.suppress(Exception):
            conn.send(("error", f"{type(error).__name__}: {error}"))
        raise


@dataclass
class _Watch:
    target: dict[str, str]
    times: dict[str, float] = field(default_factory=dict)


class _Worker:
    def __init__(
        self,
        conn: Connection,
        index: int,
        node_ids: list[int],
        xds_target: str,
        group: str,
        channels: int,
    ) -> None:
        self.conn = conn
        self.index = index
        self.node_ids = node_ids
        self.xds_target = xds_target
        self.group = group
        self.channel_count = channels
        self.watches: dict[str, _Watch] = {}
        self.nodes: list[_SimEnvoy] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.channels: list[Any] = []
        self.stopped: asyncio.Event | None = None
        # counters
        self.streams_open = 0
        self.connects = 0
        self.stream_errors = 0
        self.responses: dict[str, int] = {}
        self.response_bytes = 0
        self.last_errors: list[str] = []

    async def run(self) -> None:
        import grpc

        self.stopped = asyncio.Event()
        options = [
            # Separate channels must be separate TCP connections.
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.max_receive_message_length", 256 << 20),
            ("grpc.enable_retries", 0),
        ]
        self.channels = [
            grpc.aio.insecure_channel(self.xds_target, options=[*options, ("bench.channel", k)])
            for k in range(min(self.channel_count, len(self.node_ids)))
        ]
        self.nodes = [
            _SimEnvoy(self, node_id, self.channels[k % len(self.channels)])
            for k, node_id in enumerate(self.node_ids)
        ]
        loop = asyncio.get_running_loop()
        loop.add_reader(self.conn.fileno(), self._on_command)
        self._reply("ready", None)
        try:
            await self.stopped.wait()
        finally:
            loop.remove_reader(self.conn.fileno())
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            for channel in self.channels:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(channel.close(), 5)

    def _reply(self, kind: str, payload: Any) -> None:
        self.conn.send((kind, payload))

    def _on_command(self) -> None:
        try:
            command = self.conn.recv()
        except EOFError:  # the parent is gone
            assert self.stopped is not None
            self.stopped.set()
            return
        try:
            self._dispatch(command)
        except Exception as error:
            self._reply("error", f"{type(error).__name__}: {error}")

    def _dispatch(self, command: tuple[Any, ...]) -> None:
        name = command[0]
        if name == "connect":
            if not self.tasks:
                self.tasks = [asyncio.create_task(node.run()) for node in self.nodes]
            self._reply("ok", None)
        elif name == "watch":
            _, key, target = command
            watch = self.watches[key] = _Watch(target)
            now = time.time()
            for node in self.nodes:
                if node.matches(target):
                    watch.times[node.node_id] = now
            self._reply("ok", None)
        elif name == "query":
            _, key, with_times = command
            watch = self.watches.get(key)
            if watch is None:
                raise KeyError(f"no watch {key!r}")
            self._reply(
                "count",
                {
                    "current": sum(node.matches(watch.target) for node in self.nodes),
                    "matched": len(watch.times),
                    "times": dict(watch.times) if with_times else {},
                    "streams_open": self.streams_open,
                    "connects": self.connects,
                    "stream_errors": self.stream_errors,
                    "responses": dict(self.responses),
                    "response_bytes": self.response_bytes,
                    "last_errors": list(self.last_errors[-3:]),
                },
            )
        elif name == "lagging":
            _, key, limit = command
            target = self.watches[key].target
            self._reply(
                "lagging",
                [
                    {"node": n.node_id, "acked": dict(n.acked), "connected": n.connected}
                    for n in self.nodes
                    if not n.matches(target)
                ][:limit],
            )
        elif name == "stop":
            assert self.stopped is not None
            self.stopped.set()
        else:
            raise ValueError(f"unknown command {name!r}")

    def acked(self, node: _SimEnvoy) -> None:
        """A node ACKed something: note the first time it matches each watch."""
        now = time.time()
        for watch in self.watches.values():
            if node.node_id not in watch.times and node.matches(watch.target):
                watch.times[node.node_id] = now

    def stream_error(self, text: str) -> None:
        self.stream_errors += 1
        self.last_errors = [*self.last_errors[-9:], text]


class _SimEnvoy:
    """One simulated Envoy: one ADS stream, reconnected with backoff if it fails."""

    def __init__(self, worker: _Worker, index: int, channel: Any) -> None:
        from envoy.config.core.v3 import base_pb2

        self.worker = worker
        self.channel = channel
        self.node_id = f"sim-{index}"
        self.node = base_pb2.Node(
            id=self.node_id, cluster=worker.group, user_agent_name="envoy-sim"
        )
        self.acked: dict[str, str] = {}  # type URL -> last ACKed version_info
        self.names: dict[str, list[str]] = {EDS: [], RDS: []}
        self.clusters: dict[str, bytes] = {}  # name -> serialized Cluster (to spot changes)
        self.connected = False

    def matches(self, target: dict[str, str]) -> bool:
        acked = self.acked
        return all(acked.get(t) == v for t, v in target.items())

    async def run(self) -> None:
        import grpc

        backoff = RECONNECT_BASE_SECONDS
        while True:
            try:
                await self._stream()
                self.worker.stream_error(f"{self.node_id}: stream ended by the server")
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as error:
                where = (error.debug_error_string() or "")[:300]
                self.worker.stream_error(
                    f"{self.node_id}: {error.code().name}: {error.details()} ({where})"
                )
            except Exception as error:
                self.worker.stream_error(f"{self.node_id}: {type(error).__name__}: {error}")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RECONNECT_MAX_SECONDS)

    async def _stream(self) -> None:
        import grpc
        from envoy.service.discovery.v3 import discovery_pb2

        call = self.channel.stream_stream(
            ADS_METHOD,
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
        )()
        nonces: dict[str, str] = {}  # per stream: the latest nonce of each type
        first = True

        def request(
            type_url: str, names: list[str] | None = None, *, nonce: str = ""
        ) -> discovery_pb2.DiscoveryRequest:
            nonlocal first
            req = discovery_pb2.DiscoveryRequest(
                type_url=type_url,
                version_info=self.acked.get(type_url, ""),
                resource_names=names or [],
                response_nonce=nonce,
            )
            if first:
                req.node.CopyFrom(self.node)
                first = False
            return req

        worker = self.worker
        worker.connects += 1
        worker.streams_open += 1
        self.connected = True
        try:
            # Initial requests: wildcard CDS and LDS; after a reconnect also the EDS/RDS
            # names held (Envoy re-sends its subscriptions with the versions it holds).
            await call.write(request(CDS))
            if self.names[EDS]:
                await call.write(request(EDS, self.names[EDS]))
            await call.write(request(LDS))
            if self.names[RDS]:
                await call.write(request(RDS, self.names[RDS]))
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    return
                type_url = response.type_url
                worker.responses[type_url] = worker.responses.get(type_url, 0) + 1
                worker.response_bytes += response.ByteSize()
                nonces[type_url] = response.nonce
                # Subscription changes go out before the ACK that caused them, as in Envoy.
                if type_url == CDS and self._clusters_changed(response):
                    await call.write(request(EDS, self.names[EDS], nonce=nonces.get(EDS, "")))
                elif type_url == LDS and self._route_names_changed(response):
                    await call.write(request(RDS, self.names[RDS], nonce=nonces.get(RDS, "")))
                # The ACK: same type, the response's version and nonce, the names asked for.
                ack = discovery_pb2.DiscoveryRequest(
                    type_url=type_url,
                    version_info=response.version_info,
                    response_nonce=response.nonce,
                    resource_names=self.names.get(type_url, []),
                )
                if first:
                    ack.node.CopyFrom(self.node)
                    first = False
                await call.write(ack)
                self.acked[type_url] = response.version_info
                worker.acked(self)
        finally:
            self.connected = False
            worker.streams_open -= 1
            call.cancel()

    def _clusters_changed(self, response: Any) -> bool:
        """Decode the clusters; True when Envoy would (re)subscribe EDS."""
        from envoy.config.cluster.v3 import cluster_pb2

        clusters: dict[str, bytes] = {}
        eds_names: list[str] = []
        for item in response.resources:
            cluster = cluster_pb2.Cluster.FromString(item.value)
            clusters[cluster.name] = item.value
            if cluster.type == cluster_pb2.Cluster.EDS or cluster.HasField("eds_cluster_config"):
                eds_names.append(cluster.eds_cluster_config.service_name or cluster.name)
        eds_names.sort()
        added_or_changed = any(self.clusters.get(n) != body for n, body in clusters.items())
        changed = eds_names != self.names[EDS] or (added_or_changed and bool(eds_names))
        self.clusters = clusters
        self.names[EDS] = eds_names
        return changed

    def _route_names_changed(self, response: Any) -> bool:
        """Decode the listeners' HttpConnectionManagers; True when the RDS names changed."""
        from envoy.config.listener.v3 import listener_pb2
        from envoy.extensions.filters.network.http_connection_manager.v3 import (
            http_connection_manager_pb2 as hcm_pb2,
        )

        names: set[str] = set()
        for item in response.resources:
            listener = listener_pb2.Listener.FromString(item.value)
            chains = [*listener.filter_chains]
            if listener.HasField("default_filter_chain"):
                chains.append(listener.default_filter_chain)
            for chain in chains:
                for network_filter in chain.filters:
                    typed = network_filter.typed_config
                    if typed.type_url != HCM:
                        continue
                    hcm = hcm_pb2.HttpConnectionManager.FromString(typed.value)
                    if hcm.HasField("rds") and hcm.rds.route_config_name:
                        names.add(hcm.rds.route_config_name)
        route_names = sorted(names)
        changed = route_names != self.names[RDS]
        self.names[RDS] = route_names
        return changed
