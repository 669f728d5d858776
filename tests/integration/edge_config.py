"""Writes a small edge config (Envoy v3 YAML, as operators write it) for integration tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ADS = {"ads": {}, "resource_api_version": "V3"}
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def write(
    directory: Path,
    *,
    listener_port: int,
    backends: dict[str, int],
    routes: list[dict[str, Any]],
    rds_source: dict[str, Any] | None = None,
    extra_clusters: list[dict[str, Any]] | None = None,
    eds_initial_fetch_timeout: str | None = None,
    cluster_fields: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """One HTTP listener -> RDS `edge_routes` -> `routes` -> EDS clusters named by `backends`.

    Each route is Envoy's own Route form, e.g. {"match": {"prefix": "/"}, "route": {"cluster": "a"}}.
    `rds_source` replaces the listener's RDS config source (default: ADS).
    `eds_initial_fetch_timeout` sets the EDS clusters' `initial_fetch_timeout` ("0s": wait for
    the endpoints forever); `cluster_fields` sets fields of named clusters, e.g.
    {"a": {"connect_timeout": "2s"}}.
    """
    directory.mkdir(parents=True, exist_ok=True)
    eds_config: dict[str, Any] = dict(ADS)
    if eds_initial_fetch_timeout is not None:
        eds_config["initial_fetch_timeout"] = eds_initial_fetch_timeout
    clusters = [
        {
            "@type": CLUSTER,
            "name": name,
            "type": "EDS",
            "connect_timeout": "1s",
            "eds_cluster_config": {"eds_config": eds_config},
            **(cluster_fields or {}).get(name, {}),
        }
        for name in backends
    ] + list(extra_clusters or [])
    endpoints = [
        {
            "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
            **load_assignment(name, port),
        }
        for name, port in backends.items()
    ]
    listener = {
        "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
        "name": "edge_http",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": listener_port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": HCM,
                            "stat_prefix": "edge",
                            "rds": {
                                "route_config_name": "edge_routes",
                                "config_source": rds_source or ADS,
                            },
                            "http_filters": [
                                {
                                    "name": "envoy.filters.http.router",
                                    "typed_config": {"@type": ROUTER},
                                }
                            ],
                        },
                    }
                ]
            }
        ],
    }
    route_config = {
        "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
        "name": "edge_routes",
        "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}],
    }
    for filename, items in (
        ("clusters.yaml", clusters),
        ("endpoints.yaml", endpoints),
        ("listeners.yaml", [listener]),
        ("routes.yaml", [route_config]),
    ):
        (directory / filename).write_text(yaml.safe_dump({"resources": items}, sort_keys=False))
    return directory


def load_assignment(name: str, port: int, address: str = "127.0.0.1") -> dict[str, Any]:
    """A ClusterLoadAssignment (without its @type) with one host."""
    socket_address = {"address": address, "port_value": port}
    return {
        "cluster_name": name,
        "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": {"socket_address": socket_address}}}]}
        ],
    }


def route_to(cluster: str, prefix: str = "/") -> dict[str, Any]:
    return {"match": {"prefix": prefix}, "route": {"cluster": cluster}}


def nacked_regex_route(cluster: str) -> dict[str, Any]:
    """A route whose regex RE2 refuses, so Envoy NACKs it. xdscp refuses to publish that
    (lint invalid-re2) unless the route suppresses the rule with a reason, as this one does:
    for tests of what happens when Envoy NACKs."""
    suppress = {"invalid-re2": "tests what happens when Envoy NACKs"}
    return {
        "match": {"safe_regex": {"regex": "(("}},
        "route": {"cluster": cluster},
        "metadata": {"filter_metadata": {"xdscp.lint": {"suppress": suppress}}},
    }


def direct_response(prefix: str, body: str) -> dict[str, Any]:
    """A route answering 200 `body` itself, with no cluster."""
    return {
        "match": {"prefix": prefix},
        "direct_response": {"status": 200, "body": {"inline_string": body}},
    }


def never_warming_cluster(name: str, dead_port: int) -> dict[str, Any]:
    """An EDS cluster whose endpoints come over gRPC from 127.0.0.1:`dead_port`, where nothing
    listens, waiting for them forever (`initial_fetch_timeout: 0s`). Envoy accepts it, but it
    never finishes warming: a running Envoy never ACKs the CDS update that added it, and an
    Envoy starting on it never becomes ready."""
    return {
        "@type": CLUSTER,
        "name": name,
        "type": "EDS",
        "connect_timeout": "1s",
        "eds_cluster_config": {
            "eds_config": {
                "api_config_source": {
                    "api_type": "GRPC",
                    "transport_api_version": "V3",
                    "grpc_services": [
                        {
                            "google_grpc": {
                                "target_uri": f"127.0.0.1:{dead_port}",
                                "stat_prefix": "dead_eds",
                            }
                        }
                    ],
                },
                "initial_fetch_timeout": "0s",
                "resource_api_version": "V3",
            }
        },
    }


def static_cluster(
    name: str, *, address: str = "127.0.0.1", port: int = 9, connect_timeout: str = "1s"
) -> dict[str, Any]:
    """A STATIC cluster with one host. Envoy NACKs one whose `address` is not an IP (e.g.
    "localhost": "malformed IP address"), which xdscp's publish-time checks accept."""
    return {
        "@type": CLUSTER,
        "name": name,
        "type": "STATIC",
        "connect_timeout": connect_timeout,
        "load_assignment": load_assignment(name, port, address),
    }


def write_clusters(directory: Path, clusters: list[dict[str, Any]]) -> Path:
    """A config of clusters only (no listeners, routes or endpoints)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "clusters.yaml").write_text(
        yaml.safe_dump({"resources": clusters}, sort_keys=False)
    )
    return directory


def sds_tls_cluster(name: str, secret_name: str) -> dict[str, Any]:
    """A STATIC cluster whose upstream TLS certificate is the secret `secret_name` over ADS:
    a resource that references the secret, so xdscp serves it to the group (as_served)."""
    cluster = static_cluster(name)
    cluster["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": {
                "tls_certificate_sds_secret_configs": [{"name": secret_name, "sds_config": ADS}]
            },
        },
    }
    return cluster
