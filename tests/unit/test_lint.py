"""Lint rules: each fires on its case, stays quiet otherwise, and obeys reasoned suppressions."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.config.environments import load_config
from controlplane.config.lint import RULES, Finding, lint, rule
from controlplane.config.loader import Location

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
TCP_PROXY = "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
ADS = {"ads": {}, "resource_api_version": "V3"}

Config = list[dict[str, Any]]


def http_cluster(name: str, idle: str | None = "60s", keepalive: str | None = "75s") -> dict:
    cluster: dict[str, Any] = {
        "@type": CLUSTER,
        "name": name,
        "type": "EDS",
        "eds_cluster_config": {"eds_config": ADS},
        "connect_timeout": "1s",
    }
    if keepalive is not None:
        cluster["metadata"] = {
            "filter_metadata": {"xdscp.backend": {"keepalive_timeout": keepalive}}
        }
    common = {"idle_timeout": idle} if idle is not None else {}
    cluster["typed_extension_protocol_options"] = {
        HTTP_OPTIONS: {
            "@type": "type.googleapis.com/" + HTTP_OPTIONS,
            "common_http_protocol_options": common,
            "explicit_http_config": {"http_protocol_options": {}},
        }
    }
    return cluster


def endpoints(name: str, port: int) -> dict:
    address = {"socket_address": {"address": "127.0.0.1", "port_value": port}}
    return {
        "@type": ENDPOINT,
        "cluster_name": name,
        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
    }


def get_route(prefix: str, cluster: str, retry_on: str | None = "reset,connect-failure") -> dict:
    route: dict[str, Any] = {
        "match": {
            "prefix": prefix,
            "headers": [{"name": ":method", "string_match": {"exact": "GET"}}],
        },
        "route": {"cluster": cluster},
    }
    if retry_on is not None:
        route["route"]["retry_policy"] = {"retry_on": retry_on, "num_retries": 2}
    return route


def clean() -> Config:
    """An edge config that breaks no rule: HTTP to web, SSH through a TCP proxy."""
    ssh = {
        "@type": CLUSTER,
        "name": "ssh",
        "type": "EDS",
        "eds_cluster_config": {"eds_config": ADS},
        "connect_timeout": "5s",
        "upstream_connection_options": {"tcp_keepalive": {"keepalive_time": 300}},
    }
    http_listener = {
        "@type": LISTENER,
        "name": "http",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10080}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "hcm",
                        "typed_config": {
                            "@type": "type.googleapis.com/" + HCM,
                            "stat_prefix": "http",
                            "rds": {"route_config_name": "routes", "config_source": ADS},
                            "http_filters": [
                                {
                                    "name": "router",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters"
                                        ".http.router.v3.Router"
                                    },
                                }
                            ],
                        },
                    }
                ]
            }
        ],
    }
    ssh_listener = {
        "@type": LISTENER,
        "name": "ssh",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10022}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "tcp",
                        "typed_config": {
                            "@type": "type.googleapis.com/" + TCP_PROXY,
                            "stat_prefix": "ssh",
                            "cluster": "ssh",
                            "idle_timeout": "3600s",
                        },
                    }
                ]
            }
        ],
    }
    routes = {
        "@type": ROUTE,
        "name": "routes",
        "virtual_hosts": [
            {
                "name": "www",
                "domains": ["*"],
                "routes": [
                    get_route("/", "web"),
                    {"match": {"prefix": "/"}, "route": {"cluster": "web"}},
                ],
            }
        ],
    }
    return [
        http_cluster("web"),
        ssh,
        endpoints("web", 8080),
        endpoints("ssh", 2222),
        http_listener,
        ssh_listener,
        routes,
    ]


def find(config: Config, type_url: str, name: str) -> dict[str, Any]:
    key = "cluster_name" if type_url == ENDPOINT else "name"
    return next(r for r in config if r["@type"] == type_url and r[key] == name)


def run(tmp_path: Path, config: Config, **options: Any) -> list[Finding]:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"resources": config}, sort_keys=False))
    loaded = load_config(tmp_path)
    return lint(loaded.resources, loaded.sources, **options)


def ids(findings: list[Finding]) -> list[str]:
    return [f"{f.rule_id} {f.rule_name}" for f in findings]


# --- One firing case per rule, and where its suppression goes -------------------------------


def hosts(config: Config) -> list[dict[str, Any]]:
    return find(config, ROUTE, "routes")["virtual_hosts"]


def idle_longer_than_keepalive(config: Config) -> dict[str, Any]:
    web = find(config, CLUSTER, "web")
    web["typed_extension_protocol_options"][HTTP_OPTIONS]["common_http_protocol_options"] = {
        "idle_timeout": "80s"
    }
    return web


def ssh_without_keepalive(config: Config) -> dict[str, Any]:
    ssh = find(config, CLUSTER, "ssh")
    del ssh["upstream_connection_options"]
    return ssh


def get_retry_without_reset(config: Config) -> dict[str, Any]:
    route = hosts(config)[0]["routes"][0]
    route["route"]["retry_policy"]["retry_on"] = "retriable-4xx"
    return route


def shadowed(config: Config) -> dict[str, Any]:
    route = {"match": {"prefix": "/api"}, "route": {"cluster": "web"}}
    hosts(config)[0]["routes"].append(route)
    return route


def lookahead_regex(config: Config) -> dict[str, Any]:
    route = {"match": {"safe_regex": {"regex": "/(?!admin).*"}}, "route": {"cluster": "web"}}
    hosts(config)[0]["routes"].insert(0, route)
    return hosts(config)[0]


def duplicate_domain(config: Config) -> dict[str, Any]:
    hosts(config).append(
        {
            "name": "other",
            "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "web"}}],
        }
    )
    return find(config, ROUTE, "routes")


def spare_cluster(config: Config) -> dict[str, Any]:
    spare = http_cluster("spare")
    config += [spare, endpoints("spare", 9000)]
    return spare


def route_to_missing(config: Config) -> dict[str, Any]:
    route = {"match": {"path": "/gone"}, "route": {"cluster": "missing"}}
    hosts(config)[0]["routes"].insert(0, route)
    return route


FIRING: dict[str, Callable[[Config], dict[str, Any]]] = {
    "keepalive-ordering": idle_longer_than_keepalive,
    "tcp-keepalive": ssh_without_keepalive,
    "idempotent-retry": get_retry_without_reset,
    "shadowed-route": shadowed,
    "invalid-re2": lookahead_regex,
    "duplicate-name": duplicate_domain,
    "unused-cluster": spare_cluster,
    "unknown-cluster": route_to_missing,
}


def suppress(holder: dict[str, Any], key: str, reason: Any) -> None:
    metadata = holder.setdefault("metadata", {}).setdefault("filter_metadata", {})
    metadata.setdefault("xdscp.lint", {}).setdefault("suppress", {})[key] = reason


def test_every_rule_has_a_firing_case() -> None:
    assert sorted(FIRING) == sorted(r.name for r in RULES)


def test_the_clean_config_and_the_examples_have_no_findings(tmp_path: Path) -> None:
    assert run(tmp_path, clean()) == []
    repo = Path(__file__).resolve().parents[2]
    for directory, env in (
        (repo / "examples/config", None),
        (repo / "examples/environments", "prod"),
    ):
        loaded = load_config(directory, env)
        assert lint(loaded.resources, loaded.sources) == []


@pytest.mark.parametrize("name", sorted(FIRING))
def test_rule_fires(tmp_path: Path, name: str) -> None:
    config = clean()
    FIRING[name](config)
    findings = run(tmp_path, config)
    assert ids(findings) == [f"{rule(name).id} {name}"]
    finding = findings[0]
    assert finding.severity == rule(name).severity
    assert finding.hint == rule(name).hint
    assert finding.location.file == str(tmp_path / "config.yaml")
    assert finding.location.line is not None


@pytest.mark.parametrize("name", sorted(FIRING))
def test_a_reasoned_suppression_silences_the_rule_for_that_resource(
    tmp_path: Path, name: str
) -> None:
    config = clean()
    suppress(FIRING[name](config), name, "accepted: see ticket NET-42")
    assert run(tmp_path, config) == []
    [kept] = run(tmp_path, config, include_suppressed=True)
    assert (kept.rule_name, kept.suppressed) == (name, "accepted: see ticket NET-42")


@pytest.mark.parametrize("name", sorted(FIRING))
def test_a_suppression_without_reason_is_an_error_and_suppresses_nothing(
    tmp_path: Path, name: str
) -> None:
    config = clean()
    suppress(FIRING[name](config), rule(name).id, "  ")
    findings = run(tmp_path, config)
    assert ids(findings) == ["XDS000 lint-suppression", f"{rule(name).id} {name}"]
    assert findings[0].message == f"suppressing {name} needs a reason (a non-empty string)"
    assert findings[0].severity == "error"


def test_suppressing_an_unknown_rule_is_an_error(tmp_path: Path) -> None:
    config = clean()
    suppress(find(config, CLUSTER, "web"), "keepalive-order", "typo")
    [finding] = run(tmp_path, config)
    assert finding.rule_id == "XDS000"
    assert finding.message.startswith('suppresses unknown rule "keepalive-order"')
    assert (
        finding.field_path
        == "Cluster.metadata.filter_metadata[xdscp.lint].suppress.keepalive-order"
    )


# --- Exact findings, and the cases that must not fire -----------------------------------------


def test_keepalive_ordering_seed_case(tmp_path: Path) -> None:
    config = clean()
    idle_longer_than_keepalive(config)
    [finding] = run(tmp_path, config)
    assert finding.message == (
        "upstream idle_timeout 80s is not shorter than the backend's keep-alive timeout 75s: "
        "Envoy may reuse a connection the backend is closing, and the request fails with a reset"
    )
    assert finding.field_path == (
        "Cluster.typed_extension_protocol_options[envoy.extensions.upstreams.http.v3"
        ".HttpProtocolOptions].common_http_protocol_options.idle_timeout"
    )
    assert (finding.resource_type, finding.resource_name) == ("cluster", "web")
    lines = (tmp_path / "config.yaml").read_text().splitlines()
    assert lines[finding.location.line - 1].strip() == "idle_timeout: 80s"


@pytest.mark.parametrize(
    ("idle", "keepalive", "fires"),
    [
        ("74s", "75s", False),
        ("75s", "75s", True),  # equal is a race too
        (None, "75s", True),  # unset: Envoy's default is an hour
        ("0s", "75s", True),  # 0 disables the idle timeout
        ("60s", None, True),  # nothing declared to compare with
        ("60s", "1m", True),
        ("59s", "1m", False),
        ("60s", "soon", True),
    ],
)
def test_keepalive_ordering_cases(
    tmp_path: Path, idle: str | None, keepalive: str | None, fires: bool
) -> None:
    config = clean()
    config[0] = http_cluster("web", idle, keepalive)
    assert ids(run(tmp_path, config)) == (["XDS001 keepalive-ordering"] if fires else [])


def test_tcp_keepalive_is_not_needed_behind_a_short_idle_timeout(tmp_path: Path) -> None:
    config = clean()
    ssh_without_keepalive(config)
    proxy = find(config, LISTENER, "ssh")["filter_chains"][0]["filters"][0]["typed_config"]
    proxy["idle_timeout"] = "60s"
    assert run(tmp_path, config) == []
    proxy["idle_timeout"] = "0s"  # no idle timeout at all: sessions live forever
    assert ids(run(tmp_path, config)) == ["XDS002 tcp-keepalive"]


def test_tcp_keepalive_needs_a_keepalive_time(tmp_path: Path) -> None:
    config = clean()
    find(config, CLUSTER, "ssh")["upstream_connection_options"] = {"tcp_keepalive": {}}
    [finding] = run(tmp_path, config)
    assert "no keepalive_time" in finding.message


def test_retries_on_non_idempotent_or_5xx_routes_do_not_fire(tmp_path: Path) -> None:
    config = clean()
    routes = hosts(config)[0]["routes"]
    routes[0]["route"]["retry_policy"]["retry_on"] = "5xx"
    post = get_route("/", "web", retry_on="retriable-4xx")
    post["match"]["headers"][0]["string_match"]["exact"] = "POST"
    routes.insert(0, post)
    assert run(tmp_path, config) == []


def test_a_virtual_host_retry_policy_applies_to_its_idempotent_routes(tmp_path: Path) -> None:
    config = clean()
    host = hosts(config)[0]
    host["routes"][0] = get_route("/", "web", retry_on=None)
    host["retry_policy"] = {"retry_on": "gateway-error"}
    [finding] = run(tmp_path, config)
    assert (
        finding.message == "GET route retries on 'gateway-error' but not on reset, connect-failure"
    )
    assert finding.field_path == "RouteConfiguration.virtual_hosts[0].retry_policy.retry_on"


def test_shadowed_route_seed_case(tmp_path: Path) -> None:
    config = clean()
    shadowed(config)
    [finding] = run(tmp_path, config)
    assert finding.message == (
        "route 2 in virtual host www can never match: route 1 (prefix '/') takes every request "
        "it would"
    )
    assert finding.field_path == "RouteConfiguration.virtual_hosts[0].routes[2].match"


@pytest.mark.parametrize(
    ("earlier", "later", "shadows"),
    [
        ({"prefix": "/api"}, {"prefix": "/api/v1"}, True),
        ({"prefix": "/api/v1"}, {"prefix": "/api"}, False),
        ({"prefix": "/api"}, {"path": "/api/x"}, True),
        ({"path": "/a"}, {"path": "/a"}, True),
        ({"path": "/a"}, {"prefix": "/a"}, False),
        ({"prefix": "/API", "case_sensitive": False}, {"prefix": "/api/x"}, True),
        ({"prefix": "/api"}, {"prefix": "/api/x", "case_sensitive": False}, False),
        ({"path_separated_prefix": "/api"}, {"path": "/api/x"}, True),
        ({"path_separated_prefix": "/api"}, {"prefix": "/apix"}, False),
        ({"safe_regex": {"regex": "/a/.*"}}, {"path": "/a/b"}, True),
        ({"safe_regex": {"regex": "/a/.*"}}, {"prefix": "/a/"}, False),
        ({"prefix": ""}, {"safe_regex": {"regex": ".*"}}, True),
        (
            {"prefix": "/", "headers": [{"name": "x", "present_match": True}]},
            {"prefix": "/a"},
            False,
        ),
        (
            {"prefix": "/", "headers": [{"name": "x", "present_match": True}]},
            {"prefix": "/a", "headers": [{"name": "x", "present_match": True}]},
            True,
        ),
        (
            {"prefix": "/", "runtime_fraction": {"default_value": {"numerator": 50}}},
            {"prefix": "/a"},
            False,
        ),
    ],
)
def test_shadowing_is_decided_conservatively(
    tmp_path: Path, earlier: dict, later: dict, shadows: bool
) -> None:
    config = clean()
    hosts(config).insert(
        0,
        {
            "name": "api",
            "domains": ["api.example.com"],
            "routes": [
                {"match": earlier, "route": {"cluster": "web"}},
                {"match": later, "route": {"cluster": "web"}},
            ],
        },
    )
    assert ids(run(tmp_path, config)) == (["XDS004 shadowed-route"] if shadows else [])


def test_invalid_re2_seed_case_and_program_size(tmp_path: Path) -> None:
    config = clean()
    lookahead_regex(config)
    hosts(config)[0]["routes"].insert(
        0, {"match": {"safe_regex": {"regex": "/(a|b|c|d|e){300}"}}, "route": {"cluster": "web"}}
    )
    first, second = run(tmp_path, config)
    assert second.message == '"/(?!admin).*" is not valid RE2: invalid perl operator: (?!'
    assert (
        second.field_path == "RouteConfiguration.virtual_hosts[0].routes[1].match.safe_regex.regex"
    )
    assert first.message == (
        '"/(a|b|c|d|e){300}" compiles to an RE2 program of size 905, over Envoy\'s limit of 100'
    )


def test_regexes_inside_typed_configs_are_checked(tmp_path: Path) -> None:
    config = clean()
    hcm = find(config, LISTENER, "http")["filter_chains"][0]["filters"][0]["typed_config"]
    regex = {"name": "x-version", "string_match": {"safe_regex": {"regex": "^v(\\d)\\1"}}}
    hcm["access_log"] = [
        {
            "name": "stdout",
            "filter": {"header_filter": {"header": regex}},
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3"
                ".StdoutAccessLog"
            },
        }
    ]
    [finding] = run(tmp_path, config)
    assert finding.message == '"^v(\\d)\\1" is not valid RE2: invalid escape sequence: \\1'
    assert finding.field_path == (
        "Listener.filter_chains[0].filters[0].typed_config.access_log[0].filter.header_filter"
        ".header.string_match.safe_regex.regex"
    )


def test_duplicate_names_and_addresses(tmp_path: Path) -> None:
    config = clean()
    hosts(config).append(
        {
            "name": "www",
            "domains": ["b.example.com"],
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "web"}}],
        }
    )
    find(config, LISTENER, "ssh")["address"]["socket_address"]["port_value"] = 10080
    findings = run(tmp_path, config)
    assert [f.message for f in findings] == [
        "virtual host name 'www' also used by virtual_hosts[0]",
        "listens on 127.0.0.1:10080, like listener http (Envoy refuses this)",
    ]


def test_duplicate_resources_are_reported_when_linting_a_list(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"resources": clean()}, sort_keys=False))
    loaded = load_config(tmp_path)
    findings = lint(loaded.resources + loaded.resources[:1], loaded.sources)
    assert [(f.rule_id, f.resource_name) for f in findings] == [("XDS006", "web")]


def test_unused_cluster_is_not_decided_when_routes_pick_clusters_by_header(tmp_path: Path) -> None:
    config = clean()
    spare_cluster(config)
    hosts(config)[0]["routes"][1]["route"] = {"cluster_header": "x-cluster"}
    assert run(tmp_path, config) == []


def test_a_cluster_used_only_by_another_resource_counts_as_used(tmp_path: Path) -> None:
    config = clean()
    spare_cluster(config)
    hcm = find(config, LISTENER, "http")["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"].insert(
        0,
        {
            "name": "ext_authz",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
                "grpc_service": {"envoy_grpc": {"cluster_name": "spare"}},
            },
        },
    )
    assert run(tmp_path, config) == []


def test_unknown_cluster_names_the_route(tmp_path: Path) -> None:
    config = clean()
    route_to_missing(config)
    [finding] = run(tmp_path, config)
    assert finding.message == 'sends traffic to cluster "missing", which is not in the config'
    assert finding.field_path == "RouteConfiguration.virtual_hosts[0].routes[0].route.cluster"
    assert finding.location == Location(str(tmp_path / "config.yaml"), finding.location.line)


def test_suppression_on_a_virtual_host_covers_its_routes_only(tmp_path: Path) -> None:
    config = clean()
    route_to_missing(config)
    other = copy.deepcopy(hosts(config)[0])
    other["name"], other["domains"] = "other", ["other.example.com"]
    hosts(config).append(other)
    suppress(hosts(config)[0], "unknown-cluster", "being migrated")
    [finding] = run(tmp_path, config)
    assert finding.field_path == "RouteConfiguration.virtual_hosts[1].routes[0].route.cluster"


def test_shadowed_route_checks_only_the_routes_that_could_cover_and_finds_what_all_pairs_find() -> (
    None
):
    """The path index (lint._EarlierRoutes) skips pairs `_covers` would reject: on random
    virtual hosts it reports exactly the first covering route a check of every pair does."""
    import random

    from envoy.config.route.v3 import route_components_pb2

    from controlplane.config.lint import _covers, _EarlierRoutes

    rng = random.Random(15)
    texts = ["", "/", "/a", "/a/", "/a/b", "/A/b", "/ab", "/a/b/c", "/b", "/B"]

    def random_match() -> route_components_pb2.RouteMatch:
        match = route_components_pb2.RouteMatch()
        kind = rng.choice(["prefix", "path", "path_separated_prefix", "safe_regex", "connect"])
        if kind == "safe_regex":
            match.safe_regex.regex = rng.choice(["/a.*", "/b", ".*"])
        elif kind == "connect":
            match.connect_matcher.SetInParent()
        else:
            setattr(match, kind, rng.choice(texts))
        if rng.random() < 0.3:
            match.case_sensitive.value = rng.random() < 0.5
        if rng.random() < 0.2:
            match.headers.add(name="x-canary").present_match = True
        return match

    checked = 0
    for _ in range(300):
        routes = [random_match() for _ in range(rng.randint(1, 12))]
        index = _EarlierRoutes()
        for j, later in enumerate(routes):
            every_pair = next((i for i in range(j) if _covers(routes[i], later)), None)
            indexed = next(
                (i for i in index.that_may_cover(later) if _covers(routes[i], later)), None
            )
            assert indexed == every_pair, (routes[: j + 1], indexed, every_pair)
            checked += every_pair is not None
            index.add(j, later)
    assert checked > 100  # the random tables did shadow routes, often


def test_a_case_insensitive_prefix_before_a_regex_route_is_not_a_crash() -> None:
    """Lint compared the prefix with the regex route's matcher as text, raising TypeError:
    `xdsctl validate`, `publish` and the server's Publish failed on a valid config."""
    from envoy.config.route.v3 import route_components_pb2

    from controlplane.config.lint import _covers

    prefix = route_components_pb2.RouteMatch(prefix="/a")
    prefix.case_sensitive.value = False
    regex = route_components_pb2.RouteMatch()
    regex.safe_regex.regex = "/a.*"
    assert _covers(prefix, regex) is False
