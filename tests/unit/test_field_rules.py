"""Envoy's protoc-gen-validate annotations, enforced at load time with file, line and field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_pb2
from validate import validate_pb2

from controlplane.config import field_rules, load_directory
from controlplane.config.environments import load_environment
from controlplane.config.field_rules import check_field_rules, violations

REPO = Path(__file__).resolve().parents[2]
HCM = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)

# Each resource breaks rules Envoy enforces; the comment on a line names the rule it breaks.
BROKEN = f"""\
resources:
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: web
  type: STATIC
  connect_timeout: 0s                         # duration.gt
  health_checks:
  - timeout: 1s                               # oneof health_checker required (item line)
    interval: 5s
    healthy_threshold: 1
    unhealthy_threshold: 1
  - timeout: 1s
    interval: 5s
    healthy_threshold: 1
    unhealthy_threshold: 1
    http_health_check:
      path: "/health\\nz"                      # string.well_known_regex (strict header value)
      method: CONNECT                         # enum.not_in
  outlier_detection:
    max_ejection_percent: 150                 # uint32.lte through a UInt32Value wrapper
  preconnect_policy:
    per_upstream_preconnect_ratio: 5.0        # double.lte through a DoubleValue wrapper
  load_assignment:
    cluster_name: web
    endpoints:
    - lb_endpoints:
      - endpoint:
          address:
            socket_address: {{address: 10.0.0.1, port_value: 70000}}   # uint32.lte
- "@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
  name: routes
  virtual_hosts:
  - name: www
    domains: ["a\\nb"]                          # repeated.items string.well_known_regex
    routes:
    - match: {{path_separated_prefix: /api/}}   # string.pattern
      route: {{cluster: ""}}                    # string.min_len (oneof member that is set)
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: edge
  address:
    socket_address: {{address: 127.0.0.1, port_value: 8080}}
  filter_chains:
  - filters:
    - name: envoy.filters.network.http_connection_manager
      typed_config:
        "@type": {HCM}
        stat_prefix: ""                       # string.min_len inside an Any
        scheme_header_transformation:
          scheme_to_overwrite: ftp            # string.in inside an Any
        route_config: {{name: inline}}
        http_filters: []
"""


def test_examples_break_no_field_rule() -> None:
    for directory in ("examples/config",):
        loaded = load_environment(REPO / directory)
        assert check_field_rules(loaded) == []


def test_every_broken_rule_is_reported_with_its_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    problems = check_field_rules(load_directory(tmp_path))
    found = [
        (p.location.line, p.field_path, p.message.rsplit("[validate: ", 1)[1].rstrip("]"))
        for p in problems
    ]
    assert found == [
        (5, "Cluster.connect_timeout", "duration.gt"),
        (7, "Cluster.health_checks[0]", "oneof health_checker required"),
        (16, "Cluster.health_checks[1].http_health_check.path", "string.well_known_regex"),
        (17, "Cluster.health_checks[1].http_health_check.method", "enum.not_in"),
        (19, "Cluster.outlier_detection.max_ejection_percent", "uint32.lte"),
        (21, "Cluster.preconnect_policy.per_upstream_preconnect_ratio", "double.gte/lte"),
        (
            28,
            "Cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address"
            ".socket_address.port_value",
            "uint32.lte",
        ),
        (33, "RouteConfiguration.virtual_hosts[0].domains[0]", "string.well_known_regex"),
        (35, "RouteConfiguration.virtual_hosts[0].routes[0].match.path_separated_prefix",
         "string.pattern"),
        (36, "RouteConfiguration.virtual_hosts[0].routes[0].route.cluster", "string.min_len"),
        (46, "Listener.filter_chains[0].filters[0].typed_config.stat_prefix", "string.min_len"),
        (
            48,
            "Listener.filter_chains[0].filters[0].typed_config.scheme_header_transformation"
            ".scheme_to_overwrite",
            "string.in",
        ),
    ]  # fmt: skip
    assert problems[0].location.file == str(path)


def test_messages_say_what_is_wanted_and_what_was_given() -> None:
    cluster = cluster_pb2.Cluster(name="web")
    cluster.connect_timeout.FromMilliseconds(-250)
    cluster.outlier_detection.max_ejection_percent.value = 150
    assert [(v.field_path, v.message) for v in violations(cluster)] == [
        ("Cluster.connect_timeout", "must be greater than 0s, got -0.25s [validate: duration.gt]"),
        (
            "Cluster.outlier_detection.max_ejection_percent",
            "must be at most 100, got 150 [validate: uint32.lte]",
        ),
    ]


def test_unset_oneof_members_and_optional_messages_are_not_checked() -> None:
    routes = route_pb2.RouteConfiguration(name="r")
    host = routes.virtual_hosts.add(name="www", domains=["*"])
    route = host.routes.add()
    route.match.prefix = "/"  # safe_regex (message.required) is another member of the oneof
    route.route.cluster = "web"
    assert violations(routes) == []


def test_required_fields_repeated_minimums_and_enums() -> None:
    routes = route_pb2.RouteConfiguration(name="r")
    routes.virtual_hosts.add(name="")
    cluster = cluster_pb2.Cluster(name="c", lb_policy=42)  # an enum number Envoy does not know
    assert [(v.field_path, v.message) for v in violations(routes) + violations(cluster)] == [
        (
            "RouteConfiguration.virtual_hosts[0].name",
            "must be at least 1 character(s) long, got 0 [validate: string.min_len]",
        ),
        (
            "RouteConfiguration.virtual_hosts[0].domains",
            "needs at least 1 item(s), got 0 [validate: repeated.min_items]",
        ),
        ("Cluster.lb_policy", "42 is not a defined LbPolicy value [validate: enum.defined_only]"),
    ]


@pytest.mark.parametrize(
    ("rules", "value", "ok"),
    [
        (validate_pb2.UInt32Rules(gte=1, lte=10), 0, False),
        (validate_pb2.UInt32Rules(gte=1, lte=10), 10, True),
        (validate_pb2.UInt32Rules(gt=10, lt=5), 7, False),  # exclusive: outside (5, 10)
        (validate_pb2.UInt32Rules(gt=10, lt=5), 4, True),
        (validate_pb2.UInt32Rules(gt=10, lt=5), 11, True),
        (validate_pb2.UInt32Rules(const=3), 4, False),
        (validate_pb2.UInt32Rules(**{"in": [1, 2]}), 3, False),
        (validate_pb2.UInt32Rules(not_in=[3]), 3, False),
        (validate_pb2.UInt32Rules(gt=5, ignore_empty=True), 0, True),
    ],
)
def test_numeric_ranges_follow_pgv(rules: validate_pb2.UInt32Rules, value: int, ok: bool) -> None:
    found = list(field_rules._range_rules("uint32", rules, value, str, lambda v: v))
    assert (found == []) is ok, found


def test_line_falls_back_to_the_resource_when_the_field_was_never_written(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(
        textwrap.dedent("""\
        resources:
        - "@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
          name: routes
          virtual_hosts:
          - name: www
        """)
    )
    [problem] = check_field_rules(load_directory(tmp_path))
    assert (problem.location.line, problem.field_path) == (
        5,
        "RouteConfiguration.virtual_hosts[0].domains",
    )


@pytest.mark.parametrize(
    ("kind", "rules", "value", "expected"),
    [
        ("string", validate_pb2.StringRules(email=True), "x", "'x' is not a valid email"),
        ("string", validate_pb2.StringRules(ipv4=True), "1.2.3.4", None),
        ("string", validate_pb2.StringRules(hostname=True), "-bad.example", "not a valid hostname"),
        ("string", validate_pb2.StringRules(prefix="/"), "api", "must start with '/'"),
        ("string", validate_pb2.StringRules(max_bytes=3), "ééé", "at most 3 bytes, got 6"),
        ("string", validate_pb2.StringRules(max_len=3), "ééé", None),  # characters, not bytes
        ("string", validate_pb2.StringRules(min_len=1, ignore_empty=True), "", None),
        (
            "string",
            validate_pb2.StringRules(well_known_regex=validate_pb2.HTTP_HEADER_NAME),
            "bad header",
            "not a valid http header name",
        ),
        (
            "string",
            validate_pb2.StringRules(well_known_regex=validate_pb2.HTTP_HEADER_NAME, strict=False),
            "bad header",
            None,
        ),
        ("bytes", validate_pb2.BytesRules(ipv6=True), b"1234", "not a valid ipv6"),
        ("bytes", validate_pb2.BytesRules(pattern="^a"), b"bcd", "must match the regex '^a'"),
    ],
)
def test_string_and_bytes_rules(
    kind: str, rules: object, value: object, expected: str | None
) -> None:
    found = list(field_rules._text_rules(kind, rules, value))
    if expected is None:
        assert found == []
    else:
        [message] = found
        assert expected in message
