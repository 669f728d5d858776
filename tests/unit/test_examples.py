"""examples/config loads with the config loader and holds the edge setup the docs describe."""

from __future__ import annotations

from pathlib import Path

from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.http.ratelimit.v3 import rate_limit_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from controlplane import resources
from controlplane.config.environments import load_environment

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "config"
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
LOCAL_RATELIMIT = "envoy.filters.http.local_ratelimit"


def by_type() -> dict[str, list[str]]:
    names: dict[str, list[str]] = {}
    for resource in load_environment(EXAMPLES):
        names.setdefault(resource.type_url, []).append(resource.name)
    return names


def test_examples_load_with_expected_names() -> None:
    assert by_type() == {
        resources.CLUSTER: ["web", "api", "static", "ssh_bastion", "ratelimit"],
        resources.ENDPOINT: ["web", "api", "static", "ssh_bastion", "ratelimit"],
        resources.LISTENER: ["edge_http", "edge_http_ipv6", "edge_ssh"],
        resources.ROUTE: ["edge_routes"],
    }


def test_example_references_resolve_within_the_examples() -> None:
    loaded = load_environment(EXAMPLES)
    present = {(r.type_url, r.name) for r in loaded}
    wanted = {ref for r in loaded for ref in resources.references(r.message)}
    assert wanted
    assert wanted <= present


def test_http_clusters_idle_out_before_the_backend_keepalive() -> None:
    clusters = [r.message for r in load_environment(EXAMPLES) if r.type_url == resources.CLUSTER]
    http = [
        c
        for c in clusters
        if HTTP_OPTIONS in c.typed_extension_protocol_options
        and "xdscp.backend" in c.metadata.filter_metadata
    ]
    assert {c.name for c in http} == {"web", "api", "static"}
    for cluster in http:
        options = http_protocol_options_pb2.HttpProtocolOptions()
        assert cluster.typed_extension_protocol_options[HTTP_OPTIONS].Unpack(options)
        idle = options.common_http_protocol_options.idle_timeout.ToTimedelta()
        backend = cluster.metadata.filter_metadata["xdscp.backend"]
        keepalive = backend.fields["keepalive_timeout"].string_value
        assert keepalive.endswith("s")
        assert idle.total_seconds() < float(keepalive[:-1]), cluster.name


def test_every_example_route_has_a_local_bucket_and_a_global_descriptor() -> None:
    [routes] = [r.message for r in load_environment(EXAMPLES) if r.type_url == resources.ROUTE]
    names: list[str] = []
    for host in routes.virtual_hosts:
        for route in host.routes:
            bucket = local_rate_limit_pb2.LocalRateLimit()
            assert route.typed_per_filter_config[LOCAL_RATELIMIT].Unpack(bucket), route
            assert bucket.token_bucket.max_tokens > 0
            assert bucket.filter_enforced.default_value.numerator == 100
            [limit] = route.route.rate_limits
            key = limit.actions[0].generic_key
            assert (key.descriptor_key, key.descriptor_value) == ("route", bucket.stat_prefix)
            names.append(bucket.stat_prefix)
    assert len(names) == len(set(names)) == 6


def test_http_listeners_read_proxy_protocol_and_limit_before_routing() -> None:
    listeners = {
        r.name: r.message for r in load_environment(EXAMPLES) if r.type_url == resources.LISTENER
    }
    for name in ("edge_http", "edge_http_ipv6"):
        [proxy_protocol] = listeners[name].listener_filters
        assert proxy_protocol.name == "envoy.filters.listener.proxy_protocol"
        [chain] = listeners[name].filter_chains
        manager = http_connection_manager_pb2.HttpConnectionManager()
        assert chain.filters[0].typed_config.Unpack(manager)
        assert [f.name for f in manager.http_filters] == [
            LOCAL_RATELIMIT,
            "envoy.filters.http.ratelimit",
            "envoy.filters.http.router",
        ]
        global_limit = rate_limit_pb2.RateLimit()
        assert manager.http_filters[1].typed_config.Unpack(global_limit)
        assert global_limit.domain == "edge"
        assert not global_limit.failure_mode_deny
        service = global_limit.rate_limit_service.grpc_service.envoy_grpc
        assert service.cluster_name == "ratelimit"
    [ssh_proxy_protocol] = listeners["edge_ssh"].listener_filters
    assert ssh_proxy_protocol.name == "envoy.filters.listener.proxy_protocol"
