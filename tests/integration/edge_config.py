"""Writes a small edge config (Envoy v3 YAML, as operators write it) for integration tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ADS = {"ads": {}, "resource_api_version": "V3"}
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
) -> Path:
    """One HTTP listener -> RDS `edge_routes` -> `routes` -> EDS clusters named by `backends`.

    Each route is Envoy's own Route form, e.g. {"match": {"prefix": "/"}, "route": {"cluster": "a"}}.
    `rds_source` replaces the listener's RDS config source (default: ADS).
    """
    directory.mkdir(parents=True, exist_ok=True)
    clusters = [
        {
            "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            "name": name,
            "type": "EDS",
            "connect_timeout": "1s",
            "eds_cluster_config": {"eds_config": ADS},
        }
        for name in backends
    ] + list(extra_clusters or [])
    endpoints = [
        {
            "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": port}
                                }
                            }
                        }
                    ]
                }
            ],
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


def route_to(cluster: str, prefix: str = "/") -> dict[str, Any]:
    return {"match": {"prefix": prefix}, "route": {"cluster": cluster}}
