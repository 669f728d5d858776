"""Snapshot diffs: per resource, per field path (inside typed_configs), deterministic text."""

from __future__ import annotations

import copy
from typing import Any

from google.protobuf import json_format

from controlplane import resources
from controlplane.diff import ADDED, CHANGED, REMOVED, UNSET, diff_snapshots, render_diff
from controlplane.snapshot import Snapshot

HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ADS = {"ads": {}, "resource_api_version": "V3"}


def cluster(name: str, connect: str = "1s", idle: str = "25s") -> dict[str, Any]:
    return {
        "@type": resources.CLUSTER,
        "name": name,
        "type": "EDS",
        "eds_cluster_config": {"eds_config": ADS},
        "connect_timeout": connect,
        "typed_extension_protocol_options": {
            HTTP_OPTIONS: {
                "@type": "type.googleapis.com/" + HTTP_OPTIONS,
                "common_http_protocol_options": {"idle_timeout": idle},
            }
        },
    }


def endpoints(name: str, port: int) -> dict[str, Any]:
    address = {"socket_address": {"address": "127.0.0.1", "port_value": port}}
    return {
        "@type": resources.ENDPOINT,
        "cluster_name": name,
        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
    }


def listener(stat_prefix: str) -> dict[str, Any]:
    return {
        "@type": resources.LISTENER,
        "name": "edge",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10080}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "hcm",
                        "typed_config": {
                            "@type": "type.googleapis.com/" + HCM,
                            "stat_prefix": stat_prefix,
                            "rds": {"route_config_name": "edge_routes", "config_source": ADS},
                        },
                    }
                ]
            }
        ],
    }


def route(prefix: str, cluster_name: str) -> dict[str, Any]:
    return {"match": {"prefix": prefix}, "route": {"cluster": cluster_name}}


def routes(items: list[dict[str, Any]]) -> dict[str, Any]:
    host = {"name": "www", "domains": ["*"], "routes": items}
    return {"@type": resources.ROUTE, "name": "edge_routes", "virtual_hosts": [host]}


def snapshot(items: list[dict[str, Any]]) -> Snapshot:
    resources.load_all_descriptors()
    messages = []
    for item in copy.deepcopy(items):
        type_url = item.pop("@type")
        message = resources.resource_type(type_url).message_class()
        json_format.ParseDict(item, message)
        messages.append((type_url, message))
    return Snapshot.from_messages(messages)


OLD = [
    cluster("api"),
    cluster("legacy"),
    endpoints("api", 8080),
    endpoints("legacy", 8090),
    listener("edge"),
    routes([route("/static/", "api"), route("/", "legacy")]),
]

NEW = [
    cluster("api", connect="2s", idle="20s"),
    cluster("web"),
    endpoints("api", 8081),
    endpoints("web", 8085),
    listener("edge_http"),
    routes([route("/static/", "api"), route("/api/", "api"), route("/", "web")]),
]

EXPECTED = """\
~ cluster api
    connect_timeout: "1s" -> "2s"
    typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].common_http_protocol_options.idle_timeout: "25s" -> "20s"
- cluster legacy (removed)
+ cluster web (added)
~ endpoint api
    endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value: 8080 -> 8081
- endpoint legacy (removed)
+ endpoint web (added)
~ listener edge
    filter_chains[0].filters[0].typed_config.stat_prefix: "edge" -> "edge_http"
~ route edge_routes
    virtual_hosts[0].routes[1].match.prefix: "/" -> "/api/"
    virtual_hosts[0].routes[1].route.cluster: "legacy" -> "api"
    virtual_hosts[0].routes[2]: (unset) -> {"match": {"prefix": "/"}, "route": {"cluster": "web"}}
2 added, 2 removed, 4 changed
"""


def test_a_known_change_renders_exactly() -> None:
    assert render_diff(diff_snapshots(snapshot(OLD), snapshot(NEW))) == EXPECTED


def test_identical_snapshots_have_no_changes() -> None:
    assert diff_snapshots(snapshot(OLD), snapshot(OLD)) == []
    assert render_diff([]) == "no changes\n"


def test_against_nothing_everything_is_added() -> None:
    diffs = diff_snapshots(None, snapshot(OLD))
    assert [(d.short_type, d.name, d.kind) for d in diffs] == [
        ("cluster", "api", ADDED),
        ("cluster", "legacy", ADDED),
        ("endpoint", "api", ADDED),
        ("endpoint", "legacy", ADDED),
        ("listener", "edge", ADDED),
        ("route", "edge_routes", ADDED),
    ]
    assert render_diff(diffs).endswith("6 added, 0 removed, 0 changed\n")


def test_a_route_inserted_first_shows_as_one_added_item() -> None:
    before = [*OLD[:4], listener("edge"), routes([route("/", "api")])]
    after = [*OLD[:4], listener("edge"), routes([route("/new/", "api"), route("/", "api")])]
    [diff] = diff_snapshots(snapshot(before), snapshot(after))
    assert diff.kind == CHANGED
    assert [(c.path, c.old) for c in diff.changes] == [("virtual_hosts[0].routes[0]", UNSET)]


def test_removed_fields_and_removed_list_items() -> None:
    before = [*OLD[:4], listener("edge"), routes([route("/a", "api"), route("/", "api")])]
    trimmed = routes([route("/", "api")])
    del trimmed["virtual_hosts"][0]["domains"]
    trimmed["virtual_hosts"][0]["domains"] = ["example.com"]
    after = [*OLD[:4], listener("edge"), trimmed]
    text = render_diff(diff_snapshots(snapshot(before), snapshot(after)))
    assert text == (
        "~ route edge_routes\n"
        '    virtual_hosts[0].domains[0]: "*" -> "example.com"\n'
        '    virtual_hosts[0].routes[0]: {"match": {"prefix": "/a"}, "route": {"cluster": "api"}}'
        " -> (unset)\n"
        "0 added, 0 removed, 1 changed\n"
    )
    assert {d.kind for d in diff_snapshots(snapshot(after), snapshot(before))} == {CHANGED}
    assert REMOVED not in {d.kind for d in diff_snapshots(snapshot(after), snapshot(before))}
