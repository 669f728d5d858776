"""What stops a publish: error-level lint findings (config.lint.refusals), in xdsctl and, by
the same rule, in the server (publish.build_snapshot)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from google.protobuf import any_pb2, struct_pb2

from controlplane import resources
from controlplane.config.environments import load_config
from controlplane.config.lint import ERROR, RULES, LintRefusal, refusals
from controlplane.config.loader import snapshot_of
from controlplane.publish import REQUEST_LOCATION, FieldRuleRefusal, build_snapshot
from tests.unit.test_lint import (
    CLUSTER,
    FIRING,
    LISTENER,
    ROUTE,
    Config,
    clean,
    find,
    hosts,
    suppress,
)


def refused(tmp_path: Path, config: Config) -> list[str]:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"resources": config}, sort_keys=False))
    loaded = load_config(tmp_path)
    return [f"{f.rule_name}: {f.message}" for f in refusals(loaded.resources, loaded.sources)]


def packed(tmp_path: Path, config: Config) -> list[any_pb2.Any]:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"resources": config}, sort_keys=False))
    return [
        any_pb2.Any(type_url=r.type_url, value=resources.serialize(r.message))
        for r in load_config(tmp_path).resources
    ]


def test_the_errors_are_the_nack_and_broken_traffic_rules() -> None:
    errors = sorted(r.name for r in RULES if r.severity == ERROR)
    assert errors == ["duplicate-name", "invalid-re2", "shadowed-route", "unknown-cluster"]


@pytest.mark.parametrize("name", sorted(FIRING))
def test_errors_are_refused_and_warnings_are_not(tmp_path: Path, name: str) -> None:
    config = clean()
    FIRING[name](config)
    found = refused(tmp_path, config)
    is_error = next(r for r in RULES if r.name == name).severity == ERROR
    assert [f.split(":")[0] for f in found] == ([name] if is_error else [])


@pytest.mark.parametrize("name", sorted(FIRING))
def test_a_reasoned_suppression_lets_an_error_through(tmp_path: Path, name: str) -> None:
    config = clean()
    suppress(FIRING[name](config), name, "accepted: see ticket NET-42")
    assert refused(tmp_path, config) == []


def test_unknown_clusters_of_weighted_routes_and_tcp_proxies_are_refused(tmp_path: Path) -> None:
    config = clean()
    hosts(config)[0]["routes"].insert(
        0,
        {
            "match": {"path": "/split"},
            "route": {
                "weighted_clusters": {
                    "clusters": [{"name": "web", "weight": 50}, {"name": "wbe", "weight": 50}]
                }
            },
        },
    )
    tcp = find(config, LISTENER, "ssh")["filter_chains"][0]["filters"][0]["typed_config"]
    tcp["cluster"] = "shh"
    assert refused(tmp_path, config) == [  # listeners, then routes
        'unknown-cluster: sends traffic to cluster "shh", which is not in the config',
        'unknown-cluster: sends traffic to cluster "wbe", which is not in the config',
    ]
    del tcp["cluster"]
    tcp["weighted_clusters"] = {
        "clusters": [{"name": "ssh", "weight": 1}, {"name": "sh", "weight": 1}]
    }
    assert refused(tmp_path, config) == [
        'unknown-cluster: sends traffic to cluster "sh", which is not in the config',
        'unknown-cluster: sends traffic to cluster "wbe", which is not in the config',
    ]


def test_a_regex_in_a_generic_xds_matcher_is_checked_too(tmp_path: Path) -> None:
    config = clean()
    hcm = find(config, LISTENER, "http")["filter_chains"][0]["filters"][0]["typed_config"]
    matched = {
        "name": "matched",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher",
            "xds_matcher": {
                "matcher_list": {
                    "matchers": [
                        {
                            "predicate": {
                                "single_predicate": {
                                    "input": {
                                        "name": "header",
                                        "typed_config": {
                                            "@type": "type.googleapis.com/envoy.type.matcher.v3"
                                            ".HttpRequestHeaderMatchInput",
                                            "header_name": "x-version",
                                        },
                                    },
                                    "value_match": {"safe_regex": {"regex": "v(?=2)"}},
                                }
                            },
                            "on_match": {
                                "action": {
                                    "name": "skip",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters"
                                        ".common.matcher.action.v3.SkipFilter"
                                    },
                                }
                            },
                        }
                    ]
                }
            },
            "extension_config": {
                "name": "buffer",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                    "max_request_bytes": 1024,
                },
            },
        },
    }
    hcm["http_filters"].insert(0, matched)
    [found] = refused(tmp_path, config)
    assert found.startswith('invalid-re2: "v(?=2)" is not valid RE2: ')


def test_the_server_refuses_by_the_same_rule(tmp_path: Path) -> None:
    config = clean()
    hosts(config)[0]["routes"].insert(0, {"match": {"path": "/gone"}, "route": {"cluster": "x"}})
    with pytest.raises(LintRefusal) as caught:
        asyncio.run(build_snapshot(packed(tmp_path, config)))
    [finding] = caught.value.findings
    assert finding.rule_name == "unknown-cluster"
    assert finding.location.file == REQUEST_LOCATION
    assert str(caught.value) == (
        f"error[XDS008 unknown-cluster]: {REQUEST_LOCATION}: "
        "RouteConfiguration.virtual_hosts[0].routes[0].route.cluster: route routes: "
        'sends traffic to cluster "x", which is not in the config'
    )
    # Suppressed with a reason, it is published: the server reads the same metadata.
    suppress(hosts(config)[0]["routes"][0], "unknown-cluster", "cluster x comes next week")
    snapshot = asyncio.run(build_snapshot(packed(tmp_path, config)))
    assert "routes" in snapshot.resources(ROUTE)


def test_the_server_refuses_a_field_rule_violation_each_time_it_is_sent(tmp_path: Path) -> None:
    """Any admin client, not only xdsctl (which locates them in its files): field rules are
    checked by the server too, and a resource it has seen pass is not let through changed."""
    config = clean()
    assert asyncio.run(build_snapshot(packed(tmp_path, config)))
    ssh = find(config, CLUSTER, "ssh")
    ssh["connect_timeout"] = "0s"
    for _ in range(2):
        with pytest.raises(FieldRuleRefusal) as caught:
            asyncio.run(build_snapshot(packed(tmp_path, config)))
        assert caught.value.problems == [
            "cluster ssh: Cluster.connect_timeout: must be greater than 0s, got 0s "
            "[validate: duration.gt]"
        ]
    ssh["connect_timeout"] = "5s"
    assert asyncio.run(build_snapshot(packed(tmp_path, config)))


def test_a_route_naming_a_cluster_specifier_plugin_its_config_lacks_is_refused(
    tmp_path: Path,
) -> None:
    config = clean()
    hosts(config)[0]["routes"].insert(
        0, {"match": {"path": "/p"}, "route": {"cluster_specifier_plugin": "pick"}}
    )
    assert refused(tmp_path, config) == [
        'unknown-cluster: names cluster specifier plugin "pick", which its route configuration '
        "does not define"
    ]
    find(config, ROUTE, "routes")["cluster_specifier_plugins"] = [
        {
            "extension": {
                "name": "pick",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.router.cluster_specifiers"
                    ".lua.v3.LuaConfig",
                    "source_code": {"inline_string": "function envoy_on_route(h) return 'web' end"},
                    "default_cluster": "web",
                },
            }
        }
    ]
    assert refused(tmp_path, config) == []


def test_the_server_prepares_only_what_it_has_not_been_sent_before(tmp_path: Path) -> None:
    """A resource's bytes, as sent, always make the same resource: the ones a publish sent
    before are kept and used again as they are; a changed one is made anew."""
    config = clean()
    first = asyncio.run(build_snapshot(packed(tmp_path, config)))
    find(config, CLUSTER, "ssh")["connect_timeout"] = "7s"
    second = asyncio.run(build_snapshot(packed(tmp_path, config)))
    assert second.resources(CLUSTER)["web"] is first.resources(CLUSTER)["web"]
    assert second.resources(ROUTE)["routes"] is first.resources(ROUTE)["routes"]
    changed = second.resources(CLUSTER)["ssh"]
    assert changed is not first.resources(CLUSTER)["ssh"]
    assert changed.message().connect_timeout.seconds == 7
    # The same version xdsctl works out from the files.
    assert second.version == snapshot_of(load_config(tmp_path).resources).version


def test_the_server_canonicalizes_what_it_is_sent(tmp_path: Path) -> None:
    """Bytes sent by any client, not only xdsctl's canonical ones: a map packed inside an
    Any in another order makes the resource xdsctl would have made, and the same version,
    sent once or again."""
    # Entries written last key first: Struct's map, as a client that does not sort may pack it.
    reversed_map = b"".join(
        struct_pb2.Struct(fields={key: struct_pb2.Value(number_value=1)}).SerializeToString()
        for key in ("zz", "m", "a")
    )
    cluster = find_message(tmp_path, CLUSTER, "web")
    cluster.metadata.typed_filter_metadata["example"].CopyFrom(
        any_pb2.Any(type_url="type.googleapis.com/google.protobuf.Struct", value=reversed_map)
    )
    sent = cluster.SerializeToString()
    canonical = cluster_pb2.Cluster.FromString(sent)
    resources.canonicalize(canonical)
    assert resources.serialize(canonical) != sent  # what makes this test mean something
    rest = [p for p in packed(tmp_path, clean()) if not _is(p, CLUSTER, "web")]
    for _ in range(2):
        snapshot = asyncio.run(build_snapshot([*rest, any_pb2.Any(type_url=CLUSTER, value=sent)]))
        assert snapshot.resources(CLUSTER)["web"].body == resources.serialize(canonical)


def find_message(tmp_path: Path, type_url: str, name: str) -> Any:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"resources": clean()}, sort_keys=False))
    return next(
        r.message
        for r in load_config(tmp_path).resources
        if (r.type_url, r.name) == (type_url, name)
    )


def _is(item: any_pb2.Any, type_url: str, name: str) -> bool:
    return (
        item.type_url == type_url
        and resources.resource_name(resources.parse(item.type_url, item.value)) == name
    )


def test_a_publish_with_several_bad_resources_is_refused_for_the_first_that_does_not_parse(
    tmp_path: Path,
) -> None:
    """Every new resource is parsed before any is canonicalized (as before any was kept): a
    resource of a type not served is named, not the unknown Any inside an earlier one."""
    cluster = find_message(tmp_path, CLUSTER, "web")
    cluster.typed_extension_protocol_options["odd"].CopyFrom(
        any_pb2.Any(type_url="type.googleapis.com/not.known.Type", value=b"")
    )
    sent = [
        any_pb2.Any(type_url=CLUSTER, value=cluster.SerializeToString()),
        any_pb2.Any(type_url="type.googleapis.com/not.a.Resource", value=b""),
    ]
    for _ in range(2):
        with pytest.raises(resources.UnknownTypeError) as caught:
            asyncio.run(build_snapshot(sent))
        assert "not.a.Resource" in str(caught.value)
