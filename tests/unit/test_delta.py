"""The delta xDS stream, driven like Envoy drives it, with no sockets."""

from __future__ import annotations

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from controlplane.resources import CLUSTER, ENDPOINT, LISTENER
from controlplane.snapshot import Snapshot
from controlplane.xds.delta import UNKNOWN, DeltaStream
from controlplane.xds.stream import RequestKind, Send
from tests import factories

NODE = base_pb2.Node(id="edge-1", cluster="edge")


def snapshot(*clusters: str, port: int = 8080) -> Snapshot:
    items = []
    for name in clusters:
        items += [(CLUSTER, factories.cluster(name)), (ENDPOINT, factories.endpoints(name, port))]
    return Snapshot.from_messages(items)


def request(
    type_url: str,
    *,
    subscribe: tuple[str, ...] = (),
    unsubscribe: tuple[str, ...] = (),
    initial: dict[str, str] | None = None,
    nonce: str = "",
    error: str | None = None,
    node: bool = False,
) -> discovery_pb2.DeltaDiscoveryRequest:
    req = discovery_pb2.DeltaDiscoveryRequest(
        type_url=type_url,
        resource_names_subscribe=subscribe,
        resource_names_unsubscribe=unsubscribe,
        initial_resource_versions=initial or {},
        response_nonce=nonce,
    )
    if node:
        req.node.CopyFrom(NODE)
    if error is not None:
        req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return req


def decode(send: Send) -> discovery_pb2.DeltaDiscoveryResponse:
    return discovery_pb2.DeltaDiscoveryResponse.FromString(send.payload)


def names(send: Send) -> list[str]:
    return [r.name for r in decode(send).resources]


class Envoy:
    def __init__(self, current: Snapshot) -> None:
        self.current = current
        self.stream = DeltaStream(1, lambda node: self.current)

    def send(self, req: discovery_pb2.DeltaDiscoveryRequest) -> list[Send]:
        if self.stream.node is None:
            req.node.CopyFrom(NODE)
        return self.stream.receive(req)[2]

    def ack(self, sent: Send) -> list[Send]:
        return self.send(request(sent.type_url, nonce=sent.nonce))

    def publish(self, new: Snapshot) -> list[Send]:
        self.current = new
        return self.stream.on_snapshot(new)


def test_wildcard_sends_every_resource_with_its_own_version() -> None:
    envoy = Envoy(snapshot("a", "b"))
    [cds] = envoy.send(request(CLUSTER))  # legacy wildcard: no names on the first request
    response = decode(cds)
    assert sorted(r.name for r in response.resources) == ["a", "b"]
    by_name = envoy.current.resources(CLUSTER)
    assert {r.name: r.version for r in response.resources} == {
        n: r.version for n, r in by_name.items()
    }
    assert response.system_version_info == envoy.current.of_type(CLUSTER).version
    assert response.nonce == cds.nonce and not response.removed_resources


def test_only_the_changed_resource_is_sent() -> None:
    envoy = Envoy(snapshot("a", "b"))
    envoy.ack(*envoy.send(request(CLUSTER)))
    changed = Snapshot.from_messages(
        [
            (CLUSTER, factories.cluster("a")),
            (CLUSTER, factories.cluster("b")),
            (CLUSTER, factories.cluster("c")),
            (ENDPOINT, factories.endpoints("a")),
            (ENDPOINT, factories.endpoints("b")),
            (ENDPOINT, factories.endpoints("c")),
        ]
    )
    [update] = envoy.publish(changed)
    assert names(update) == ["c"]


def test_subscribe_unsubscribe_and_resubscribe_sends_the_resource_again() -> None:
    envoy = Envoy(snapshot("a", "b"))
    [eds] = envoy.send(request(ENDPOINT, subscribe=("a",)))
    assert names(eds) == ["a"]
    [more] = envoy.ack(eds) + envoy.send(request(ENDPOINT, subscribe=("b",)))
    assert names(more) == ["b"]  # only the new one
    envoy.ack(more)
    assert envoy.send(request(ENDPOINT, unsubscribe=("a",))) == []  # nothing to send
    [again] = envoy.send(request(ENDPOINT, subscribe=("a",)))
    assert names(again) == ["a"]  # same version as before, sent again
    assert envoy.stream.types[ENDPOINT].names == {"a", "b"}


def test_wildcard_with_explicit_names() -> None:
    envoy = Envoy(snapshot("a", "b"))
    [cds] = envoy.send(request(CLUSTER, subscribe=("*", "a")))
    state = envoy.stream.types[CLUSTER]
    assert state.wildcard and state.names == {"a"}
    assert sorted(names(cds)) == ["a", "b"]
    envoy.ack(cds)
    assert envoy.send(request(CLUSTER, unsubscribe=("*",))) == []
    assert not state.wildcard and state.names == {"a"}


def test_legacy_wildcard_stays_wildcard_when_a_name_is_subscribed() -> None:
    envoy = Envoy(snapshot("a", "b"))
    envoy.ack(*envoy.send(request(CLUSTER)))
    assert envoy.stream.types[CLUSTER].wildcard
    [again] = envoy.send(request(CLUSTER, subscribe=("a",)))
    state = envoy.stream.types[CLUSTER]
    assert state.wildcard and not state.legacy_wildcard and state.names == {"a"}
    assert names(again) == ["a"]  # subscribing to a name sends it
    envoy.ack(again)
    [update] = envoy.publish(snapshot("a", "b", "c"))
    assert names(update) == ["c"]  # still every cluster, not just "a"


def test_a_first_request_naming_resources_is_not_a_wildcard() -> None:
    envoy = Envoy(snapshot("a", "b"))
    [cds] = envoy.send(request(CLUSTER, subscribe=("a",)))
    assert names(cds) == ["a"] and not envoy.stream.types[CLUSTER].wildcard


def test_reconnect_with_current_versions_sends_nothing() -> None:
    current = snapshot("a", "b")
    held = {n: r.version for n, r in current.resources(CLUSTER).items()}
    envoy = Envoy(current)
    assert envoy.send(request(CLUSTER, initial=held)) == []
    state = envoy.stream.types[CLUSTER]
    assert state.acked_version == current.of_type(CLUSTER).version
    assert not envoy.stream.started_empty
    assert envoy.stream.synced()


def test_reconnect_with_a_stale_version_gets_only_that_resource() -> None:
    current = snapshot("a", "b")
    held = {n: r.version for n, r in current.resources(CLUSTER).items()}
    held["a"] = "0000000000000000"
    [cds] = Envoy(current).send(request(CLUSTER, initial=held))
    assert names(cds) == ["a"] and not decode(cds).removed_resources


def test_reconnect_holding_an_unknown_resource_is_told_to_remove_it() -> None:
    current = snapshot("a")
    held = {"a": current.resources(CLUSTER)["a"].version, "gone": "1111111111111111"}
    [cds] = Envoy(current).send(request(CLUSTER, initial=held))
    response = decode(cds)
    assert list(response.removed_resources) == ["gone"] and not response.resources


def test_a_resource_leaving_the_snapshot_is_removed() -> None:
    envoy = Envoy(snapshot("a", "b"))
    envoy.ack(*envoy.send(request(CLUSTER)))
    [update] = envoy.publish(snapshot("a"))
    assert list(decode(update).removed_resources) == ["b"] and not decode(update).resources
    envoy.ack(update)
    assert envoy.stream.types[CLUSTER].held.keys() == {"a"}


def test_nack_on_one_resource_is_recorded_and_not_resent_in_a_loop() -> None:
    envoy = Envoy(snapshot("a"))
    envoy.ack(*envoy.send(request(CLUSTER)))
    held_before = dict(envoy.stream.types[CLUSTER].held)
    [bad] = envoy.publish(snapshot("a", "b"))
    kind, state, sends = envoy.stream.receive(
        request(CLUSTER, nonce=bad.nonce, error="cluster b: bad config")
    )
    assert kind is RequestKind.NACK and sends == []
    assert state.nack_error == "cluster b: bad config"
    # What the NACKed response carried is unknown now; the rest is held as it was.
    assert state.held == held_before | {"b": UNKNOWN}
    assert envoy.stream.rejection() == "cluster b: bad config"
    assert not envoy.stream.synced()
    assert envoy.send(request(CLUSTER, nonce=bad.nonce, error="again")) == []
    [fixed] = envoy.publish(snapshot("a", "c"))
    assert names(fixed) == ["c"]  # a was never in doubt
    assert list(decode(fixed).removed_resources) == ["b"]  # b may have been applied


def test_ads_order_and_stale_nonces_follow_the_shared_rules() -> None:
    envoy = Envoy(snapshot("a"))
    [cds] = envoy.send(request(CLUSTER))
    assert envoy.send(request(LISTENER)) == []  # held behind CDS
    [eds] = envoy.send(request(ENDPOINT, subscribe=("a",)))  # never held behind CDS
    assert names(eds) == ["a"]
    kind, _, _ = envoy.stream.receive(request(CLUSTER, nonce="99"))
    assert kind is RequestKind.STALE
    [lds] = envoy.ack(cds)
    assert lds.type_url == LISTENER


@pytest.mark.parametrize("protocol", ["delta"])
def test_protocol_is_reported(protocol) -> None:
    assert DeltaStream(1, lambda node: None).protocol == protocol


def test_clients_moving_between_the_same_versions_share_one_diff_and_stay_correct() -> None:
    from controlplane.xds import delta

    first, second = Envoy(snapshot("a", "b")), Envoy(snapshot("a", "b"))
    for envoy in (first, second):
        envoy.ack(*envoy.send(request(CLUSTER)))
    delta._TRANSITIONS.clear()
    [one] = first.publish(snapshot("a", "c"))
    assert len(delta._TRANSITIONS) == 1
    [two] = second.publish(snapshot("a", "c"))
    assert len(delta._TRANSITIONS) == 1  # reused, not recomputed
    for update in (one, two):
        assert names(update) == ["c"] and list(decode(update).removed_resources) == ["b"]
    # A client that holds something else gets its own diff.
    held = {"a": "0" * 16, "b": "1" * 16, "z": "2" * 16}
    [own] = Envoy(snapshot("a", "c")).send(request(CLUSTER, initial=held))
    assert sorted(names(own)) == ["a", "c"]
    assert sorted(decode(own).removed_resources) == ["b", "z"]


def test_clients_starting_empty_share_their_first_answer_and_what_they_then_hold() -> None:
    """An idle fleet keeps one copy of what its clients hold, not one per stream."""
    from controlplane.xds import delta

    delta._TRANSITIONS.clear()
    first, second = Envoy(snapshot("a", "b")), Envoy(snapshot("a", "b"))
    [one], [two] = first.send(request(CLUSTER)), second.send(request(CLUSTER))
    assert len(delta._TRANSITIONS) == 1
    assert one.payload == two.payload.replace(two.nonce.encode(), one.nonce.encode())
    held = first.stream.types[CLUSTER].held
    assert held is second.stream.types[CLUSTER].held
    assert held == {n: r.version for n, r in first.current.resources(CLUSTER).items()}
    # Shared, so never changed in place: a NACK gives the stream its own.
    first.send(request(CLUSTER, nonce=one.nonce, error="no"))
    assert second.stream.types[CLUSTER].held == held


def test_resubscribing_to_a_name_the_client_holds_sends_it_again() -> None:
    envoy = Envoy(snapshot("a", "b"))
    [cds] = envoy.send(request(CLUSTER, subscribe=("a",)))
    envoy.ack(cds)
    [again] = envoy.send(request(CLUSTER, subscribe=("a",), nonce=cds.nonce))
    assert names(again) == ["a"]


def test_a_name_unsubscribed_while_its_response_is_in_flight_stays_forgotten() -> None:
    envoy = Envoy(snapshot("a", "b"))
    [cds] = envoy.send(request(CLUSTER, subscribe=("a", "b")))
    # The client drops b before it ACKs the response that carried it.
    envoy.send(request(CLUSTER, unsubscribe=("b",), nonce=cds.nonce))
    envoy.ack(cds)
    state = envoy.stream.types[CLUSTER]
    assert state.held.keys() == {"a"}
    [b] = envoy.send(request(CLUSTER, subscribe=("b",), nonce=cds.nonce))
    assert names(b) == ["b"]  # so subscribing again sends it


def test_unsubscribing_an_explicit_name_under_a_wildcard_is_answered() -> None:
    envoy = Envoy(snapshot("a", "b"))
    [cds] = envoy.send(request(CLUSTER, subscribe=("*", "a")))
    envoy.ack(cds)
    [answer] = envoy.send(request(CLUSTER, unsubscribe=("a",), nonce=cds.nonce))
    assert names(answer) == ["a"]  # the wildcard still covers it: here it is
    envoy.ack(answer)
    envoy.publish(snapshot("b"))
    state = envoy.stream.types[CLUSTER]
    assert state.wildcard and state.names == frozenset()


def test_a_subscribed_name_that_does_not_exist_is_answered_as_removed() -> None:
    envoy = Envoy(snapshot("a"))
    [eds] = envoy.send(request(ENDPOINT, subscribe=("a", "missing")))
    assert names(eds) == ["a"] and list(decode(eds).removed_resources) == ["missing"]
    envoy.ack(eds)
    assert envoy.stream.synced()  # and it is not sent again


def test_subscription_changes_on_a_stale_nonce_are_honoured() -> None:
    envoy = Envoy(snapshot("a", "b"))
    [eds] = envoy.send(request(ENDPOINT, subscribe=("a",)))
    [newer] = envoy.publish(snapshot("a", "b", port=9090))  # supersedes `eds`
    kind, state, sends = envoy.stream.receive(request(ENDPOINT, subscribe=("b",), nonce=eds.nonce))
    assert kind is RequestKind.STALE
    assert state.names == {"a", "b"}
    [b] = sends
    assert names(b) == ["b"]
    envoy.ack(b)
    assert envoy.stream.synced()
    assert newer.nonce != b.nonce


def test_a_nack_of_a_superseded_response_is_recorded_and_what_it_carried_sent_once_more() -> None:
    envoy = Envoy(snapshot("a"))
    envoy.ack(*envoy.send(request(CLUSTER)))
    [bad] = envoy.publish(snapshot("a", "b"))  # b: invalid for this client
    [newer] = envoy.publish(snapshot("a", "b", "c"))  # carries c only: b counted as applied
    assert names(newer) == ["c"]
    # The stale NACK: recorded, and b sent once more (the client takes it or NACKs the
    # latest response).
    [again] = envoy.send(request(CLUSTER, nonce=bad.nonce, error="cluster b: invalid"))
    assert names(again) == ["b"]
    assert envoy.stream.types[CLUSTER].nack_error == "cluster b: invalid"
    assert envoy.ack(newer) == []  # superseded by `again`: does not count
    assert not envoy.stream.synced()
    kind, _, sends = envoy.stream.receive(
        request(CLUSTER, nonce=again.nonce, error="cluster b: invalid")
    )
    assert (kind, sends) == (RequestKind.NACK, [])  # never in a loop
    assert envoy.stream.rejection() == "cluster b: invalid" and not envoy.stream.synced()


def test_unsubscribing_the_wildcard_forgets_what_came_through_it() -> None:
    envoy = Envoy(snapshot("a", "b"))
    [cds] = envoy.send(request(CLUSTER, subscribe=("*",)))
    envoy.ack(cds)
    envoy.send(request(CLUSTER, unsubscribe=("*",), nonce=cds.nonce))
    assert envoy.stream.types[CLUSTER].held == {}
    [again] = envoy.send(request(CLUSTER, subscribe=("*",), nonce=cds.nonce))
    assert sorted(names(again)) == ["a", "b"]


def test_a_push_that_recreates_clusters_sends_the_fleet_one_shared_endpoint_diff() -> None:
    """Every client loses track of the changed clusters' endpoints (Envoy re-creates the
    clusters and they warm only once their endpoints come again) in the same way, so the diff
    that sends them again is computed once and what the clients then hold is shared."""
    from controlplane.xds import delta

    before = snapshot("a", "b")
    changed = factories.cluster("a")
    changed.connect_timeout.FromSeconds(7)
    after = Snapshot.from_messages(
        [(CLUSTER, changed), (CLUSTER, factories.cluster("b"))]
        + [(ENDPOINT, factories.endpoints(n, 8080)) for n in ("a", "b")]
    )
    envoys = [Envoy(before), Envoy(before)]
    for envoy in envoys:
        [cds] = envoy.send(request(CLUSTER))
        [eds] = envoy.send(request(ENDPOINT, subscribe=("a", "b")))
        envoy.ack(cds), envoy.ack(eds)
    delta._TRANSITIONS.clear()
    pushed = [envoy.publish(after) for envoy in envoys]
    assert [[s.type_url for s in p] for p in pushed] == [[CLUSTER, ENDPOINT]] * 2
    (_, first), (_, second) = pushed
    assert names(first) == ["a"] and first.payload is second.payload
    assert len(delta._TRANSITIONS) == 2  # the CDS diff and the endpoints sent again
    states = [envoy.stream.types[ENDPOINT] for envoy in envoys]
    assert states[0].held is states[1].held and states[0].held_key is not None


def test_what_the_shared_delta_caches_keep_counts_against_their_budgets() -> None:
    """Each entry of the caches a fleet shares counts what it keeps alive: an outcome that
    changed nothing still takes room, and a subscription change counts the sets it holds
    (the shared set cache may have let them go)."""
    from controlplane.caches import size_of_names
    from controlplane.xds import delta
    from controlplane.xds.stream import TypeState, shared_names

    state = TypeState(ENDPOINT)
    state.held, state.held_key = {"a": "1"}, ("v1", frozenset({"a"}))
    before = delta._CHANGED_HELD.bytes
    assert not delta._mark_held_unknown(state, frozenset({"not-held"}))
    assert delta._CHANGED_HELD.bytes > before

    names = shared_names(frozenset(f"cluster-{i}" for i in range(1000)))
    before = delta._CHANGED_NAMES.bytes
    changed = delta._changed_names(names, frozenset({"one-more"}), frozenset())
    assert delta._CHANGED_NAMES.bytes - before >= size_of_names(names) + size_of_names(changed)
