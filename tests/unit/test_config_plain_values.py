"""plain_values.fill reads a config's values exactly as json_format.ParseDict does, or
declines: checked on every shipped config, the bench's, a table of awkward values, and a
few thousand values swapped for others of every kind."""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.message import Message

from controlplane import resources
from controlplane.config import loader, plain_values
from controlplane.config.yaml_source import parse_file
from tests.bench import config as bench_config

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = [REPO / "examples" / "config", REPO / "examples" / "environments"]
TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
HCM = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)


def items_in(directory: Path) -> Iterator[tuple[resources.ResourceType, dict[str, Any]]]:
    for file in sorted(directory.rglob("*.yaml")):
        document = parse_file(file)
        if not isinstance(document.value, dict) or "resources" not in document.value:
            continue
        for _, resource_type, body in loader.resource_items(document, str(file), []):
            if "${" not in repr(body):  # the loader parses an item once its variables are set
                yield resource_type, body


def json_format_reading(resource_type: resources.ResourceType, body: Any) -> Message | None:
    """What the loader makes of `body` with json_format alone: the message, or None if refused."""
    message = resource_type.message_class()
    resources.load_types(loader.any_types(body))
    return message if loader._parse_error(body, message) is None else None


def assert_same_reading(resource_type: resources.ResourceType, body: Any) -> bool:
    """fill's message is json_format's, byte for byte, or fill declined; True if it filled."""
    before = copy.deepcopy(body)
    filled = resource_type.message_class()
    accepted = plain_values.fill(filled, body)
    assert body == before, "fill changed the values it read"
    expected = json_format_reading(resource_type, body)
    if accepted:
        assert expected is not None, f"fill took what json_format refuses: {body!r}"
        assert filled.SerializeToString(deterministic=True) == expected.SerializeToString(
            deterministic=True
        ), body
    return accepted


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Any, dict[str, Any]]]:
    bench = bench_config.write_config(tmp_path_factory.mktemp("bench"), clusters=20)
    return [item for directory in (*EXAMPLES, bench) for item in items_in(directory)]


def test_every_shipped_config_and_the_bench_config_take_the_fast_path(
    corpus: list[tuple[Any, dict[str, Any]]],
) -> None:
    assert len(corpus) > 60
    for resource_type, body in corpus:
        assert assert_same_reading(resource_type, body), body


def cluster(**fields: Any) -> tuple[resources.ResourceType, dict[str, Any]]:
    return resources.resource_type(resources.CLUSTER), {"name": "c", **fields}


def endpoint(**socket_address: Any) -> tuple[resources.ResourceType, dict[str, Any]]:
    address = {"socket_address": {"address": "10.0.0.1", **socket_address}}
    body = {
        "cluster_name": "e",
        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
    }
    return resources.resource_type(resources.ENDPOINT), body


@pytest.mark.parametrize(
    ("item", "taken"),
    [
        (cluster(connect_timeout="0.25s", per_connection_buffer_limit_bytes=1024), True),
        (cluster(connectTimeout="1s", lb_policy="RING_HASH"), True),
        (cluster(metadata={"filter_metadata": {"a": {"b": [1, "x", None, {"c": True}]}}}), True),
        (
            cluster(
                transport_socket={
                    "name": "tls",
                    "typed_config": {"@type": TLS, "sni": "x", "common_tls_context": {}},
                }
            ),
            True,
        ),
        (cluster(transport_socket={"name": "t", "typed_config": {}}), True),
        (
            cluster(
                typed_extension_protocol_options={
                    "k": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": "v"}
                }
            ),
            True,
        ),
        (cluster(common_lb_config={"healthy_panic_threshold": {"value": 12}}), True),
        (cluster(common_lb_config={"healthy_panic_threshold": {"value": 12.5}}), True),
        (cluster(dns_lookup_family=1), False),  # an enum by number
        (cluster(lb_policy="NO_SUCH_POLICY"), False),
        (cluster(per_connection_buffer_limit_bytes="1024"), True),  # a wrapper: json_format's
        (endpoint(port_value=8080), True),
        (endpoint(port_value="8080"), False),  # a number as text
        (endpoint(port_value=2**40), False),  # out of range
        (endpoint(port_value=True), False),
        (endpoint(port_value=8080.0), False),
        (cluster(lb_policy=float("inf")), False),
        (cluster(common_lb_config="\ud800"), False),
        (cluster(connect_timeout=None), False),
        (cluster(name=5), False),
        (cluster(alt_stat_name="\ud800"), False),  # an unpaired surrogate
        (cluster(connect_timeout="1s", connectTimeout="2s"), False),  # both names
        (cluster(type="STATIC", cluster_type={"name": "x"}), False),  # one oneof, twice
        (cluster(no_such_field=1), False),
        (cluster(load_assignment=[]), False),
        (cluster(health_checks={"timeout": "1s"}), False),
        (cluster(common_lb_config={"healthy_panic_threshold": {"value": float("nan")}}), False),
        (
            cluster(
                transport_socket={
                    "name": "t",
                    "typed_config": {"@type": "type.googleapis.com/no.such.Type"},
                }
            ),
            False,
        ),
        (
            (
                resources.resource_type(resources.LISTENER),
                {
                    "name": "l",
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "hcm",
                                    "typed_config": {
                                        "@type": HCM,
                                        "stat_prefix": "s",
                                        "rds": {
                                            "route_config_name": "r",
                                            "config_source": {"ads": {}},
                                        },
                                        "http_filters": [{"name": "router"}],
                                    },
                                }
                            ]
                        }
                    ],
                },
            ),
            True,
        ),
    ],
)
def test_awkward_values_are_read_alike_or_left_to_json_format(
    item: tuple[resources.ResourceType, dict[str, Any]], taken: bool
) -> None:
    resource_type, body = item
    assert assert_same_reading(resource_type, body) is taken


SWAPS: list[Any] = [
    None, True, False, 0, -1, 7, 2**31, 2**64, 0.5, 1.0, float("inf"), "", "x", "5", "1s",
    "NaN", "STATIC", "\ud800", [], [1], ["x"], [{}], {}, {"a": 1}, {"@type": TLS},
]  # fmt: skip


def values_at(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from values_at(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from values_at(item, (*path, index))


def swapped(body: dict[str, Any], path: tuple[Any, ...], new: Any) -> dict[str, Any]:
    body = copy.deepcopy(body)
    parent = body
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = copy.deepcopy(new)
    return body


def test_thousands_of_swapped_values_are_read_alike_or_left_to_json_format(
    corpus: list[tuple[Any, dict[str, Any]]],
) -> None:
    chosen = random.Random(15)
    taken = declined = 0
    for _ in range(3000):
        resource_type, body = chosen.choice(corpus)
        path = chosen.choice([p for p in values_at(body) if p])
        if assert_same_reading(resource_type, swapped(body, path, chosen.choice(SWAPS))):
            taken += 1
        else:
            declined += 1
    assert taken > 200 and declined > 200, (taken, declined)  # both ways, many times
