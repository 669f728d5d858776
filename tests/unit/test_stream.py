"""The SotW stream state machine, driven like Envoy drives it, with no sockets."""

from __future__ import annotations

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from controlplane import resources
from controlplane.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE
from controlplane.snapshot import Snapshot
from controlplane.xds import limits
from controlplane.xds.assignments import Assignments
from controlplane.xds.stream import (
    NodeInfo,
    RemoteProtocolError,
    RequestKind,
    Send,
    SotwStream,
    changes_subscription,
    requested_names,
)
from tests import factories

NODE = base_pb2.Node(id="edge-1", cluster="edge")


def request(
    type_url: str,
    *,
    version: str = "",
    nonce: str = "",
    names: tuple[str, ...] = (),
    node: base_pb2.Node | None = None,
    error: str | None = None,
) -> discovery_pb2.DiscoveryRequest:
    req = discovery_pb2.DiscoveryRequest(
        type_url=type_url, version_info=version, response_nonce=nonce, resource_names=names
    )
    if node is not None:
        req.node.CopyFrom(node)
    if error is not None:
        req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return req


def decode(send: Send) -> discovery_pb2.DiscoveryResponse:
    return discovery_pb2.DiscoveryResponse.FromString(send.payload)


def names_in(send: Send) -> list[str]:
    cls = resources.resource_type(send.type_url).message_class
    return [resources.resource_name(cls.FromString(r.value)) for r in decode(send).resources]


class FakeEnvoy:
    """Drives a SotwStream the way Envoy does: ACKs what it receives, in order."""

    def __init__(self, snapshot: Snapshot | None) -> None:
        self.active = Assignments()
        if snapshot is not None:
            self.active.set_stable("edge", snapshot)
        self.stream = SotwStream(1, self.active.resolve, clock=lambda: 100.0)
        self.first = True

    def send(self, req: discovery_pb2.DiscoveryRequest) -> list[Send]:
        if self.first:
            req.node.CopyFrom(NODE)
            self.first = False
        return self.stream.receive(req)[2]

    def ack(self, sent: Send, names: tuple[str, ...] = ()) -> list[Send]:
        return self.send(
            request(sent.type_url, version=sent.version, nonce=sent.nonce, names=names)
        )


@pytest.fixture
def snapshot() -> Snapshot:
    return factories.edge_snapshot()


def test_first_request_without_node_is_refused(snapshot) -> None:
    stream = SotwStream(1, lambda node: snapshot)
    with pytest.raises(RemoteProtocolError, match="Node"):
        stream.receive(request(CLUSTER))


def test_node_is_remembered_from_the_first_request(snapshot) -> None:
    envoy = FakeEnvoy(snapshot)
    [cds] = envoy.send(request(CLUSTER))
    envoy.ack(cds)  # no node on this one
    assert envoy.stream.node is not None
    assert (envoy.stream.node.id, envoy.stream.group) == ("edge-1", "edge")


def test_node_without_cluster_is_in_group_default() -> None:
    stream = SotwStream(1, lambda node: None)
    stream.receive(request(CLUSTER, node=base_pb2.Node(id="n1")))
    assert stream.group == "default"


@pytest.mark.parametrize(
    "type_url",
    [
        "type.googleapis.com/envoy.config.endpoint.v3.LbEndpoint",  # LEDS
        "type.googleapis.com/envoy.api.v2.Cluster",  # a v2 URL
        "type.googleapis.com/not.A.Type",
    ],
)
def test_an_unknown_type_url_on_ads_is_ignored_and_the_stream_goes_on(snapshot, type_url) -> None:
    envoy = FakeEnvoy(snapshot)
    [cds] = envoy.send(request(CLUSTER))
    kind, _, sends = envoy.stream.receive(request(type_url))
    assert (kind, sends) == (RequestKind.UNSUPPORTED, [])
    assert type_url not in envoy.stream.types
    assert envoy.ack(cds) == []
    assert envoy.stream.types[CLUSTER].acked_version == cds.version


def test_an_unknown_type_url_on_a_per_type_service_is_refused(snapshot) -> None:
    stream = SotwStream(1, lambda node: snapshot, types=[CLUSTER])
    with pytest.raises(RemoteProtocolError, match="unsupported type_url"):
        stream.receive(request("type.googleapis.com/not.A.Type", node=NODE))


def test_per_type_stream_refuses_other_types(snapshot) -> None:
    stream = SotwStream(1, lambda node: snapshot, types=[CLUSTER])
    with pytest.raises(RemoteProtocolError, match="not served on this stream"):
        stream.receive(request(LISTENER, node=NODE))


def test_per_type_stream_accepts_empty_type_url(snapshot) -> None:
    stream = SotwStream(1, lambda node: snapshot, types=[CLUSTER])
    _, _, [sent] = stream.receive(request("", node=NODE))
    assert sent.type_url == CLUSTER


def test_wildcard_cds_sends_every_cluster(snapshot) -> None:
    envoy = FakeEnvoy(snapshot)
    [cds] = envoy.send(request(CLUSTER))
    response = decode(cds)
    assert response.version_info == snapshot.of_type(CLUSTER).version
    assert response.type_url == CLUSTER
    assert response.nonce == cds.nonce
    assert sorted(names_in(cds)) == ["api", "web"]


def test_every_response_has_its_own_nonce(snapshot) -> None:
    envoy = FakeEnvoy(snapshot)
    [cds] = envoy.send(request(CLUSTER))
    [eds] = envoy.ack(cds) + envoy.send(request(ENDPOINT, names=("web",)))
    assert cds.nonce != eds.nonce


def synced_stream(active: Assignments, stream_id: int) -> tuple[SotwStream, list[Send]]:
    """A stream numbering its nonces in `active`'s epochs, that ACKed all it was sent."""
    stream = SotwStream(stream_id, active.resolve, epoch=active.epoch)
    sent = stream.receive(request(CLUSTER, node=NODE))[2]
    sent += stream.receive(request(ENDPOINT, names=EDS_NAMES))[2]
    sent += stream.receive(request(LISTENER))[2]
    return stream, sent + ack_all(stream, sent)


EDS_NAMES = ("web", "api")


def ack_all(stream: SotwStream, sent: list[Send]) -> list[Send]:
    """ACK each response, and what those ACKs release, as Envoy would; what was sent."""
    more: list[Send] = []
    for send in sent:
        names = EDS_NAMES if send.type_url == ENDPOINT else ()
        ack = request(send.type_url, version=send.version, nonce=send.nonce, names=names)
        more += stream.receive(ack)[2]
    return more + ack_all(stream, more) if more else []


def test_a_nonce_is_never_used_twice_on_a_stream_even_when_a_rollback_resends_the_same(
    snapshot,
) -> None:
    active = Assignments()
    active.set_stable("edge", snapshot)
    stream, sent = synced_stream(active, 1)
    v2 = factories.edge_snapshot(backend_port=8081)
    for target in (v2, snapshot, v2, snapshot):  # the same responses again, epoch after epoch
        active.set_stable("edge", target)
        pushed = stream.on_snapshot(active.resolve(stream.node))  # type: ignore[arg-type]
        assert pushed, "each move sends something"
        sent += pushed + ack_all(stream, pushed)
    nonces = [s.nonce for s in sent]
    assert len(set(nonces)) == len(nonces)
    assert {decode(s).nonce for s in sent} == set(nonces)


def test_streams_that_do_the_same_in_an_epoch_send_the_same_bytes(snapshot) -> None:
    """A fleet taking a push sends one encoded response to every stream, not one each."""
    active = Assignments()
    active.set_stable("edge", snapshot)
    (first, first_sent), (second, second_sent) = synced_stream(active, 1), synced_stream(active, 2)
    assert [s.payload for s in first_sent] == [s.payload for s in second_sent]
    assert all(a.payload is b.payload for a, b in zip(first_sent, second_sent, strict=True))
    active.set_stable("edge", factories.edge_snapshot(backend_port=8081))
    [a] = first.on_snapshot(active.resolve(first.node))  # type: ignore[arg-type]
    [b] = second.on_snapshot(active.resolve(second.node))  # type: ignore[arg-type]
    assert a.payload is b.payload and a.nonce.startswith(f"{active.epoch()}.")


def test_listeners_and_routes_wait_for_the_cds_ack_but_endpoints_do_not(snapshot) -> None:
    envoy = FakeEnvoy(snapshot)
    [cds] = envoy.send(request(CLUSTER))
    assert envoy.send(request(LISTENER)) == []  # held: CDS not ACKed yet
    assert envoy.send(request(ROUTE, names=("routes",))) == []
    [eds] = envoy.send(request(ENDPOINT, names=("web", "api")))  # what warming clusters need
    assert sorted(names_in(eds)) == ["api", "web"]
    lds, rds = envoy.ack(cds)
    assert (lds.type_url, rds.type_url) == (LISTENER, ROUTE)


def test_a_new_snapshot_is_pushed_in_ads_order(snapshot) -> None:
    envoy = FakeEnvoy(snapshot)
    [cds] = envoy.send(request(CLUSTER))
    envoy.ack(cds)
    [eds] = envoy.send(request(ENDPOINT, names=("web", "api")))
    [lds] = envoy.ack(eds, names=("web", "api")) + envoy.send(request(LISTENER))
    [rds] = envoy.ack(lds) + envoy.send(request(ROUTE, names=("routes",)))
    assert envoy.ack(rds, names=("routes",)) == []

    changed = Snapshot.from_messages(
        [
            (CLUSTER, factories.cluster("web")),
            (CLUSTER, factories.cluster("api")),
            (ENDPOINT, factories.endpoints("web", 8081)),
            (ENDPOINT, factories.endpoints("api", 9090)),
            (LISTENER, factories.listener("http", "routes", port=10001)),
            (ROUTE, factories.routes("routes", "web", "/v2")),
        ]
    )
    # CDS unchanged: not re-pushed, so nothing waits for it.
    eds2, lds2, rds2 = envoy.stream.on_snapshot(changed)
    assert [s.type_url for s in (eds2, lds2, rds2)] == [ENDPOINT, LISTENER, ROUTE]
    assert envoy.ack(eds2, names=("web", "api")) == []
    assert envoy.ack(lds2) == []
    assert envoy.ack(rds2, names=("routes",)) == []
    assert envoy.stream.synced()


def test_eds_sends_only_the_names_asked_for(snapshot) -> None:
    envoy = FakeEnvoy(snapshot)
    envoy.ack(*envoy.send(request(CLUSTER)))
    [eds] = envoy.send(request(ENDPOINT, names=("web", "not-there")))
    assert names_in(eds) == ["web"]
    assert eds.resource_names == {"not-there", "web"}


def test_changing_subscribed_names_resends_the_same_version(snapshot) -> None:
    envoy = FakeEnvoy(snapshot)
    envoy.ack(*envoy.send(request(CLUSTER)))
    [eds] = envoy.send(request(ENDPOINT, names=("web",)))
    [again] = envoy.ack(eds, names=("web", "api"))
    assert again.version == eds.version
    assert sorted(names_in(again)) == ["api", "web"]


def test_stale_nonce_is_ignored(snapshot) -> None:
    envoy = FakeEnvoy(snapshot)
    [cds] = envoy.send(request(CLUSTER))
    kind, state, sends = envoy.stream.receive(
        request(CLUSTER, nonce="not-the-latest", error="old news")
    )
    assert (kind, sends) == (RequestKind.STALE, [])
    assert state.nacked_version is None and state.awaiting_ack
    assert state.stale_requests == 1
    assert envoy.ack(cds) == []


def test_nack_is_recorded_and_never_resent_in_a_loop(snapshot) -> None:
    envoy = FakeEnvoy(snapshot)
    [cds] = envoy.send(request(CLUSTER))
    nack = request(CLUSTER, version="", nonce=cds.nonce, error="cluster web: bad config")
    kind, state, sends = envoy.stream.receive(nack)
    assert kind is RequestKind.NACK
    assert sends == []
    assert state.nacked_version == cds.version
    assert state.nack_error == "cluster web: bad config"
    assert state.acked_version is None
    # Envoy repeats its request after a NACK; the same version must not come back.
    assert envoy.stream.receive(request(CLUSTER, nonce=cds.nonce, error="again"))[2] == []


def test_a_fixed_snapshot_after_a_nack_is_sent(snapshot) -> None:
    envoy = FakeEnvoy(snapshot)
    [cds] = envoy.send(request(CLUSTER))
    envoy.stream.receive(request(CLUSTER, nonce=cds.nonce, error="bad"))
    fixed = Snapshot.from_messages(
        [(CLUSTER, factories.cluster("web")), (ENDPOINT, factories.endpoints("web"))]
    )
    [resent] = envoy.stream.on_snapshot(fixed)
    assert resent.version == fixed.of_type(CLUSTER).version
    assert resent.nonce != cds.nonce


def test_a_newer_snapshot_supersedes_an_unacked_response(snapshot) -> None:
    envoy = FakeEnvoy(snapshot)
    [cds] = envoy.send(request(CLUSTER))
    newer = Snapshot.from_messages(
        [(CLUSTER, factories.cluster("web")), (ENDPOINT, factories.endpoints("web"))]
    )
    [cds2] = envoy.stream.on_snapshot(newer)  # sent at once, whatever is in flight
    assert cds2.version == newer.of_type(CLUSTER).version
    assert names_in(cds2) == ["web"]
    kind, state, _ = envoy.stream.receive(request(CLUSTER, version=cds.version, nonce=cds.nonce))
    assert kind is RequestKind.STALE  # the ACK of the superseded response does not count
    assert state.awaiting_ack and state.acked_version is None
    assert envoy.ack(cds2) == []
    assert envoy.stream.types[CLUSTER].acked_version == cds2.version


def test_reconnect_holding_the_current_version_is_sent_nothing(snapshot) -> None:
    envoy = FakeEnvoy(snapshot)
    current = snapshot.of_type(CLUSTER).version
    assert envoy.send(request(CLUSTER, version=current)) == []
    state = envoy.stream.types[CLUSTER]
    assert state.acked_version == current
    # ...but an Envoy holding an older version gets the current one.
    other = FakeEnvoy(snapshot)
    [sent] = other.send(request(CLUSTER, version="0123456789abcdef"))
    assert sent.version == current


def test_nothing_is_sent_before_any_snapshot_exists() -> None:
    envoy = FakeEnvoy(None)
    assert envoy.send(request(CLUSTER)) == []
    [cds] = envoy.stream.on_snapshot(factories.edge_snapshot())
    assert cds.type_url == CLUSTER


def node(node_id: str, group: str) -> NodeInfo:
    return NodeInfo.from_node(base_pb2.Node(id=node_id, cluster=group))


def test_group_without_snapshot_gets_default() -> None:
    active = Assignments()
    default = factories.edge_snapshot()
    active.set_stable("default", default)
    assert active.resolve(node("n", "edge")) is default
    own = factories.edge_snapshot(prefix="/edge")
    active.set_stable("edge", own)
    assert active.resolve(node("n", "edge")) is own
    assert active.resolve(node("n", "other")) is default


def test_fresh_means_the_client_held_nothing_when_it_connected(snapshot) -> None:
    envoy = FakeEnvoy(snapshot)
    envoy.ack(*envoy.send(request(CLUSTER)))
    assert envoy.stream.started_empty
    reconnect = FakeEnvoy(snapshot)
    reconnect.send(request(CLUSTER, version="0123456789abcdef"))
    assert not reconnect.stream.started_empty


def test_synced_and_rejection_follow_the_assigned_snapshot(snapshot) -> None:
    envoy = FakeEnvoy(snapshot)
    [cds] = envoy.send(request(CLUSTER))
    assert not envoy.stream.synced()
    envoy.ack(cds)
    assert envoy.stream.synced()
    [lds] = envoy.send(request(LISTENER))
    assert not envoy.stream.synced()  # LDS sent, not ACKed
    envoy.stream.receive(request(LISTENER, nonce=lds.nonce, error="cannot bind"))
    assert envoy.stream.rejection() == "cannot bind"
    assert not envoy.stream.synced()


def test_a_request_naming_an_acked_nonce_is_a_subscription_update_not_an_ack(snapshot) -> None:
    envoy = FakeEnvoy(snapshot)
    envoy.ack(*envoy.send(request(CLUSTER)))
    [eds] = envoy.send(request(ENDPOINT, names=("web",)))
    envoy.ack(eds, names=("web",))
    acked_at = envoy.stream.types[ENDPOINT].acked_at
    # Envoy re-sends its EDS interest (new cluster) with the nonce it already ACKed.
    kind, state, [again] = envoy.stream.receive(
        request(ENDPOINT, version=eds.version, nonce=eds.nonce, names=("web", "api"))
    )
    assert kind is RequestKind.UPDATE
    assert state.acked_at == acked_at  # not counted as an ACK
    assert sorted(names_in(again)) == ["api", "web"]


def test_empty_names_after_named_ones_is_not_a_wildcard(snapshot) -> None:
    envoy = FakeEnvoy(snapshot)
    [cds] = envoy.send(request(CLUSTER, names=("web",)))
    assert names_in(cds) == ["web"]
    # Asking for nothing is answered with nothing: Envoy would not ACK an empty response.
    assert envoy.ack(cds, names=()) == []
    state = envoy.stream.types[CLUSTER]
    assert not state.wildcard and state.names == frozenset()
    assert envoy.stream.synced()


def test_a_legacy_wildcard_lasts_while_requests_name_nothing(snapshot) -> None:
    envoy = FakeEnvoy(snapshot)
    [cds] = envoy.send(request(CLUSTER))
    assert envoy.ack(cds) == []
    assert envoy.stream.types[CLUSTER].wildcard
    assert envoy.ack(cds, names=("web", "*")) == []  # still everything: nothing new
    assert envoy.stream.types[CLUSTER].wildcard
    [web] = envoy.ack(cds, names=("web",))  # names without `*`: the wildcard has ended
    assert not envoy.stream.types[CLUSTER].wildcard and names_in(web) == ["web"]


def test_the_reconnect_shortcut_applies_only_to_wildcard_subscriptions(snapshot) -> None:
    envoy = FakeEnvoy(snapshot)
    envoy.send(request(CLUSTER))
    current = snapshot.of_type(ENDPOINT).version
    # A named subscription's version does not say which names the client holds.
    [eds] = envoy.send(request(ENDPOINT, version=current, names=("web", "api")))
    assert sorted(names_in(eds)) == ["api", "web"]


def test_subscription_changes_on_a_stale_nonce_are_honoured(snapshot) -> None:
    envoy = FakeEnvoy(snapshot)
    envoy.send(request(CLUSTER))
    [eds] = envoy.send(request(ENDPOINT, names=("web",)))
    moved = factories.edge_snapshot(backend_port=9999)
    envoy.active.set_stable("edge", moved)
    [newer] = envoy.stream.on_snapshot(moved)  # supersedes `eds`
    kind, state, sends = envoy.stream.receive(
        request(ENDPOINT, version=eds.version, nonce=eds.nonce, names=("web", "api"))
    )
    assert kind is RequestKind.STALE and state.names == {"web", "api"}
    [both] = sends
    assert sorted(names_in(both)) == ["api", "web"] and both.nonce != newer.nonce


def test_requests_naming_the_same_resources_share_one_set_and_over_the_limit_stay_refused() -> None:
    size = lambda: 100  # noqa: E731 (a request this small holds no name over the limit)
    first = requested_names("resource_names", ["web", "api"], size)
    assert requested_names("resource_names", ["web", "api"], size) is first
    assert requested_names("resource_names", ["api", "web"], size) is first  # any order
    assert first == frozenset({"web", "api"})
    over = ["x" * (limits.MAX_NAME_BYTES + 1)]
    for _ in range(2):  # refused names are not remembered as checked
        with pytest.raises(RemoteProtocolError, match="over the limit"):
            requested_names("resource_names", over, lambda: 10_000)


def test_whether_a_push_changes_a_subscription_is_worked_out_on_the_sets() -> None:
    web, both = frozenset({"web"}), frozenset({"web", "api"})
    assert changes_subscription(web, both, web)  # a new name to ask for
    assert changes_subscription(both, web, both)  # a name to drop
    assert not changes_subscription(web, both, both)  # already asked for
    assert not changes_subscription(both, web, web)  # already dropped
    assert changes_subscription(web, both, web)  # the same answer from the cache
