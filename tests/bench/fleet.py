"""A fleet of simulated Envoys: real ADS gRPC clients, spread over worker processes.

Each simulated Envoy opens one ADS stream and sends what Envoy 1.40 sends, in the order it
sends it, over state of the world (`protocol="sotw"`, `.../StreamAggregatedResources`) or
delta (`protocol="delta"`, `.../DeltaAggregatedResources`). That is checked, not assumed:
tests/integration/test_simulator_matches_envoy.py records a real Envoy and one simulated
node against the same scripted ADS server (tests/integration/scripted_ads.py: startup,
adding, changing and removing an EDS cluster, a route to a new cluster, a partial NACK, a
start without EDS) and asserts the two request sequences are equal.

What it models (both protocols):
- Startup: it asks for CDS alone (wildcard); LDS only once its first CDS update is done, as
  Envoy's cluster manager initializes before listeners. The first request carries
  Node(id="sim-<i>", cluster=<group>, user_agent_name="envoy-sim").
- After a CDS response it applies the valid clusters and asks for EDS (names =
  eds_cluster_config.service_name or the cluster name) *before* answering, when Envoy does:
  over state of the world when the EDS names changed or an EDS cluster was added or changed
  (a changed cluster is re-created and re-subscribes, so the request repeats the same names,
  version and already-ACKed nonce); over delta it subscribes the names that appeared and
  unsubscribes those that went, and asks nothing for a cluster changed in place.
- Warming: every EDS cluster the update added or changed warms until a response carrying its
  ClusterLoadAssignment arrives, and the answer to the CDS response (ACK or NACK) is held
  until none warms. Then it sends the CDS answer, then (at startup) the LDS request, then the
  ACK of the EDS response that ended the warming. A newer CDS response replaces a held
  answer. With nothing warming, the answer goes at once (at startup after the LDS request).
  Not modelled: initial_fetch_timeout (a cluster whose endpoints never come warms forever).
- Partial NACK: a cluster whose name starts with "invalid-" (INVALID_PREFIX) is rejected, the
  rest of the update is applied; the answer is a NACK with error_detail
  "Error adding/updating cluster(s) NAME: ..." (state of the world: version_info stays the
  last version ACKed), held like an ACK while the valid clusters warm.
- Every other response is ACKed at once (version_info and nonce / response_nonce); after an
  LDS response it first asks for RDS (each HttpConnectionManager's rds.route_config_name)
  when that set changed. A new listener does not hold the LDS ACK.
- Delta keeps each resource's version (Resource.version), drops removed_resources, and
  forgets the versions of names it unsubscribes; its ACK is
  DeltaDiscoveryRequest(type_url, response_nonce).
- On a reconnect (not checked against Envoy) it re-sends every subscription: CDS, the EDS
  names, LDS, the RDS names, with the versions it holds (state of the world: version_info;
  delta: initial_resource_versions).

A node "holds version X of a type" once it wrote the ACK of a response carrying X (for CDS,
the held ACK: a node holds a CDS version only once its clusters have warmed).

Responses are received as bytes and decoded once per distinct response (and once per
distinct resource) in each worker: thousands of nodes receive the same bytes, and a client
that re-decoded them all would take the CPU the server needs on a small machine. What each
node does with the result, and what it sends, is unchanged by that.

The nodes run on `workers` processes (default os.cpu_count()), each one asyncio loop with a
handful of grpc.aio channels (own TCP connections) carrying many streams, so the simulator
does not share the control plane's GIL. The parent talks to each worker over a Pipe:

- `connect(upto)`: start the streams of the first `upto` nodes (default all): a connect
  storm, or one batch of a ramp;
- `watch(key, {type_url: version})`: from now on, each worker records, per node, the first
  time (node-side `time.time()` just after writing the ACK) its ACKed versions match, and the
  first time any node received a response (the first push seen);
- `query(key)`: how many nodes match right now, how many have matched since the watch, and
  (optionally) each node's first-match timestamp;
- `wait_until_all(key, timeout)`: poll `query` until every started node matches (bounded).

Use as a context manager, or call `close()`: workers are always stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
DELTA_ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
PROTOCOLS = ("sotw", "delta")

READY_TIMEOUT_SECONDS = 60.0
COMMAND_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 15.0
RECONNECT_BASE_SECONDS = 0.2
RECONNECT_MAX_SECONDS = 2.0
DECODE_CACHE_ENTRIES = 512  # per worker; cleared when full
# A cluster whose name starts with this is one the simulated Envoy rejects (a partial NACK).
INVALID_PREFIX = "invalid-"


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
    started: int = 0  # nodes whose stream was started (connect)
    first_response: float | None = None  # first response any node got since the watch (epoch s)
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
        xds_target: str | Sequence[str],
        nodes: int,
        *,
        group: str = "bench",
        workers: int | None = None,
        channels_per_worker: int = 4,
        first_node: int = 0,
        protocol: str = "sotw",
    ) -> None:
        if nodes < 1:
            raise ValueError("need at least one node")
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}")
        # Several targets (replicas of one control plane): each worker opens its channels
        # round-robin over them, so the nodes spread evenly.
        self.xds_targets = [xds_target] if isinstance(xds_target, str) else list(xds_target)
        if not self.xds_targets:
            raise ValueError("need at least one xDS target")
        self.nodes = nodes
        self.group = group
        self.workers = max(1, min(workers or os.cpu_count() or 1, nodes))
        self.channels_per_worker = max(len(self.xds_targets), channels_per_worker)
        self.first_node = first_node
        self.protocol = protocol
        self.started = 0
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
                        self.xds_targets,
                        self.group,
                        self.channels_per_worker,
                        self.protocol,
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

    def connect(self, upto: int | None = None) -> float:
        """Start the streams of the first `upto` nodes (default every node) at once: a connect
        storm, or a batch of a ramp. Returns the start (epoch s); `self.started` counts."""
        started = time.time()
        share = 1.0 if upto is None else max(0, min(upto, self.nodes)) / self.nodes
        self.started = sum(self._broadcast(("connect", share)))
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
            count.started += reply["started"]
            count.streams_open += reply["streams_open"]
            count.connects += reply["connects"]
            count.stream_errors += reply["stream_errors"]
            count.response_bytes += reply["response_bytes"]
            for type_url, n in reply["responses"].items():
                count.responses[type_url] = count.responses.get(type_url, 0) + n
            count.last_errors.extend(reply["last_errors"])
            count.times.update(reply["times"])
            first = reply["first_response"]
            if first is not None and (count.first_response is None or first < count.first_response):
                count.first_response = first
        return count

    def lagging(self, key: str, limit: int = 10) -> list[dict[str, Any]]:
        """Up to `limit` nodes not matching the watch right now, with what they hold."""
        out: list[dict[str, Any]] = []
        for reply in self._broadcast(("lagging", key, limit)):
            out.extend(reply)
        return out[:limit]

    def wait_until_all(
        self, key: str, timeout: float, *, poll: float = 0.05, at_least: int | None = None
    ) -> WaitResult:
        """Poll until every node's ACKed versions match the watch `key` (or `timeout`); with
        `at_least`, until that many do (e.g. the nodes started so far in a ramp)."""
        want = self.nodes if at_least is None else at_least
        started = time.monotonic()
        while True:
            count = self.query(key)
            waited = time.monotonic() - started
            if count.current >= want:
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
    xds_targets: list[str],
    group: str,
    channels: int,
    protocol: str,
) -> None:
    # The parent owns Ctrl-C and stops us through the pipe (or terminates us).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        worker = _Worker(conn, index, node_ids, xds_targets, group, channels, protocol)
        asyncio.run(worker.run())
    except Exception as error:  # report, then die: the parent sees the exit
        with contextlib.suppress(Exception):
            conn.send(("error", f"{type(error).__name__}: {error}"))
        raise


@dataclass
class _Watch:
    target: dict[str, str]
    times: dict[str, float] = field(default_factory=dict)
    first_response: float | None = None


@dataclass(frozen=True)
class _Sotw:
    """A decoded state-of-the-world response (shared by every node that got these bytes)."""

    type_url: str
    version: str
    nonce: str
    clusters: dict[str, bytes] | None = None  # CDS: name -> serialized Cluster (valid ones)
    eds_of: dict[str, str] | None = None  # CDS: EDS cluster name -> its EDS service name
    eds_names: list[str] | None = None  # CDS: sorted EDS service names
    error: str = ""  # CDS: why clusters were rejected ("": none was)
    route_names: list[str] | None = None  # LDS: sorted RDS names
    loaded: frozenset[str] = frozenset()  # EDS: the ClusterLoadAssignments it carries


@dataclass(frozen=True)
class _Delta:
    """A decoded delta response (shared by every node that got these bytes)."""

    type_url: str
    version: str  # system_version_info
    nonce: str
    resources: tuple[tuple[str, str], ...]  # (name, version), rejected clusters left out
    removed: tuple[str, ...]
    # CDS: name -> (name, EDS service name or None, serialized Cluster); LDS: name -> RDS names
    derived: dict[str, Any] = field(default_factory=dict)
    error: str = ""  # CDS: why clusters were rejected ("": none was)


def _rejection(names: list[str]) -> str:
    """The error_detail of a NACK for the clusters `names` (empty: no NACK), in Envoy's words."""
    if not names:
        return ""
    return (
        f"Error adding/updating cluster(s) {', '.join(names)}: simulated rejection "
        f"(the name starts with {INVALID_PREFIX!r})"
    )


# The clusters a node holds before its first CDS response: one shared object, never mutated,
# so that the first change is worked out once per worker (see _Worker.cluster_changes).
_NO_CLUSTERS: dict[str, bytes] = {}


class _Worker:
    def __init__(
        self,
        conn: Connection,
        index: int,
        node_ids: list[int],
        xds_targets: list[str],
        group: str,
        channels: int,
        protocol: str,
    ) -> None:
        self.conn = conn
        self.index = index
        self.node_ids = node_ids
        self.xds_targets = xds_targets
        self.group = group
        self.channel_count = channels
        self.protocol = protocol
        self.watches: dict[str, _Watch] = {}
        self.awaiting_first: list[_Watch] = []  # watches that saw no response yet
        self.nodes: list[_SimEnvoy] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.channels: list[Any] = []
        self.stopped: asyncio.Event | None = None
        self._decoded: dict[bytes, Any] = {}
        self._clusters: dict[bytes, tuple[str, str | None, bytes]] = {}
        self._listeners: dict[bytes, tuple[str, tuple[str, ...]]] = {}
        # (id(old), id(new)) -> (old, new, EDS names added or changed): see cluster_changes
        self._changes: dict[tuple[int, int], tuple[Any, Any, frozenset[str]]] = {}
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
            grpc.aio.insecure_channel(
                self.xds_targets[k % len(self.xds_targets)],
                options=[*options, ("bench.channel", k)],
            )
            for k in range(min(self.channel_count, len(self.node_ids)))
        ]
        kind = _DeltaEnvoy if self.protocol == "delta" else _SotwEnvoy
        self.nodes = [
            kind(self, node_id, self.channels[k % len(self.channels)])
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
            _, share = command
            upto = min(len(self.nodes), math.ceil(len(self.nodes) * share - 1e-9))
            for node in self.nodes[len(self.tasks) : upto]:
                self.tasks.append(asyncio.create_task(node.run()))
            self._reply("ok", len(self.tasks))
        elif name == "watch":
            _, key, target = command
            watch = self.watches[key] = _Watch(target)
            self.awaiting_first.append(watch)
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
                    "first_response": watch.first_response,
                    "started": len(self.tasks),
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

    def received(self, type_url: str, size: int) -> None:
        self.responses[type_url] = self.responses.get(type_url, 0) + 1
        self.response_bytes += size
        if self.awaiting_first:
            now = time.time()
            for watch in self.awaiting_first:
                watch.first_response = now
            self.awaiting_first = []

    def acked(self, node: _SimEnvoy) -> None:
        """A node ACKed something: note the first time it matches each watch."""
        now = time.time()
        for watch in self.watches.values():
            if node.node_id not in watch.times and node.matches(watch.target):
                watch.times[node.node_id] = now

    def stream_error(self, text: str) -> None:
        self.stream_errors += 1
        self.last_errors = [*self.last_errors[-9:], text]

    # -- decoding, once per distinct bytes ---------------------------------------------------

    def _remember(self, raw: bytes, decoded: Any) -> Any:
        if len(self._decoded) >= DECODE_CACHE_ENTRIES:
            self._decoded.clear()
        self._decoded[raw] = decoded
        return decoded

    def decode_sotw(self, raw: bytes) -> _Sotw:
        found = self._decoded.get(raw)
        if found is not None:
            return found
        from envoy.service.discovery.v3 import discovery_pb2

        response = discovery_pb2.DiscoveryResponse.FromString(raw)
        type_url = response.type_url
        decoded = _Sotw(type_url, response.version_info, response.nonce)
        if type_url == CDS:
            clusters: dict[str, bytes] = {}
            eds_of: dict[str, str] = {}
            rejected: list[str] = []
            for item in response.resources:
                name, eds_name, body = self.cluster(item.value)
                if name.startswith(INVALID_PREFIX):
                    rejected.append(name)
                    continue
                clusters[name] = body
                if eds_name is not None:
                    eds_of[name] = eds_name
            decoded = _Sotw(
                type_url,
                decoded.version,
                decoded.nonce,
                clusters=clusters,
                eds_of=eds_of,
                eds_names=sorted(set(eds_of.values())),
                error=_rejection(rejected),
            )
        elif type_url == EDS:
            from envoy.config.endpoint.v3 import endpoint_pb2

            parse = endpoint_pb2.ClusterLoadAssignment.FromString
            loaded = frozenset(parse(item.value).cluster_name for item in response.resources)
            decoded = _Sotw(type_url, decoded.version, decoded.nonce, loaded=loaded)
        elif type_url == LDS:
            names: set[str] = set()
            for item in response.resources:
                names.update(self.listener(item.value)[1])
            decoded = _Sotw(type_url, decoded.version, decoded.nonce, route_names=sorted(names))
        return self._remember(raw, decoded)

    def decode_delta(self, raw: bytes) -> _Delta:
        found = self._decoded.get(raw)
        if found is not None:
            return found
        from envoy.service.discovery.v3 import discovery_pb2

        response = discovery_pb2.DeltaDiscoveryResponse.FromString(raw)
        type_url = response.type_url
        derived: dict[str, Any] = {}
        rejected: list[str] = []
        if type_url == CDS:
            for item in response.resources:
                if item.name.startswith(INVALID_PREFIX):
                    rejected.append(item.name)
                else:
                    derived[item.name] = self.cluster(item.resource.value)
        elif type_url == LDS:
            for item in response.resources:
                derived[item.name] = self.listener(item.resource.value)[1]
        decoded = _Delta(
            type_url,
            response.system_version_info,
            response.nonce,
            tuple(
                (item.name, item.version)
                for item in response.resources
                if not (rejected and item.name.startswith(INVALID_PREFIX))
            ),
            tuple(response.removed_resources),
            derived,
            _rejection(rejected),
        )
        return self._remember(raw, decoded)

    def cluster_changes(self, old: dict[str, bytes], response: _Sotw) -> frozenset[str]:
        """The EDS service names of the clusters a CDS response adds or changes relative to
        `old` (what a node held): worked out once per worker for each pair, since every node
        goes through the same ones."""
        new = response.clusters
        assert new is not None and response.eds_of is not None
        key = (id(old), id(new))
        found = self._changes.get(key)
        if found is None or found[0] is not old or found[1] is not new:
            eds_of = response.eds_of
            names = frozenset(
                eds_of[n] for n, body in new.items() if n in eds_of and old.get(n) != body
            )
            if len(self._changes) >= DECODE_CACHE_ENTRIES:
                self._changes.clear()
            found = self._changes[key] = (old, new, names)
        return found[2]

    def cluster(self, body: bytes) -> tuple[str, str | None, bytes]:
        """(name, EDS service name or None, the shared body) of a serialized Cluster."""
        found = self._clusters.get(body)
        if found is None:
            from envoy.config.cluster.v3 import cluster_pb2

            cluster = cluster_pb2.Cluster.FromString(body)
            eds_name = None
            if cluster.type == cluster_pb2.Cluster.EDS or cluster.HasField("eds_cluster_config"):
                eds_name = cluster.eds_cluster_config.service_name or cluster.name
            if len(self._clusters) >= 100 * DECODE_CACHE_ENTRIES:
                self._clusters.clear()
            found = self._clusters[body] = (cluster.name, eds_name, body)
        return found

    def listener(self, body: bytes) -> tuple[str, tuple[str, ...]]:
        """(name, RDS names of its HttpConnectionManagers) of a serialized Listener."""
        found = self._listeners.get(body)
        if found is None:
            from envoy.config.listener.v3 import listener_pb2
            from envoy.extensions.filters.network.http_connection_manager.v3 import (
                http_connection_manager_pb2 as hcm_pb2,
            )

            listener = listener_pb2.Listener.FromString(body)
            chains = [*listener.filter_chains]
            if listener.HasField("default_filter_chain"):
                chains.append(listener.default_filter_chain)
            names: set[str] = set()
            for chain in chains:
                for network_filter in chain.filters:
                    typed = network_filter.typed_config
                    if typed.type_url != HCM:
                        continue
                    hcm = hcm_pb2.HttpConnectionManager.FromString(typed.value)
                    if hcm.HasField("rds") and hcm.rds.route_config_name:
                        names.add(hcm.rds.route_config_name)
            if len(self._listeners) >= 100 * DECODE_CACHE_ENTRIES:
                self._listeners.clear()
            found = self._listeners[body] = (listener.name, tuple(sorted(names)))
        return found


class _SimEnvoy:
    """One simulated Envoy: one ADS stream, reconnected with backoff if it fails.

    What both protocols share (see the module docstring): `warming` holds the EDS names of
    the clusters added or changed by CDS whose ClusterLoadAssignment has not arrived yet; the
    answer (ACK or NACK) to a CDS response is held while it is not empty; `initialized`
    turns true when the first CDS update is done, which is when Envoy subscribes LDS.
    """

    def __init__(self, worker: _Worker, index: int, channel: Any) -> None:
        from envoy.config.core.v3 import base_pb2

        self.worker = worker
        self.channel = channel
        self.node_id = f"sim-{index}"
        self.node = base_pb2.Node(
            id=self.node_id, cluster=worker.group, user_agent_name="envoy-sim"
        )
        self.acked: dict[str, str] = {}  # type URL -> version of the last response ACKed
        self.connected = False
        self.initialized = False  # the first CDS update is done (LDS was subscribed)
        self.warming: set[str] = set()  # EDS names awaited by added or changed clusters

    def matches(self, target: dict[str, str]) -> bool:
        acked = self.acked
        return all(acked.get(t) == v for t, v in target.items())

    async def run(self) -> None:
        import grpc

        backoff = RECONNECT_BASE_SECONDS
        while True:
            worker = self.worker
            worker.connects += 1
            worker.streams_open += 1
            self.connected = True
            try:
                await self._stream()
                worker.stream_error(f"{self.node_id}: stream ended by the server")
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as error:
                where = (error.debug_error_string() or "")[:300]
                worker.stream_error(
                    f"{self.node_id}: {error.code().name}: {error.details()} ({where})"
                )
            except Exception as error:
                worker.stream_error(f"{self.node_id}: {type(error).__name__}: {error}")
            finally:
                self.connected = False
                worker.streams_open -= 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RECONNECT_MAX_SECONDS)

    async def _stream(self) -> None:
        raise NotImplementedError

    async def _answer_cds(self, call: Any, answer: _CdsAnswer) -> None:
        await call.write(answer.request)
        if answer.version is not None:
            self.acked[CDS] = answer.version
            self.worker.acked(self)

    async def _subscribe_listeners(self, call: Any, lds_request: Callable[[], Any]) -> None:
        """Ask for LDS once, when the first CDS update is done (as Envoy's init does)."""
        if not self.initialized:
            self.initialized = True
            await call.write(lds_request())

    def _loaded(self, names: Any) -> bool:
        """ClusterLoadAssignments `names` arrived: True when that ended the warming."""
        if not self.warming:
            return False
        self.warming.difference_update(names)
        return not self.warming


@dataclass(frozen=True, slots=True)
class _CdsAnswer:
    """The answer to a CDS response, written at once or held while clusters warm."""

    request: Any  # the DiscoveryRequest / DeltaDiscoveryRequest to write
    version: str | None  # the version it ACKs (None: a NACK)


class _SotwEnvoy(_SimEnvoy):
    def __init__(self, worker: _Worker, index: int, channel: Any) -> None:
        super().__init__(worker, index, channel)
        self.names: dict[str, list[str]] = {EDS: [], RDS: []}
        self.clusters: dict[str, bytes] = _NO_CLUSTERS  # the CDS response's (shared) dict

    async def _stream(self) -> None:
        import grpc
        from envoy.service.discovery.v3 import discovery_pb2

        Request = discovery_pb2.DiscoveryRequest
        call = self.channel.stream_stream(
            ADS_METHOD,
            request_serializer=Request.SerializeToString,
            response_deserializer=None,  # bytes: decoded once per worker (decode_sotw)
        )()
        nonces: dict[str, str] = {}  # per stream: the latest nonce of each type
        held: _CdsAnswer | None = None  # the CDS answer held while clusters warm
        first = True

        def request(type_url: str, names: list[str] | None = None, *, nonce: str = "") -> Any:
            nonlocal first
            req = Request(
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
        try:
            # Envoy asks for CDS alone, and for LDS once its first CDS update is done. On a
            # reconnect it re-sends every subscription with the versions it holds.
            await call.write(request(CDS))
            if self.initialized:
                if self.names[EDS]:
                    await call.write(request(EDS, self.names[EDS]))
                await call.write(request(LDS))
                if self.names[RDS]:
                    await call.write(request(RDS, self.names[RDS]))
            while True:
                raw = await call.read()
                if raw is grpc.aio.EOF:
                    return
                response = worker.decode_sotw(raw)
                type_url = response.type_url
                worker.received(type_url, len(raw))
                nonces[type_url] = response.nonce
                if type_url == CDS:
                    # Subscription changes go out before the answer, as in Envoy.
                    if self._apply_clusters(response):
                        await call.write(request(EDS, self.names[EDS], nonce=nonces.get(EDS, "")))
                    if response.error:  # version_info stays the last version ACKed
                        nack = request(CDS, nonce=response.nonce)
                        nack.error_detail.code = 3  # INVALID_ARGUMENT
                        nack.error_detail.message = response.error
                        answer = _CdsAnswer(nack, None)
                    else:
                        ack = request(CDS, nonce=response.nonce)
                        ack.version_info = response.version
                        answer = _CdsAnswer(ack, response.version)
                    if self.warming:  # held until the last warming cluster gets its endpoints
                        held = answer
                        continue
                    held = None
                    # Envoy's initialization ends within the update: LDS before the answer.
                    await self._subscribe_listeners(call, lambda: request(LDS))
                    await self._answer_cds(call, answer)
                    continue
                if type_url == EDS:
                    if self._loaded(response.loaded) and held is not None:
                        # Warming done: the CDS answer, then (at startup) LDS, then this ACK.
                        await self._answer_cds(call, held)
                        held = None
                        await self._subscribe_listeners(call, lambda: request(LDS))
                elif type_url == LDS and self._route_names_changed(response):
                    await call.write(request(RDS, self.names[RDS], nonce=nonces.get(RDS, "")))
                # The ACK: same type, the response's version and nonce, the names asked for.
                ack = Request(
                    type_url=type_url,
                    version_info=response.version,
                    response_nonce=response.nonce,
                    resource_names=self.names.get(type_url, []),
                )
                await call.write(ack)
                self.acked[type_url] = response.version
                worker.acked(self)
        finally:
            call.cancel()

    def _apply_clusters(self, response: _Sotw) -> bool:
        """Hold the response's valid clusters; start warming the EDS clusters it adds or
        changes (Envoy re-creates those). True when Envoy would send an EDS request: the EDS
        names changed, or a cluster was added or re-created (then even with the same names)."""
        clusters, eds_names = response.clusters, response.eds_names
        assert clusters is not None and eds_names is not None
        if clusters is self.clusters:
            return False
        added = self.worker.cluster_changes(self.clusters, response)
        changed = eds_names != self.names[EDS]
        if self.warming and changed:  # a removed cluster warms no more
            self.warming.intersection_update(eds_names)
        if added:
            self.warming.update(added)
        self.clusters = clusters
        self.names[EDS] = eds_names
        return changed or bool(added)

    def _route_names_changed(self, response: _Sotw) -> bool:
        assert response.route_names is not None
        changed = response.route_names != self.names[RDS]
        self.names[RDS] = response.route_names
        return changed


class _DeltaEnvoy(_SimEnvoy):
    def __init__(self, worker: _Worker, index: int, channel: Any) -> None:
        super().__init__(worker, index, channel)
        # What the node holds: per type, resource name -> version (Resource.version).
        self.versions: dict[str, dict[str, str]] = {t: {} for t in (CDS, EDS, LDS, RDS)}
        self.names: dict[str, set[str]] = {EDS: set(), RDS: set()}  # subscribed
        # held cluster -> (name, its EDS name or None, serialized Cluster), shared per worker
        self.clusters: dict[str, tuple[str, str | None, bytes]] = {}
        self.listeners: dict[str, tuple[str, ...]] = {}  # held listener -> its RDS names

    async def _stream(self) -> None:
        import grpc
        from envoy.service.discovery.v3 import discovery_pb2

        Request = discovery_pb2.DeltaDiscoveryRequest
        call = self.channel.stream_stream(
            DELTA_ADS_METHOD,
            request_serializer=Request.SerializeToString,
            response_deserializer=None,  # bytes: decoded once per worker (decode_delta)
        )()
        held: _CdsAnswer | None = None  # the CDS answer held while clusters warm
        first = True

        def initial(type_url: str, names: set[str] | None) -> Any:
            nonlocal first
            req = Request(
                type_url=type_url,
                resource_names_subscribe=sorted(names or ()),
                initial_resource_versions=self.versions[type_url],
            )
            if first:
                req.node.CopyFrom(self.node)
                first = False
            return req

        worker = self.worker
        try:
            # Envoy asks for CDS alone, and for LDS once its first CDS update is done. On a
            # reconnect it re-sends every subscription, with the versions it holds.
            await call.write(initial(CDS, None))
            if self.initialized:
                if self.names[EDS]:
                    await call.write(initial(EDS, self.names[EDS]))
                await call.write(initial(LDS, None))
                if self.names[RDS]:
                    await call.write(initial(RDS, self.names[RDS]))
            while True:
                raw = await call.read()
                if raw is grpc.aio.EOF:
                    return
                response = worker.decode_delta(raw)
                type_url = response.type_url
                worker.received(type_url, len(raw))
                versions = self.versions.setdefault(type_url, {})
                versions.update(response.resources)
                for name in response.removed:
                    versions.pop(name, None)
                if type_url == CDS:
                    # Subscription changes go out before the answer, as in Envoy.
                    change = self._apply_clusters(response)
                    if change is not None:
                        await call.write(self._subscription(Request, EDS, *change))
                    answer = Request(type_url=CDS, response_nonce=response.nonce)
                    if response.error:
                        answer.error_detail.code = 3  # INVALID_ARGUMENT
                        answer.error_detail.message = response.error
                    cds = _CdsAnswer(answer, None if response.error else response.version)
                    if self.warming:  # held until the last warming cluster gets its endpoints
                        held = cds
                        continue
                    held = None
                    # Envoy's initialization ends within the update: LDS before the answer.
                    await self._subscribe_listeners(call, lambda: initial(LDS, None))
                    await self._answer_cds(call, cds)
                    continue
                if type_url == EDS:
                    if self._loaded(n for n, _ in response.resources) and held is not None:
                        # Warming done: the CDS answer, then (at startup) LDS, then this ACK.
                        await self._answer_cds(call, held)
                        held = None
                        await self._subscribe_listeners(call, lambda: initial(LDS, None))
                elif type_url == LDS:
                    change = self._apply_listeners(response)
                    if change is not None:
                        await call.write(self._subscription(Request, RDS, *change))
                await call.write(Request(type_url=type_url, response_nonce=response.nonce))
                self.acked[type_url] = response.version
                worker.acked(self)
        finally:
            call.cancel()

    @staticmethod
    def _subscription(
        Request: Any, type_url: str, subscribe: list[str], unsubscribe: list[str]
    ) -> Any:
        return Request(
            type_url=type_url,
            resource_names_subscribe=subscribe,
            resource_names_unsubscribe=unsubscribe,
        )

    def _apply_clusters(self, response: _Delta) -> tuple[list[str], list[str]] | None:
        """Hold the response's valid clusters, drop the removed ones; start warming the EDS
        clusters it adds or changes (Envoy re-creates those; it does not ask for their EDS
        again). The EDS names to subscribe and unsubscribe, or None when they did not change."""
        held = self.clusters
        for name, cluster in response.derived.items():
            old = held.get(name)
            eds_name = cluster[1]
            if eds_name is not None and (old is None or old[2] != cluster[2]):
                self.warming.add(eds_name)
            held[name] = cluster
        for name in response.removed:
            held.pop(name, None)
        wanted = {cluster[1] for cluster in held.values() if cluster[1] is not None}
        if self.warming:  # a removed cluster warms no more
            self.warming.intersection_update(wanted)
        return self._resubscribe(EDS, wanted)

    def _apply_listeners(self, response: _Delta) -> tuple[list[str], list[str]] | None:
        """Hold the response's listeners; the RDS names to subscribe and unsubscribe, or None."""
        held = self.listeners
        held.update(response.derived)
        for name in response.removed:
            held.pop(name, None)
        return self._resubscribe(RDS, {n for names in held.values() for n in names})

    def _resubscribe(self, dependent: str, wanted: set[str]) -> tuple[list[str], list[str]] | None:
        subscribed = self.names[dependent]
        if wanted == subscribed:
            return None
        subscribe, unsubscribe = sorted(wanted - subscribed), sorted(subscribed - wanted)
        self.names[dependent] = wanted
        versions = self.versions[dependent]
        for name in unsubscribe:  # Envoy forgets what it no longer asks for
            versions.pop(name, None)
        return subscribe, unsubscribe
