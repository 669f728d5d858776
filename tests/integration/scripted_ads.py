"""A scripted ADS server for tests: it serves fixed resources and records every request.

`ScriptedAds(resources).start()` listens on 127.0.0.1 on a port chosen at run time and
serves both ADS methods (state of the world and delta) with generic handlers: requests
arrive as bytes, and every DiscoveryRequest / DeltaDiscoveryRequest is recorded in arrival
order, interleaved with the responses sent, for every stream.

It answers as a plain, eager server does, with no ordering of its own between types:
- state of the world: a request is answered when the type's version or the names asked for
  differ from what the stream was last sent (CDS and LDS without names are wildcards; EDS
  and RDS get the resources named); an ACK or NACK of what was sent gets nothing;
- delta: a request is answered with every subscribed resource whose version differs from
  what the stream holds, plus every resource named in resource_names_subscribe (asked for
  again: sent again); wildcard types also get removed_resources;
- `push(type, resources)` replaces a type's resources under a new version and sends what
  changed to every open stream at once (EDS is never held behind a CDS ACK);
- `resend(type)` sends a type's current resources again (same version, new nonce).

A test drives a scenario with `push`, `resend` and bounded waits (`wait`, `synced`,
`quiet`), then compares `normalize(events)` of two clients (see SCENARIOS and
tests/integration/test_simulator_matches_envoy.py).
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, json_format
from google.protobuf.message import Message

from tests.bench.fleet import CDS, EDS, LDS, RDS
from tests.integration import edge_config

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
SHORT = {CDS: "CDS", EDS: "EDS", LDS: "LDS", RDS: "RDS"}
WILDCARD_TYPES = frozenset((CDS, LDS))
STOP_GRACE_SECONDS = 1.0

# Imported so that json_format resolves the typed_config types of the scenarios' resources.
_TYPES = (router_pb2.Router, hcm_pb2.HttpConnectionManager)


@dataclass
class Event:
    """One request received or one response sent, on one stream."""

    at: float  # time.monotonic()
    stream: int  # 0 for the first stream, 1 after a reconnect, ...
    delta: bool
    incoming: bool  # a request (True) or a response (False)
    type_url: str
    message: Any  # DiscoveryRequest, DeltaDiscoveryRequest, or the response
    # requests only: the latest nonce of this type the stream had been sent when it arrived,
    # and whether an earlier request already carried the same response_nonce.
    latest_nonce: str = ""
    repeated_nonce: bool = False


@dataclass
class _Stream:
    index: int
    delta: bool
    out: queue.Queue[bytes | None] = field(default_factory=queue.Queue)
    open: bool = True
    count: int = 0  # responses sent (the nonces are "1", "2", ...)
    nonces: dict[str, str] = field(default_factory=dict)  # type -> latest nonce sent
    answers: dict[str, bool] = field(default_factory=dict)  # nonce -> ACKed (False: NACKed)
    # state of the world: type -> names asked for (None: wildcard); (version, names) sent
    names: dict[str, frozenset[str] | None] = field(default_factory=dict)
    sent: dict[str, tuple[str, frozenset[str] | None]] = field(default_factory=dict)
    # delta: type -> names subscribed (None: wildcard); name -> version the client holds
    subscribed: dict[str, set[str] | None] = field(default_factory=dict)
    held: dict[str, dict[str, str]] = field(default_factory=dict)


def pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def resource_version(message: Message) -> str:
    return hashlib.sha256(message.SerializeToString(deterministic=True)).hexdigest()[:8]


class ScriptedAds:
    def __init__(self, resources: dict[str, dict[str, Message]]) -> None:
        self._lock = threading.Condition(threading.RLock())
        self.resources = {t: dict(r) for t, r in resources.items()}
        self.versions = dict.fromkeys(self.resources, 1)
        self.events: list[Event] = []
        self.streams: list[_Stream] = []
        self.port = 0
        self._server: grpc.Server | None = None
        self._threads: list[threading.Thread] = []

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> ScriptedAds:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> ScriptedAds:
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="scripted-ads"),
            options=[("grpc.so_reuseport", 0)],
        )
        server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    SERVICE,
                    {
                        "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                            lambda requests, context: self._serve(requests, context, False)
                        ),
                        "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                            lambda requests, context: self._serve(requests, context, True)
                        ),
                    },
                )
            ]
        )
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        with self._lock:
            for stream in self.streams:
                stream.out.put(None)
        if self._server is not None:
            self._server.stop(STOP_GRACE_SECONDS).wait(STOP_GRACE_SECONDS + 5)
            self._server = None
        for thread in self._threads:
            thread.join(5)

    # -- driving a scenario ----------------------------------------------------------------

    def push(self, type_url: str, resources: dict[str, Message]) -> None:
        """Replace a type's resources under a new version; send what changed to every stream."""
        with self._lock:
            self.resources[type_url] = dict(resources)
            self.versions[type_url] = self.versions.get(type_url, 0) + 1
            for stream in self._open_streams():
                self._answer(stream, type_url)

    def resend(self, type_url: str) -> None:
        """Send a type's current resources again to every stream (same version, new nonce)."""
        with self._lock:
            for stream in self._open_streams():
                if stream.delta:
                    names = stream.subscribed.get(type_url)
                    everything = set(self.resources[type_url])
                    self._answer(stream, type_url, force=everything if names is None else names)
                else:
                    self._answer(stream, type_url, force=True)

    def wait(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        """Wait until `condition()` (called under the lock) holds; fail after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not condition():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"timed out after {timeout:g}s waiting for {what}; trace:\n"
                        + "\n".join(trace(self.events))
                    )
                self._lock.wait(min(left, 0.1))

    def quiet(self, seconds: float, timeout: float = 10.0) -> None:
        """Wait until nothing was received or sent for `seconds` (bounded by `timeout`)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                last = self.events[-1].at if self.events else 0.0
                now = time.monotonic()
                if now - last >= seconds:
                    return
                if now >= deadline:
                    raise AssertionError(f"the stream was not quiet for {seconds:g}s")
                self._lock.wait(min(seconds - (now - last), deadline - now) + 0.01)

    def answered(self, type_url: str, *, ok: bool | None = None) -> bool:
        """The latest stream's latest response of this type was answered (ACK or NACK; with
        ok=True an ACK, ok=False a NACK)."""
        with self._lock:
            if not self.streams:
                return False
            stream = self.streams[-1]
            nonce = stream.nonces.get(type_url)
            answer = stream.answers.get(nonce) if nonce else None
            return answer is not None and (ok is None or answer == ok)

    def synced(self) -> bool:
        """An open stream ACKed the latest response of every type the server has."""
        with self._lock:
            return bool(self.streams) and all(self.answered(t, ok=True) for t in self.resources)

    def snapshot(self) -> list[Event]:
        with self._lock:
            return list(self.events)

    # -- the streams -----------------------------------------------------------------------

    def _open_streams(self) -> list[_Stream]:
        return [s for s in self.streams if s.open]

    def _serve(
        self, requests: Iterator[bytes], context: grpc.ServicerContext, delta: bool
    ) -> Iterator[bytes]:
        with self._lock:
            stream = _Stream(len(self.streams), delta)
            self.streams.append(stream)
        reader = threading.Thread(target=self._read, args=(stream, requests), daemon=True)
        self._threads.append(reader)
        reader.start()
        try:
            while context.is_active():
                try:
                    payload = stream.out.get(timeout=0.1)
                except queue.Empty:
                    continue
                if payload is None:
                    return
                yield payload
        finally:
            with self._lock:
                stream.open = False
                self._lock.notify_all()

    def _read(self, stream: _Stream, requests: Iterator[bytes]) -> None:
        parse = (
            discovery_pb2.DeltaDiscoveryRequest if stream.delta else discovery_pb2.DiscoveryRequest
        ).FromString
        try:
            for raw in requests:
                self._on_request(stream, parse(raw))
        except grpc.RpcError:
            pass  # the stream ended
        finally:
            stream.out.put(None)

    def _on_request(self, stream: _Stream, request: Any) -> None:
        with self._lock:
            type_url, nonce = request.type_url, request.response_nonce
            self.events.append(
                Event(
                    time.monotonic(),
                    stream.index,
                    stream.delta,
                    True,
                    type_url,
                    request,
                    latest_nonce=stream.nonces.get(type_url, ""),
                    repeated_nonce=bool(nonce) and nonce in stream.answers,
                )
            )
            if nonce and nonce not in stream.answers:
                stream.answers[nonce] = not request.HasField("error_detail")
            if stream.delta:
                self._delta_request(stream, request)
            else:
                names = frozenset(request.resource_names)
                wildcard = not names and type_url in WILDCARD_TYPES
                stream.names[type_url] = None if wildcard else names
                self._answer(stream, type_url)
            self._lock.notify_all()

    def _delta_request(self, stream: _Stream, request: Any) -> None:
        type_url = request.type_url
        subscribe = set(request.resource_names_subscribe)
        unsubscribe = set(request.resource_names_unsubscribe)
        if type_url not in stream.subscribed:
            wildcard = not subscribe and type_url in WILDCARD_TYPES
            stream.subscribed[type_url] = None if wildcard else set()
            stream.held[type_url] = dict(request.initial_resource_versions)
        names = stream.subscribed[type_url]
        if names is not None:
            names |= subscribe
            names -= unsubscribe
        for name in unsubscribe:
            stream.held[type_url].pop(name, None)
        self._answer(stream, type_url, force=subscribe)

    def _answer(self, stream: _Stream, type_url: str, force: bool | set[str] = False) -> None:
        """Send what the stream is due of this type (state of the world: force=True sends it
        even if unchanged; delta: the names in `force` are sent even if held)."""
        if type_url not in self.resources:
            return
        resources = self.resources[type_url]
        version = str(self.versions[type_url])
        nonce = str(stream.count + 1)
        response: Any
        if stream.delta:
            if type_url not in stream.subscribed:
                return
            names = stream.subscribed[type_url]
            held = stream.held[type_url]
            forced = force if isinstance(force, set) else set()
            current = {n: m for n, m in resources.items() if names is None or n in names}
            changed = sorted(
                n for n, m in current.items() if n in forced or held.get(n) != resource_version(m)
            )
            removed = sorted(n for n in held if n not in current)
            if not changed and not removed:
                return
            for name in changed:
                held[name] = resource_version(current[name])
            for name in removed:
                del held[name]
            response = discovery_pb2.DeltaDiscoveryResponse(
                system_version_info=version,
                type_url=type_url,
                nonce=nonce,
                resources=[
                    discovery_pb2.Resource(name=n, version=held[n], resource=pack(current[n]))
                    for n in changed
                ],
                removed_resources=removed,
            )
        else:
            if type_url not in stream.names:
                return
            names = stream.names[type_url]
            if not force and stream.sent.get(type_url) == (version, names):
                return
            stream.sent[type_url] = (version, names)
            response = discovery_pb2.DiscoveryResponse(
                version_info=version,
                type_url=type_url,
                nonce=nonce,
                resources=[
                    pack(m) for n, m in sorted(resources.items()) if names is None or n in names
                ],
            )
        stream.count += 1
        stream.nonces[type_url] = nonce
        self.events.append(
            Event(time.monotonic(), stream.index, stream.delta, False, type_url, response)
        )
        stream.out.put(response.SerializeToString())
        self._lock.notify_all()


# -- what a request means -------------------------------------------------------------------


def describe(event: Event) -> str:
    """A request, normalized to what matters (ordering is the list's):

    - state of the world: `TYPE KIND [names] v=VERSION`, KIND one of INIT (no nonce), ACK,
      NACK, or REQ (a further request carrying a nonce already answered: a change of the
      names asked for); ACK/NACK/REQ add `latest` or `stale` (the nonce is, or is not, the
      latest of its type sent so far);
    - delta: `TYPE` then INIT (no nonce, nothing named), ACK/NACK with `latest`/`stale`,
      `+names` subscribed, `-names` unsubscribed, `have=names` (initial_resource_versions).
    A stream after the first is marked `#N`.
    """
    request = event.message
    parts = [SHORT.get(event.type_url, event.type_url)]
    if event.stream:
        parts.insert(0, f"#{event.stream}")
    nonce = request.response_nonce
    freshness = "latest" if nonce == event.latest_nonce else "stale"
    if event.delta:
        subscribe = sorted(request.resource_names_subscribe)
        unsubscribe = sorted(request.resource_names_unsubscribe)
        if nonce:
            parts += ["NACK" if request.HasField("error_detail") else "ACK", freshness]
        elif not subscribe and not unsubscribe:
            parts.append("INIT")
        if subscribe:
            parts.append("+" + ",".join(subscribe))
        if unsubscribe:
            parts.append("-" + ",".join(unsubscribe))
        if request.initial_resource_versions:
            parts.append("have=" + ",".join(sorted(request.initial_resource_versions)))
    else:
        if not nonce:
            parts.append("INIT")
        elif request.HasField("error_detail"):
            parts += ["NACK", freshness]
        elif event.repeated_nonce:
            parts += ["REQ", freshness]
        else:
            parts += ["ACK", freshness]
        parts.append("[" + ",".join(sorted(request.resource_names)) + "]")
        parts.append(f"v={request.version_info or '-'}")
    return " ".join(parts)


def normalize(events: Iterable[Event]) -> list[str]:
    """The requests only, each described (see `describe`)."""
    return [describe(e) for e in events if e.incoming]


def trace(events: Iterable[Event]) -> list[str]:
    """Requests (`->`) and responses (`<-`, with version, nonce and what they carry)."""
    lines: list[str] = []
    start: float | None = None
    for event in events:
        start = event.at if start is None else start
        at = f"{event.at - start:6.3f}"
        if event.incoming:
            lines.append(f"{at} -> {describe(event)}")
            continue
        response = event.message
        short = SHORT.get(event.type_url, event.type_url)
        if event.delta:
            names = ",".join(r.name for r in response.resources)
            removed = ",".join(response.removed_resources)
            carried = f"[{names}]" + (f" removed=[{removed}]" if removed else "")
            version = response.system_version_info
        else:
            carried = f"{len(response.resources)} resources"
            version = response.version_info
        lines.append(f"{at} <- {short} v={version} nonce={response.nonce} {carried}")
    return lines


# -- the scenarios --------------------------------------------------------------------------

ADS_SOURCE = {"ads": {}, "resource_api_version": "V3"}
# Without a ClusterLoadAssignment an EDS cluster warms forever (no 15 s default): a stall
# shows up as a bounded test failure rather than a slow pass.
EDS_SOURCE = {**ADS_SOURCE, "initial_fetch_timeout": "0s"}
HCM_URL = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER_URL = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
INVALID_PREFIX = "invalid-"  # what tests/bench/fleet.py rejects (see its docstring)


def cluster(name: str, *, connect_timeout: str = "1s", invalid: bool = False) -> Message:
    """An EDS cluster over ADS. invalid=True: one Envoy rejects when it creates it (the
    CLUSTER_PROVIDED load balancer is not allowed for EDS clusters)."""
    body: dict[str, Any] = {
        "name": name,
        "type": "EDS",
        "connect_timeout": connect_timeout,
        "eds_cluster_config": {"eds_config": EDS_SOURCE},
    }
    if invalid:
        body["lb_policy"] = "CLUSTER_PROVIDED"
    return json_format.ParseDict(body, cluster_pb2.Cluster())


def endpoints(name: str, port: int) -> Message:
    return json_format.ParseDict(
        edge_config.load_assignment(name, port), endpoint_pb2.ClusterLoadAssignment()
    )


def listener(name: str, port: int, route_name: str) -> Message:
    return json_format.ParseDict(
        {
            "name": name,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [
                {
                    "filters": [
                        {
                            "name": "envoy.filters.network.http_connection_manager",
                            "typed_config": {
                                "@type": HCM_URL,
                                "stat_prefix": name,
                                "rds": {
                                    "route_config_name": route_name,
                                    "config_source": ADS_SOURCE,
                                },
                                "http_filters": [
                                    {
                                        "name": "envoy.filters.http.router",
                                        "typed_config": {"@type": ROUTER_URL},
                                    }
                                ],
                            },
                        }
                    ]
                }
            ],
        },
        listener_pb2.Listener(),
    )


def routes(name: str, cluster_name: str) -> Message:
    return json_format.ParseDict(
        {
            "name": name,
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster_name}}],
                }
            ],
        },
        route_pb2.RouteConfiguration(),
    )


def initial_resources(listener_port: int, upstream_port: int) -> dict[str, dict[str, Message]]:
    """Cluster a (EDS), the endpoints of a and b, a listener whose routes (RDS r) go to a."""
    return {
        CDS: {"a": cluster("a")},
        EDS: {"a": endpoints("a", upstream_port), "b": endpoints("b", upstream_port)},
        LDS: {"edge": listener("edge", listener_port, "r")},
        RDS: {"r": routes("r", "a")},
    }


def static_resources(listener_port: int, upstream_port: int) -> dict[str, dict[str, Message]]:
    """No EDS at all: a STATIC cluster s, a listener whose routes (RDS r) go to s."""
    static = json_format.ParseDict(
        {
            "name": "s",
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": json_format.MessageToDict(endpoints("s", upstream_port)),
        },
        cluster_pb2.Cluster(),
    )
    return {
        CDS: {"s": static},
        LDS: {"edge": listener("edge", listener_port, "r")},
        RDS: {"r": routes("r", "s")},
    }


ACK_TIMEOUT = 10.0
OBSERVE_SECONDS = 0.5  # how long "change" waits for the client to ask for EDS on its own


def add_cluster(server: ScriptedAds) -> None:
    """Add EDS cluster b (its endpoints answered as soon as asked), then route r to it."""
    server.push(CDS, {"a": cluster("a"), "b": cluster("b")})
    server.wait(lambda: server.answered(CDS), ACK_TIMEOUT, "the CDS ACK (cluster b added)")
    server.push(RDS, {"r": routes("r", "b")})
    server.wait(lambda: server.answered(RDS), ACK_TIMEOUT, "the RDS ACK (route to b)")


def change_cluster(server: ScriptedAds) -> None:
    """Change cluster a's connect_timeout only; after a while, send a's endpoints again (a
    re-created cluster warms only when its ClusterLoadAssignment arrives)."""
    server.push(CDS, {"a": cluster("a", connect_timeout="2s")})
    time.sleep(OBSERVE_SECONDS)  # what does the client ask for on its own?
    server.resend(EDS)
    server.wait(lambda: server.answered(CDS), ACK_TIMEOUT, "the CDS ACK (cluster a changed)")


def partial_nack(server: ScriptedAds) -> None:
    """Add valid EDS cluster b and an invalid one (NACKed, b applied), then drop the invalid
    one (ACKed, nothing else asked for: b is held already)."""
    server.push(
        CDS,
        {"a": cluster("a"), "b": cluster("b"), "invalid-c": cluster("invalid-c", invalid=True)},
    )
    server.wait(lambda: server.answered(CDS), ACK_TIMEOUT, "the CDS NACK (invalid-c)")
    server.push(CDS, {"a": cluster("a"), "b": cluster("b")})
    server.wait(lambda: server.answered(CDS), ACK_TIMEOUT, "the CDS ACK (invalid-c dropped)")


def remove_cluster(server: ScriptedAds) -> None:
    """Add EDS cluster b, then remove it again."""
    server.push(CDS, {"a": cluster("a"), "b": cluster("b")})
    server.wait(lambda: server.answered(CDS), ACK_TIMEOUT, "the CDS ACK (cluster b added)")
    server.push(CDS, {"a": cluster("a")})
    server.wait(lambda: server.answered(CDS), ACK_TIMEOUT, "the CDS ACK (cluster b removed)")


def nothing(server: ScriptedAds) -> None:
    """Only the startup counts."""


@dataclass(frozen=True)
class Scenario:
    initial: Callable[[int, int], dict[str, dict[str, Message]]]  # (listener, upstream port)
    drive: Callable[[ScriptedAds], None]  # once the client has ACKed every initial type


SCENARIOS: dict[str, Scenario] = {
    "add_cluster": Scenario(initial_resources, add_cluster),
    "change_cluster": Scenario(initial_resources, change_cluster),
    "remove_cluster": Scenario(initial_resources, remove_cluster),
    "partial_nack": Scenario(initial_resources, partial_nack),
    "start_without_eds": Scenario(static_resources, nothing),
}
