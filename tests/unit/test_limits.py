"""Limits on one xDS request (controlplane/xds/limits.py): each refused with its name."""

from __future__ import annotations

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2

from controlplane.resources import CLUSTER, ENDPOINT
from controlplane.xds import limits
from controlplane.xds.delta import DeltaStream
from controlplane.xds.limits import RemoteProtocolError
from controlplane.xds.stream import SotwStream
from tests import factories

NODE = base_pb2.Node(id="edge-1", cluster="edge")


def sotw(**fields: object) -> discovery_pb2.DiscoveryRequest:
    fields.setdefault("type_url", ENDPOINT)
    request = discovery_pb2.DiscoveryRequest(**fields)  # type: ignore[arg-type]
    if not request.HasField("node"):
        request.node.CopyFrom(NODE)
    return request


def refusal(request: discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest) -> str:
    """Why a stream refuses the request: the same whether it is told the request's size (as
    the server tells it) or not."""
    stream_type = SotwStream if isinstance(request, discovery_pb2.DiscoveryRequest) else DeltaStream
    reasons = set()
    for size in (None, request.ByteSize()):
        stream = stream_type(1, lambda node: factories.edge_snapshot())
        with pytest.raises(RemoteProtocolError) as caught:
            stream.receive(request, size)
        reasons.add(f"{caught.value.reason}: {caught.value}")
    [reason] = reasons
    return reason


def nested(depth: int) -> struct_pb2.Struct:
    metadata = struct_pb2.Struct()
    inner = metadata
    for _ in range(depth - 1):
        inner = inner.get_or_create_struct("x")
    inner["leaf"] = 1
    return metadata


def test_too_many_names_in_one_request_are_refused_naming_the_limit() -> None:
    names = [f"c{i}" for i in range(limits.MAX_NAMES_PER_REQUEST + 1)]
    assert refusal(sotw(resource_names=names)) == (
        "limit_names: resource_names: 50,001 names, over the limit of 50,000 names"
    )
    delta = discovery_pb2.DeltaDiscoveryRequest(
        type_url=CLUSTER, node=NODE, initial_resource_versions=dict.fromkeys(names, "v")
    )
    assert refusal(delta).startswith("limit_names: initial_resource_versions: 50,001 names")


def test_a_name_over_the_length_limit_is_refused() -> None:
    assert refusal(sotw(resource_names=["x" * 5000])) == (
        "limit_name: resource_names: a name: 5,000 bytes, over the limit of 4,096 bytes"
    )
    assert refusal(sotw(type_url="t" * 5000)).startswith("limit_name: type_url: 5,000 chars")
    # Counted in bytes: 2,049 characters of two bytes each, among short names.
    over = "é" * 2048 + "x"
    assert refusal(sotw(resource_names=["web", over, "api"])) == (
        "limit_name: resource_names: a name: 4,097 bytes, over the limit of 4,096 bytes"
    )
    for field in ("resource_names_subscribe", "resource_names_unsubscribe"):
        delta = discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER, node=NODE)
        getattr(delta, field).extend(["web", over])
        assert refusal(delta) == (
            f"limit_name: {field}: a name: 4,097 bytes, over the limit of 4,096 bytes"
        )
    delta = discovery_pb2.DeltaDiscoveryRequest(
        type_url=CLUSTER, node=NODE, initial_resource_versions={over: "v"}
    )
    assert refusal(delta).startswith("limit_name: initial_resource_versions: a name: 4,097")
    at_the_limit = sotw(resource_names=["web", over[:-1], "api"])
    stream = SotwStream(1, lambda node: factories.edge_snapshot())
    assert stream.receive(at_the_limit)[0].value == "initial"


def test_node_fields_and_metadata_over_their_limits_are_refused() -> None:
    assert refusal(sotw(node=base_pb2.Node(id="n" * 2000))).startswith(
        "limit_node: node.id: 2,000 bytes, over the limit of 1,024 bytes"
    )
    big = struct_pb2.Struct()
    big["blob"] = "x" * (limits.MAX_METADATA_BYTES + 1)
    assert refusal(sotw(node=base_pb2.Node(id="n", metadata=big))).startswith(
        "limit_metadata: node.metadata: 65,5"
    )
    deep = nested(limits.MAX_METADATA_DEPTH + 1)
    assert refusal(sotw(node=base_pb2.Node(id="n", metadata=deep))) == (
        "limit_metadata: node.metadata: 17 levels deep, over the limit of 16 levels deep"
    )


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
def test_metadata_numbers_json_cannot_carry_are_refused_with_our_own_text(number) -> None:
    metadata = struct_pb2.Struct()
    metadata.get_or_create_list("l").append(number)
    assert refusal(sotw(node=base_pb2.Node(id="n", metadata=metadata))) == (
        f"bad_metadata: node.metadata holds {number}, which JSON cannot carry"
    )


def test_a_nack_text_over_its_limit_is_refused_and_a_long_one_is_clipped() -> None:
    error = status_pb2.Status(message="e" * (limits.MAX_ERROR_DETAIL_BYTES + 1))
    assert refusal(sotw(error_detail=error)).startswith("limit_error_detail:")
    stream = SotwStream(1, lambda node: factories.edge_snapshot())
    [cds] = stream.receive(sotw(type_url=CLUSTER))[2]
    long = "e" * 5000
    stream.receive(
        sotw(
            type_url=CLUSTER,
            response_nonce=cds.nonce,
            error_detail=status_pb2.Status(message=long),
        )
    )
    assert stream.types[CLUSTER].nack_error == "e" * 1024 + "…[3976 more chars]"


def test_requests_after_the_first_without_a_node_are_held_to_the_limits_too() -> None:
    """The server tells a stream each request's size, and a small one is let through
    unlooked-at: each limit must still refuse what is over it on a later request."""
    names = [f"c{i}" for i in range(limits.MAX_NAMES_PER_REQUEST + 1)]
    later = {
        "limit_names": sotw(type_url=CLUSTER, resource_names=names),
        "limit_name": sotw(type_url="t" * 5000),
        "limit_error_detail": sotw(
            type_url=CLUSTER,
            response_nonce="0.1",
            error_detail=status_pb2.Status(message="e" * (limits.MAX_ERROR_DETAIL_BYTES + 1)),
        ),
    }
    for reason, request in later.items():
        request.ClearField("node")
        stream = SotwStream(1, lambda node: factories.edge_snapshot())
        first = sotw(type_url=CLUSTER)
        stream.receive(first, first.ByteSize())
        with pytest.raises(RemoteProtocolError) as caught:
            stream.receive(request, request.ByteSize())
        assert caught.value.reason == reason


def test_requests_within_the_limits_are_served() -> None:
    metadata = nested(limits.MAX_METADATA_DEPTH)
    stream = SotwStream(1, lambda node: factories.edge_snapshot())
    request = sotw(type_url=CLUSTER, node=base_pb2.Node(id="n" * 1024, metadata=metadata))
    assert len(stream.receive(request)[2]) == 1


def test_clip_marks_the_cut() -> None:
    assert limits.clip("abc", 5) == "abc"
    assert limits.clip("abcdefg", 5) == "abcde…[2 more chars]"


def test_log_lines_are_rate_limited_per_key_and_count_what_they_left_out() -> None:
    from controlplane.xds.server import NACK_LOG_INTERVAL_SECONDS, LogRateLimit

    nack_log = LogRateLimit(NACK_LOG_INTERVAL_SECONDS)
    assert nack_log.allow(CLUSTER, 100.0) == 0
    assert nack_log.allow(CLUSTER, 101.0) is None
    assert nack_log.allow(CLUSTER, 102.0) is None
    assert nack_log.allow(ENDPOINT, 102.0) == 0  # another key has its own allowance
    assert nack_log.allow(CLUSTER, 100.0 + NACK_LOG_INTERVAL_SECONDS) == 2
