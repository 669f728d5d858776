"""Bad xDS requests end their own stream with a clear status; other streams carry on."""

from __future__ import annotations

import queue
from collections.abc import Iterator

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from controlplane import resources
from tests.integration import edge_config
from tests.integration.harness import free_port, http_get

ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
CDS = "/envoy.service.cluster.v3.ClusterDiscoveryService/StreamClusters"
TIMEOUT = 10


class Client:
    """A hand-driven xDS stream: push requests, pull responses, each wait bounded."""

    def __init__(self, channel: grpc.Channel, method: str = ADS) -> None:
        self._requests: queue.Queue[bytes | None] = queue.Queue()
        call = channel.stream_stream(method, request_serializer=None, response_deserializer=None)
        self._responses = call(self._iterate(), timeout=60)

    def _iterate(self) -> Iterator[bytes]:
        while (item := self._requests.get()) is not None:
            yield item

    def send(self, request: discovery_pb2.DiscoveryRequest | bytes) -> None:
        self._requests.put(request if isinstance(request, bytes) else request.SerializeToString())

    def receive(self) -> discovery_pb2.DiscoveryResponse:
        return discovery_pb2.DiscoveryResponse.FromString(next(self._responses))

    def close(self) -> None:
        self._requests.put(None)
        self._responses.cancel()


@pytest.fixture
def channel(control_plane, tmp_path):
    config = edge_config.write(
        tmp_path / "c",
        listener_port=free_port(),
        backends={"a": 1},
        routes=[edge_config.route_to("a")],
    )
    control_plane.xdsctl("publish", str(config))
    with grpc.insecure_channel(f"127.0.0.1:{control_plane.xds_port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=TIMEOUT)
        yield channel


def first_request(type_url: str, **fields) -> discovery_pb2.DiscoveryRequest:  # type: ignore[no-untyped-def]
    return discovery_pb2.DiscoveryRequest(type_url=type_url, node=base_pb2.Node(id="t-1"), **fields)


def failure_of(channel: grpc.Channel, payload: bytes, method: str = ADS) -> grpc.RpcError:
    client = Client(channel, method)
    client.send(payload)
    with pytest.raises(grpc.RpcError) as caught:
        client.receive()
    client.close()
    return caught.value


BAD_REQUESTS = {
    "malformed bytes": (b"\xff\xff\xff", "malformed DiscoveryRequest"),
    "no node": (
        discovery_pb2.DiscoveryRequest(type_url=resources.CLUSTER).SerializeToString(),
        "must carry a Node",
    ),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_request_gets_invalid_argument_and_other_streams_carry_on(
    control_plane, channel, case
) -> None:
    good = Client(channel)
    good.send(first_request(resources.CLUSTER))
    cds = good.receive()
    assert cds.type_url == resources.CLUSTER and len(cds.resources) == 1

    payload, message = BAD_REQUESTS[case]
    error = failure_of(channel, payload)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details()

    # The good stream is unaffected: it ACKs and gets the next type in ADS order.
    good.send(
        discovery_pb2.DiscoveryRequest(
            type_url=resources.CLUSTER, version_info=cds.version_info, response_nonce=cds.nonce
        )
    )
    good.send(discovery_pb2.DiscoveryRequest(type_url=resources.LISTENER))
    lds = good.receive()
    assert lds.type_url == resources.LISTENER and len(lds.resources) == 1
    good.close()
    warnings = [e for e in control_plane.log_events() if e["event"] == "protocol error"]
    assert message in warnings[-1]["error"]


@pytest.mark.parametrize(
    "type_url",
    [
        "type.googleapis.com/envoy.config.endpoint.v3.LbEndpoint",  # LEDS: not served
        "type.googleapis.com/envoy.api.v2.Cluster",  # a v2 URL
    ],
)
def test_an_unknown_type_url_on_ads_is_ignored_and_the_stream_carries_on(
    control_plane, channel, type_url
) -> None:
    client = Client(channel)
    client.send(first_request(resources.CLUSTER))
    cds = client.receive()
    client.send(discovery_pb2.DiscoveryRequest(type_url=type_url))
    client.send(
        discovery_pb2.DiscoveryRequest(
            type_url=resources.CLUSTER, version_info=cds.version_info, response_nonce=cds.nonce
        )
    )
    client.send(discovery_pb2.DiscoveryRequest(type_url=resources.LISTENER))
    lds = client.receive()  # the same stream goes on
    assert lds.type_url == resources.LISTENER and len(lds.resources) == 1
    client.close()
    ignored = [e for e in control_plane.log_events() if e.get("type_url") == type_url]
    assert [e["event"] for e in ignored] == ["request for a type not served: ignored"]
    _, metrics = http_get(f"http://127.0.0.1:{control_plane.http_port}/metrics")
    assert 'xdscp_ignored_requests_total{reason="unsupported_type"} 1.0' in metrics


def test_an_unknown_type_url_on_a_per_type_service_ends_that_stream(channel) -> None:
    error = failure_of(
        channel,
        first_request("type.googleapis.com/envoy.config.nope.v3.Nope").SerializeToString(),
        CDS,
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unsupported type_url" in error.details()


def test_per_type_cluster_service_serves_clusters(channel) -> None:
    client = Client(channel, CDS)
    client.send(first_request(""))  # per-type services may leave type_url empty
    response = client.receive()
    assert response.type_url == resources.CLUSTER
    assert [r.type_url for r in response.resources] == [resources.CLUSTER]
    client.close()
