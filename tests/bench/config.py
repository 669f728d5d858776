"""A realistic edge config for the benchmark, as Envoy v3 YAML in a directory.

`write_config(dir, clusters=200, listeners=20)` writes EDS clusters with a few endpoints
each, `listeners` HTTP listeners whose HttpConnectionManager takes its routes over RDS (one
RouteConfiguration per listener), and route configs whose routes together reference every
cluster. `variant="v2"` differs a little from v1, as a typical change does: one extra
cluster (with endpoints) and a route to it, and one more endpoint in cluster 0. Going back
from v2 to v1 so changes CDS, EDS and RDS, and leaves LDS alone. "v3", "v4", ... are the
same change with another name for the extra cluster (a fresh update for each round).

`target_versions(dir)` computes the per-type versions xdscp will serve for that directory,
exactly as `xdsctl publish` builds the snapshot (versions are content hashes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ADS = {"ads": {}, "resource_api_version": "V3"}
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"

# The types a simulated Envoy subscribes to (no SDS in the bench config).
SUBSCRIBED_TYPES = (CLUSTER, ENDPOINT, LISTENER, ROUTE)
EXTRA_CLUSTER = "svc-extra"


def cluster_name(i: int) -> str:
    return f"svc-{i:04d}"


def _cluster(name: str) -> dict[str, Any]:
    return {
        "@type": CLUSTER,
        "name": name,
        "type": "EDS",
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "eds_cluster_config": {"eds_config": ADS, "service_name": name},
        "circuit_breakers": {"thresholds": [{"max_connections": 1024, "max_requests": 1024}]},
        "common_lb_config": {"healthy_panic_threshold": {"value": 50.0}},
    }


def _endpoints(name: str, index: int, count: int) -> dict[str, Any]:
    return {
        "@type": ENDPOINT,
        "cluster_name": name,
        "endpoints": [
            {
                "locality": {"region": "bench", "zone": f"zone-{zone}"},
                "lb_endpoints": [
                    {
                        "endpoint": {
                            "address": {
                                "socket_address": {
                                    "address": f"10.{index // 250 % 250}.{index % 250}.{10 + k}",
                                    "port_value": 8080,
                                }
                            }
                        },
                        "load_balancing_weight": 1,
                    }
                    for k in range(count)
                    if k % 2 == zone
                ],
            }
            for zone in (0, 1)
        ],
    }


def _listener(i: int) -> dict[str, Any]:
    return {
        "@type": LISTENER,
        "name": f"listener-{i:02d}",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10000 + i}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": HCM,
                            "stat_prefix": f"listener_{i:02d}",
                            "rds": {"route_config_name": f"routes-{i:02d}", "config_source": ADS},
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


def _route(prefix: str, cluster: str) -> dict[str, Any]:
    return {
        "match": {"prefix": prefix},
        "route": {"cluster": cluster, "timeout": "15s"},
    }


def _route_config(i: int, clusters: list[str]) -> dict[str, Any]:
    """Clusters spread over 4 virtual hosts, one route per cluster, and a catch-all."""
    hosts = []
    for h in range(4):
        mine = clusters[h::4]
        routes = [_route(f"/{name}/", name) for name in mine]
        if mine:
            routes.append(_route("/", mine[0]))
        if routes:
            hosts.append(
                {
                    "name": f"vhost-{i:02d}-{h}",
                    "domains": [f"h{h}.l{i:02d}.bench.example.com"],
                    "routes": routes,
                }
            )
    return {"@type": ROUTE, "name": f"routes-{i:02d}", "virtual_hosts": hosts}


def write_config(
    directory: Path,
    *,
    clusters: int = 200,
    listeners: int = 20,
    endpoints_per_cluster: int = 4,
    variant: str = "v1",
) -> Path:
    """Write the bench config (`variant` "v1", "v2", "v3", ...) into `directory`."""
    if not (variant.startswith("v") and variant[1:].isdigit() and int(variant[1:]) >= 1):
        raise ValueError(f"variant must be v1, v2, v3, ..., not {variant!r}")
    if clusters < 1 or listeners < 1:
        raise ValueError("need at least one cluster and one listener")
    directory.mkdir(parents=True, exist_ok=True)
    names = [cluster_name(i) for i in range(clusters)]
    endpoint_counts = {name: endpoints_per_cluster for name in names}
    if variant != "v1":
        extra = EXTRA_CLUSTER if variant == "v2" else f"{EXTRA_CLUSTER}-{variant}"
        names.append(extra)
        endpoint_counts[extra] = endpoints_per_cluster
        endpoint_counts[names[0]] += 1
    # Cluster k is routed from route config k % listeners (the extra one lands in some config).
    by_listener: list[list[str]] = [[] for _ in range(listeners)]
    for k, name in enumerate(names):
        by_listener[k % listeners].append(name)
    files = {
        "clusters.yaml": [_cluster(name) for name in names],
        "endpoints.yaml": [
            _endpoints(name, k, endpoint_counts[name]) for k, name in enumerate(names)
        ],
        "listeners.yaml": [_listener(i) for i in range(listeners)],
        "routes.yaml": [_route_config(i, by_listener[i]) for i in range(listeners)],
    }
    for filename, items in files.items():
        (directory / filename).write_text(yaml.safe_dump({"resources": items}, sort_keys=False))
    return directory


def target_versions(directory: Path) -> tuple[str, dict[str, str]]:
    """(snapshot version, {type URL: version}) for the subscribed types of `directory`."""
    from controlplane.config import load_directory
    from controlplane.snapshot import Snapshot

    loaded = load_directory(directory)
    snapshot = Snapshot.from_messages((r.type_url, r.message) for r in loaded)
    versions = snapshot.type_versions()
    return snapshot.version, {url: versions[url] for url in SUBSCRIBED_TYPES}
