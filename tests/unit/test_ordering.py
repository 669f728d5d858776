"""The ordering rules (controlplane/xds/ordering.py) on both protocols, driven like a real
Envoy drives them: it holds its CDS ACK while clusters warm, and an EDS cluster warms only
when its ClusterLoadAssignment arrives. No sockets; time is a fake clock."""

from __future__ import annotations

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from controlplane.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE
from controlplane.snapshot import Snapshot
from controlplane.xds.delta import DeltaStream
from controlplane.xds.ordering import SUBSCRIPTION_GRACE_SECONDS, WAITS_FOR
from controlplane.xds.stream import Send, SotwStream, XdsStream
from tests import factories

NODE = base_pb2.Node(id="edge-1", cluster="edge")
WARMING_TIMEOUT = 10.0


def config(*clusters: str, timeout_s: int = 1, route_to: str | None = None) -> Snapshot:
    items = []
    for name in clusters:
        cluster = factories.cluster(name)
        cluster.connect_timeout.FromSeconds(timeout_s if name == clusters[0] else 1)
        items += [(CLUSTER, cluster), (ENDPOINT, factories.endpoints(name))]
    items += [
        (LISTENER, factories.listener("http", "routes")),
        (ROUTE, factories.routes("routes", route_to or clusters[0])),
    ]
    return Snapshot.from_messages(items)


class Client:
    """One stream and a fake clock; speaks either protocol with the same verbs."""

    def __init__(self, protocol: str, snapshot: Snapshot) -> None:
        self.protocol = protocol
        self.now = 1000.0  # the monotonic clock
        self.wall = 1.8e9  # the wall clock, which deadlines must not depend on
        self.current = snapshot
        kind: type[XdsStream] = SotwStream if protocol == "sotw" else DeltaStream
        self.stream = kind(
            1,
            lambda node: self.current,
            clock=lambda: self.wall,
            monotonic=lambda: self.now,
            warming_timeout=WARMING_TIMEOUT,
        )
        self.names: dict[str, tuple[str, ...]] = {}

    def _request(
        self, type_url: str, nonce: str = "", names: tuple[str, ...] | None = None
    ) -> discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest:
        old = self.names.get(type_url, ())
        if names is not None:
            self.names[type_url] = names
        request: discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest
        if self.protocol == "sotw":
            request = discovery_pb2.DiscoveryRequest(
                type_url=type_url, response_nonce=nonce, resource_names=self.names.get(type_url)
            )
        else:
            new = names if names is not None else old
            request = discovery_pb2.DeltaDiscoveryRequest(
                type_url=type_url,
                response_nonce=nonce,
                resource_names_subscribe=sorted(set(new) - set(old)),
                resource_names_unsubscribe=sorted(set(old) - set(new)),
            )
        if self.stream.node is None:
            request.node.CopyFrom(NODE)
        return request

    def ask(self, type_url: str, names: tuple[str, ...] = ()) -> list[Send]:
        return self.stream.receive(self._request(type_url, names=names))[2]

    def subscribe(self, type_url: str, names: tuple[str, ...], nonce: str) -> list[Send]:
        return self.stream.receive(self._request(type_url, nonce, names))[2]

    def ack(self, sent: Send) -> list[Send]:
        request = self._request(sent.type_url, sent.nonce)
        if isinstance(request, discovery_pb2.DiscoveryRequest):
            request.version_info = sent.version
        return self.stream.receive(request)[2]

    def nack(self, sent: Send, error: str) -> list[Send]:
        request = self._request(sent.type_url, sent.nonce)
        request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        return self.stream.receive(request)[2]

    def publish(self, snapshot: Snapshot) -> list[Send]:
        self.current = snapshot
        return self.stream.on_snapshot(snapshot)

    def connect_and_sync(self) -> None:
        """Start the way Envoy starts: CDS, EDS for its clusters, then LDS and RDS."""
        [cds] = self.ask(CLUSTER)
        [eds] = self.ask(ENDPOINT, tuple(sorted(self.current.resources(ENDPOINT))))
        self.ack(eds)
        assert self.ack(cds) == []
        [lds] = self.ask(LISTENER)
        [rds] = self.ask(ROUTE, ("routes",))
        self.ack(lds)
        self.ack(rds)
        assert self.stream.synced()


def delta_names(sent: Send) -> tuple[list[str], list[str]]:
    response = discovery_pb2.DeltaDiscoveryResponse.FromString(sent.payload)
    return sorted(r.name for r in response.resources), sorted(response.removed_resources)


protocols = pytest.mark.parametrize("protocol", ["sotw", "delta"])


def types(sends: list[Send]) -> list[str]:
    return [s.type_url for s in sends]


@protocols
def test_an_added_cluster_gets_its_endpoints_while_its_cds_response_is_unacked(protocol) -> None:
    client = Client(protocol, config("a"))
    client.connect_and_sync()
    [cds, *rest] = client.publish(config("a", "b", route_to="b"))
    assert cds.type_url == CLUSTER
    assert not {LISTENER, ROUTE} & set(types(rest))  # routes to b wait for b to warm
    # Envoy asks for b's endpoints before it ACKs CDS: they must not wait for that ACK.
    [eds] = client.subscribe(ENDPOINT, ("a", "b"), client.stream.types[ENDPOINT].latest_nonce)
    assert eds.type_url == ENDPOINT
    assert client.ack(eds) == []
    # b warmed: Envoy ACKs CDS, which releases the route to b.
    [rds] = client.ack(cds)
    assert rds.type_url == ROUTE
    client.ack(rds)
    assert client.stream.synced()


@protocols
def test_endpoints_of_added_clusters_go_out_once_when_the_client_asks_for_them(protocol) -> None:
    client = Client(protocol, config("a"))
    client.connect_and_sync()
    # EDS waits for the subscription that Envoy sends as soon as it has applied CDS.
    assert types(client.publish(config("a", "b", route_to="b"))) == [CLUSTER]
    assert client.stream.next_deadline() == client.now + SUBSCRIPTION_GRACE_SECONDS
    [eds] = client.subscribe(ENDPOINT, ("a", "b"), client.stream.types[ENDPOINT].latest_nonce)
    if protocol == "delta":
        assert delta_names(eds) == (["b"], [])
    assert client.stream.next_deadline() == client.now + WARMING_TIMEOUT  # routes to b wait


@protocols
def test_the_wait_for_endpoints_counts_from_when_the_cds_response_was_written(protocol) -> None:
    """A large CDS response queued behind a fleet's worth of others can take longer than the
    grace to leave the server; the client asks only once it has it."""
    client = Client(protocol, config("a"))
    client.connect_and_sync()
    built = client.now
    assert types(client.publish(config("a", "b", route_to="b"))) == [CLUSTER]
    client.now += 1.5
    client.stream.on_written(CLUSTER)
    assert client.stream.next_deadline() == client.now + SUBSCRIPTION_GRACE_SECONDS
    client.now += SUBSCRIPTION_GRACE_SECONDS - 0.5  # past the grace counted from building it
    assert client.stream.on_tick() == []
    [eds] = client.subscribe(ENDPOINT, ("a", "b"), client.stream.types[ENDPOINT].latest_nonce)
    if protocol == "delta":
        assert delta_names(eds) == (["b"], [])
    # Written again after the client asked: only the routes to b still wait (for b to warm).
    client.stream.on_written(CLUSTER)
    assert client.stream.next_deadline() == built + WARMING_TIMEOUT


@protocols
def test_endpoints_go_out_anyway_if_the_client_does_not_ask_in_time(protocol) -> None:
    client = Client(protocol, config("a"))
    client.connect_and_sync()
    moved = Snapshot.from_messages(  # adds b, and moves a's endpoints
        [
            (CLUSTER, factories.cluster("a")),
            (ENDPOINT, factories.endpoints("a", port=9090)),
            (CLUSTER, factories.cluster("b")),
            (ENDPOINT, factories.endpoints("b")),
            (LISTENER, factories.listener("http", "routes")),
            (ROUTE, factories.routes("routes", "a")),
        ]
    )
    assert types(client.publish(moved)) == [CLUSTER]
    client.now += SUBSCRIPTION_GRACE_SECONDS
    [eds] = client.stream.on_tick()
    assert eds.type_url == ENDPOINT
    if protocol == "delta":
        assert delta_names(eds) == (["a"], [])


@protocols
def test_a_changed_cluster_gets_its_endpoints_again_after_its_cds_response(protocol) -> None:
    client = Client(protocol, config("a", "b"))
    client.connect_and_sync()
    eds_version = client.stream.types[ENDPOINT].sent_version
    cds, eds = client.publish(config("a", "b", timeout_s=2))  # only a's connect_timeout
    assert (cds.type_url, eds.type_url) == (CLUSTER, ENDPOINT)
    assert eds.version == eds_version  # the endpoints did not change, yet a needs them
    if protocol == "delta":
        assert delta_names(eds) == (["a"], [])  # only the re-created cluster's
    client.ack(eds)
    assert client.ack(cds) == []
    assert client.stream.synced()


@protocols
def test_a_cluster_that_never_warms_holds_listeners_and_routes_only_until_the_timeout(
    protocol,
) -> None:
    client = Client(protocol, config("a"))
    client.connect_and_sync()
    sends = client.publish(config("a", "b", route_to="b"))
    assert types(sends)[0] == CLUSTER and ROUTE not in types(sends)
    client.subscribe(ENDPOINT, ("a", "b"), client.stream.types[ENDPOINT].latest_nonce)
    assert client.stream.warming()
    assert client.stream.next_deadline() == client.now + WARMING_TIMEOUT
    client.now += WARMING_TIMEOUT - 1
    assert client.stream.on_tick() == []
    client.now += 1
    [rds] = client.stream.on_tick()  # released: the rest of the config is not held forever
    assert rds.type_url == ROUTE
    assert client.stream.next_deadline() is None
    assert client.stream.warming() and not client.stream.synced()


@protocols
def test_a_rollback_reaches_a_client_that_never_acks_its_clusters(protocol) -> None:
    client = Client(protocol, config("a"))
    client.connect_and_sync()
    good = client.current
    [stuck, *_] = client.publish(config("a", "never-warms", route_to="never-warms"))
    sends = client.publish(good)  # rollback: sent at once, though `stuck` is unACKed
    rollback = sends[0]
    assert rollback.type_url == CLUSTER
    assert rollback.version == good.of_type(CLUSTER).version
    assert client.ack(stuck) == []  # an ACK of the superseded response does not count
    for sent in [*client.ack(rollback), *sends[1:]]:
        client.ack(sent)
    assert client.stream.synced() and not client.stream.warming()


def test_delta_rollback_after_a_partial_nack_makes_the_client_exact() -> None:
    """v1 = {a: 1s}; v2 = {a: 2s, b: invalid, c}: Envoy keeps a at 2s and c, and NACKs.
    Rolling back to v1 must send a at 1s and remove b and c."""
    v1 = config("a")
    v2 = config("a", "b", "c", timeout_s=2)
    client = Client("delta", v1)
    [cds] = client.ask(CLUSTER)
    client.ack(cds)
    [bad] = client.publish(v2)
    assert client.nack(bad, "cluster b: invalid") == []
    assert client.stream.rejection() == "cluster b: invalid"
    [rollback] = client.publish(v1)
    assert delta_names(rollback) == (["a"], ["b", "c"])
    client.ack(rollback)
    assert client.stream.synced()


def test_every_type_has_one_ordering_rule_with_a_reason() -> None:
    from controlplane.resources import ADS_ORDER

    assert set(WAITS_FOR) == {t.type_url for t in ADS_ORDER}
    assert all(reason for _, reason in WAITS_FOR.values())
    assert not WAITS_FOR[ENDPOINT][0], "endpoints must never wait for the CDS ACK"


@protocols
def test_routes_of_an_added_listener_go_out_once_when_the_client_asks_for_them(protocol) -> None:
    client = Client(protocol, config("a"))
    client.connect_and_sync()
    second = Snapshot.from_messages(
        [
            (CLUSTER, factories.cluster("a")),
            (ENDPOINT, factories.endpoints("a")),
            (LISTENER, factories.listener("http", "routes")),
            (LISTENER, factories.listener("http2", "routes2", port=10001)),
            (ROUTE, factories.routes("routes", "a")),
            (ROUTE, factories.routes("routes2", "a")),
        ]
    )
    assert types(client.publish(second)) == [LISTENER]  # RDS waits for the subscription
    # ... for a bounded time, with no CDS response in flight to time it.
    assert client.stream.next_deadline() == client.now + SUBSCRIPTION_GRACE_SECONDS
    route_nonce = client.stream.types[ROUTE].latest_nonce
    [rds] = client.subscribe(ROUTE, ("routes", "routes2"), route_nonce)
    assert rds.type_url == ROUTE
    assert client.stream.next_deadline() is None


@pytest.mark.parametrize("user_agent", ["envoy", "grpc"])
def test_an_envoy_asking_for_endpoints_first_has_cds_paused_and_is_sent_clusters(
    user_agent,
) -> None:
    """Envoy keeps CDS paused across a reconnect while a cluster warms, and asks for
    endpoints first: its clusters are tracked (and sent) as if it had asked for them."""
    snapshot = config("a")
    stream = SotwStream(1, lambda node: snapshot)
    node = base_pb2.Node(id="edge-1", cluster="edge", user_agent_name=user_agent)
    request = discovery_pb2.DiscoveryRequest(
        type_url=ENDPOINT, resource_names=["a"], version_info="old", node=node
    )
    sends = stream.receive(request)[2]
    if user_agent == "envoy":
        assert types(sends) == [CLUSTER, ENDPOINT]
        assert stream.warming() and not stream.synced()
    else:
        assert types(sends) == [ENDPOINT] and CLUSTER not in stream.types


ENVOY_NODE = base_pb2.Node(id="edge-1", cluster="edge", user_agent_name="envoy")


def with_bootstrap_endpoints(*clusters: str) -> Snapshot:
    """config(...) plus endpoints named by no dynamic cluster: those of an EDS cluster in
    Envoy's bootstrap, fed over ADS."""
    items = []
    for name in clusters:
        items += [(CLUSTER, factories.cluster(name)), (ENDPOINT, factories.endpoints(name))]
    items += [
        (ENDPOINT, factories.endpoints("static", 7000)),
        (LISTENER, factories.listener("http", "routes")),
        (ROUTE, factories.routes("routes", clusters[0])),
    ]
    return Snapshot.from_messages(items)


@protocols
def test_a_fresh_envoy_asking_for_bootstrap_endpoints_first_is_left_to_ask_for_clusters(
    protocol,
) -> None:
    """A fresh Envoy initializes an EDS cluster of its bootstrap before CDS: its first
    request is for endpoints, and it holds nothing. Clusters are not pushed before it asks
    (it would drop them), and it still counts as fresh."""
    snapshot = with_bootstrap_endpoints("a")
    stream = (SotwStream if protocol == "sotw" else DeltaStream)(1, lambda node: snapshot)
    first: discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest
    if protocol == "sotw":
        first = discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=["static"])
    else:
        first = discovery_pb2.DeltaDiscoveryRequest(
            type_url=ENDPOINT, resource_names_subscribe=["static"]
        )
    first.node.CopyFrom(ENVOY_NODE)
    assert types(stream.receive(first)[2]) == [ENDPOINT]
    assert stream.started_empty and CLUSTER not in stream.types
    cds = type(first)(type_url=CLUSTER)
    assert types(stream.receive(cds)[2]) == [CLUSTER]


def test_delta_an_implied_cds_subscription_learns_what_the_client_holds_when_it_asks() -> None:
    """When the paused CDS resumes, Envoy's first CDS request reports what it holds (and
    names the implied response's nonce): clusters gone since then are removed."""
    snapshot = config("a")
    stream = DeltaStream(1, lambda node: snapshot)
    eds_version = snapshot.resources(ENDPOINT)["a"].version
    reconnect = discovery_pb2.DeltaDiscoveryRequest(
        type_url=ENDPOINT,
        resource_names_subscribe=["a"],
        initial_resource_versions={"a": eds_version},
    )
    reconnect.node.CopyFrom(ENVOY_NODE)
    [cds] = [s for s in stream.receive(reconnect)[2] if s.type_url == CLUSTER]
    held = {"a": snapshot.resources(CLUSTER)["a"].version, "gone": "0123456789abcdef"}
    resumed = discovery_pb2.DeltaDiscoveryRequest(
        type_url=CLUSTER, initial_resource_versions=held, response_nonce=cds.nonce
    )
    [removal] = stream.receive(resumed)[2]
    assert delta_names(removal) == ([], ["gone"])


def test_a_type_whose_names_all_went_is_synced_without_an_ack() -> None:
    """Envoy does not ACK an empty response to a subscription with no names (SotW)."""
    client = Client("sotw", config("a"))
    client.connect_and_sync()
    eds = client.stream.types[ENDPOINT]
    assert client.subscribe(ENDPOINT, (), eds.latest_nonce) == []
    assert client.stream.synced()


def test_repeated_cds_pushes_do_not_restart_the_warming_timeout() -> None:
    client = Client("sotw", config("a"))
    client.connect_and_sync()
    client.publish(config("a", "never-warms", route_to="never-warms"))
    client.subscribe(ENDPOINT, ("a", "never-warms"), client.stream.types[ENDPOINT].latest_nonce)
    sent: list[str] = []
    for step in range(1, 4):  # a CDS change every 5 s; the client never ACKs
        client.now += 5
        changed = config("a", "never-warms", timeout_s=1 + step, route_to="never-warms")
        sent += types(client.publish(changed) + client.stream.on_tick())
    assert ROUTE in sent  # released 10 s after the first unACKed push


@protocols
def test_endpoints_of_a_changed_cluster_go_out_at_once_beside_bootstrap_endpoint_names(
    protocol,
) -> None:
    """The subscription grace waits only for names the client will add or drop."""
    client = Client(protocol, with_bootstrap_endpoints("a", "b"))
    [cds] = client.ask(CLUSTER)
    [eds] = client.ask(ENDPOINT, ("a", "b", "static"))
    client.ack(eds)
    client.ack(cds)
    a2 = factories.cluster("a")
    a2.connect_timeout.FromSeconds(2)
    changed = Snapshot.from_messages(
        [(CLUSTER, a2), (CLUSTER, factories.cluster("b"))]
        + [(ENDPOINT, factories.endpoints(n)) for n in ("a", "b")]
        + [(ENDPOINT, factories.endpoints("static", 7000))]
        + [
            (LISTENER, factories.listener("http", "routes")),
            (ROUTE, factories.routes("routes", "a")),
        ]
    )
    assert types(client.publish(changed)) == [CLUSTER, ENDPOINT]


def test_a_wall_clock_step_does_not_move_the_warming_deadline() -> None:
    client = Client("sotw", config("a"))
    client.connect_and_sync()
    client.publish(config("a", "never-warms", route_to="never-warms"))
    client.subscribe(ENDPOINT, ("a", "never-warms"), client.stream.types[ENDPOINT].latest_nonce)
    client.wall -= 3600  # NTP steps the wall clock back an hour
    client.now += WARMING_TIMEOUT
    assert types(client.stream.on_tick()) == [ROUTE]
