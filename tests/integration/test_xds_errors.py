"""Bad xDS requests end their own stream with a clear status; other streams carry on."""

from __future__ import annotations

import queue
from collections.abc import Iterator

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2

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


def node_with_metadata(metadata: struct_pb2.Struct) -> base_pb2.Node:
    return base_pb2.Node(id="t-1", metadata=metadata)


def deep_metadata(depth: int) -> struct_pb2.Struct:
    metadata = inner = struct_pb2.Struct()
    for _ in range(depth):
        inner = inner.get_or_create_struct("x")
    return metadata


NAN_METADATA = struct_pb2.Struct()
NAN_METADATA["n"] = float("nan")

BAD_REQUESTS = {
    "malformed bytes": (b"\xff\xff\xff", "malformed DiscoveryRequest", "malformed"),
    "no node": (
        discovery_pb2.DiscoveryRequest(type_url=resources.CLUSTER).SerializeToString(),
        "must carry a Node",
        "no_node",
    ),
    "too many names": (
        first_request(
            resources.ENDPOINT, resource_names=[f"c{i}" for i in range(50_001)]
        ).SerializeToString(),
        "resource_names: 50,001 names, over the limit of 50,000 names",
        "limit_names",
    ),
    "NaN in metadata": (
        discovery_pb2.DiscoveryRequest(
            type_url=resources.CLUSTER, node=node_with_metadata(NAN_METADATA)
        ).SerializeToString(),
        "node.metadata holds nan, which JSON cannot carry",
        "bad_metadata",
    ),
    "deep metadata": (
        discovery_pb2.DiscoveryRequest(
            type_url=resources.CLUSTER, node=node_with_metadata(deep_metadata(20))
        ).SerializeToString(),
        "over the limit of 16 levels deep",
        "limit_metadata",
    ),
    "huge node id": (
        discovery_pb2.DiscoveryRequest(
            type_url=resources.CLUSTER, node=base_pb2.Node(id="n" * 100_000)
        ).SerializeToString(),
        "node.id: 100,000 bytes, over the limit of 1,024 bytes",
        "limit_node",
    ),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_request_gets_invalid_argument_and_other_streams_carry_on(
    control_plane, channel, case, tmp_path
) -> None:
    good = Client(channel)
    good.send(first_request(resources.CLUSTER))
    cds = good.receive()
    assert cds.type_url == resources.CLUSTER and len(cds.resources) == 1

    payload, message, reason = BAD_REQUESTS[case]
    error = failure_of(channel, payload)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details()
    assert "Traceback" not in error.details() and "Error" not in error.details()
    status, _ = http_get(f"http://127.0.0.1:{control_plane.http_port}/healthz", timeout=2)
    assert status == 200

    # The good stream is unaffected: it ACKs and gets the next type in ADS order.
    good.send(
        discovery_pb2.DiscoveryRequest(
            type_url=resources.CLUSTER, version_info=cds.version_info, response_nonce=cds.nonce
        )
    )
    good.send(discovery_pb2.DiscoveryRequest(type_url=resources.LISTENER))
    lds = good.receive()
    assert lds.type_url == resources.LISTENER and len(lds.resources) == 1
    # ...and the next publish reaches it.
    config = edge_config.write(
        tmp_path / "next",
        listener_port=free_port(),
        backends={"a": 1, "b": 2},
        routes=[edge_config.route_to("b")],
    )
    control_plane.xdsctl("publish", str(config))
    update = good.receive()
    assert update.type_url == resources.CLUSTER and update.version_info != cds.version_info
    good.close()
    warnings = [e for e in control_plane.log_events() if e["event"] == "protocol error"]
    assert message in warnings[-1]["error"] and warnings[-1]["reason"] == reason
    assert len(warnings[-1]["error"]) <= 1100  # clipped: a hostile text cannot flood the log
    _, metrics = http_get(f"http://127.0.0.1:{control_plane.http_port}/metrics")
    assert f'xdscp_stream_errors_total{{reason="{reason}"}} 1.0' in metrics


def test_a_message_over_the_size_limit_is_refused_before_it_is_parsed(control_plane, channel):
    good = Client(channel)
    good.send(first_request(resources.CLUSTER))
    assert good.receive().type_url == resources.CLUSTER
    huge = first_request(resources.ENDPOINT, resource_names=["x" * 4000] * 4500)  # ~18 MiB
    error = failure_of(channel, huge.SerializeToString())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    good.send(discovery_pb2.DiscoveryRequest(type_url=resources.LISTENER))
    assert good.receive().type_url == resources.LISTENER
    good.close()


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
    # The type URL is the client's to choose: it labels no series (their number stays bounded).
    assert f'type_url="{type_url}"' not in metrics


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


def test_a_protocol_error_later_in_a_stream_is_logged_with_its_node(control_plane, channel):
    client = Client(channel)
    client.send(first_request(resources.CLUSTER))
    assert client.receive().type_url == resources.CLUSTER
    client.send(b"\xff\xff not a DiscoveryRequest")
    with pytest.raises(grpc.RpcError) as caught:
        client.receive()
    client.close()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    [warning] = [e for e in control_plane.log_events() if e["event"] == "protocol error"]
    logged = (warning["reason"], warning["node_id"], warning["group"])
    assert logged == ("malformed", "t-1", "default")
