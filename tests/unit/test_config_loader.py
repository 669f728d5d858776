"""controlplane.config: operator YAML/JSON in, Envoy messages out, or every problem by line."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from controlplane import resources
from controlplane.config import (
    ConfigError,
    ConfigProblem,
    Location,
    load_directory,
    load_file,
)

CLUSTER_WEB = """\
resources:
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: web
  type: EDS
  connect_timeout: 2s
  eds_cluster_config:
    eds_config: {ads: {}, resource_api_version: V3}
"""

HCM = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(path: Path) -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as caught:
        load_directory(path)
    return caught.value.problems


def only_problem(path: Path) -> ConfigProblem:
    problems = problems_of(path)
    assert len(problems) == 1, problems
    return problems[0]


def test_valid_directory_loads_every_resource_in_file_order(tmp_path: Path) -> None:
    write(tmp_path, "clusters.yaml", CLUSTER_WEB)
    write(
        tmp_path,
        "sub/endpoints.yml",
        """\
        resources:
        - "@type": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
          cluster_name: web
          endpoints:
          - lb_endpoints:
            - endpoint:
                address:
                  socket_address: {address: 127.0.0.1, port_value: 8081}
        """,
    )
    write(
        tmp_path,
        "listeners.yaml",
        f"""\
        resources:
        - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
          name: edge
          address:
            socket_address: {{address: 127.0.0.1, port_value: 10080}}
          filter_chains:
          - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": {HCM}
                stat_prefix: edge
                rds:
                  route_config_name: routes
                  config_source: {{ads: {{}}, resource_api_version: V3}}
                http_filters:
                - name: envoy.filters.http.router
                  typed_config:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
        - "@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
          name: routes
          virtual_hosts:
          - name: all
            domains: ["*"]
            routes:
            - match: {{prefix: /}}
              route: {{cluster: web}}
        """,
    )
    write(tmp_path, "README.md", "not config")
    write(tmp_path, ".hidden.yaml", "this: is not even valid config")
    write(tmp_path, ".git/x.yaml", "nor: this")

    loaded = load_directory(tmp_path)

    assert [(r.type_url, r.name) for r in loaded] == [
        (resources.CLUSTER, "web"),
        (resources.LISTENER, "edge"),
        (resources.ROUTE, "routes"),
        (resources.ENDPOINT, "web"),
    ]
    assert [str(r.location) for r in loaded] == [
        f"{tmp_path}/clusters.yaml:2",
        f"{tmp_path}/listeners.yaml:2",
        f"{tmp_path}/listeners.yaml:19",
        f"{tmp_path}/sub/endpoints.yml:2",
    ]
    cluster = loaded[0].message
    assert cluster.connect_timeout.seconds == 2
    assert cluster.eds_cluster_config.eds_config.HasField("ads")
    hcm = hcm_pb2.HttpConnectionManager()
    assert loaded[1].message.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    assert hcm.rds.route_config_name == "routes"
    endpoint = loaded[3].message.endpoints[0].lb_endpoints[0].endpoint
    assert endpoint.address.socket_address.port_value == 8081


def test_loaded_messages_are_canonical(tmp_path: Path) -> None:
    write(tmp_path, "c.yaml", CLUSTER_WEB)
    (resource,) = load_directory(tmp_path)
    before = resources.serialize(resource.message)
    resources.canonicalize(resource.message)
    assert resources.serialize(resource.message) == before


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "bad.yaml",
        """\
        resources:
        - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
          name: web
            connect_timeout: 2s
        """,
    )
    problem = only_problem(tmp_path)
    assert problem.location == Location(str(path), 4)
    assert problem.message.startswith("invalid YAML: ")
    assert "mapping values are not allowed" in problem.message
    assert str(problem).startswith(f"{path}:4: invalid YAML")


def test_unknown_field_points_at_the_key_line_with_field_path(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "listeners.yaml",
        f"""\
        resources:
        - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
          name: edge
          filter_chains:
          - filters:
            - name: hcm
              typed_config:
                "@type": {HCM}
                stat_prefix: edge
                route_config:
                  virtual_hosts:
                  - name: all
                    domainz: ["*"]
        """,
    )
    problem = only_problem(tmp_path)
    assert problem.location == Location(str(path), 13)
    assert problem.field_path == (
        "Listener.filter_chains[0].filters[0].typed_config.route_config.virtual_hosts[0]"
    )
    assert problem.message.startswith('unknown field "domainz" (did you mean "domains"?); ')
    assert "valid fields: name, domains, routes," in problem.message


def test_wrong_value_type_names_its_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "clusters.yaml",
        """\
        resources:
        - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
          name: web
          type: EDS
          connect_timeout: abc
        """,
    )
    problem = only_problem(tmp_path)
    assert problem.location == Location(str(path), 5)
    assert problem.field_path == "Cluster.connect_timeout"
    assert problem.message == 'Duration must end with letter "s": abc'
    assert (
        str(problem) == f'{path}:5: Cluster.connect_timeout: Duration must end with letter "s": abc'
    )


def test_bad_value_under_oneof_fields_gets_full_path_and_line(tmp_path: Path) -> None:
    # protobuf's own message leaves out the oneof hops (endpoint, socket_address) and indices.
    path = write(
        tmp_path,
        "endpoints.yaml",
        """\
        resources:
        - "@type": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
          cluster_name: web
          endpoints:
          - lb_endpoints:
            - endpoint:
                address:
                  socket_address: {address: 127.0.0.1, port_value: 8081}
            - endpoint:
                address:
                  socket_address:
                    address: 127.0.0.1
                    port_value: eighty
        """,
    )
    problem = only_problem(tmp_path)
    assert problem.location == Location(str(path), 13)
    assert problem.field_path == (
        "ClusterLoadAssignment.endpoints[0].lb_endpoints[1].endpoint.address"
        ".socket_address.port_value"
    )
    assert problem.message == "expected an integer, got 'eighty'"


def test_bad_enum_lists_valid_values(tmp_path: Path) -> None:
    path = write(tmp_path, "c.yaml", CLUSTER_WEB.replace("type: EDS", "type: EDZ"))
    problem = only_problem(tmp_path)
    assert problem.location == Location(str(path), 4)
    assert problem.field_path == "Cluster.type"
    assert problem.message.startswith("invalid value 'EDZ' for DiscoveryType; valid values: STATIC")


def test_unknown_resource_type_lists_supported_ones(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "x.yaml",
        """\
        resources:
        - "@type": type.googleapis.com/envoy.config.cluster.v3.Clustr
          name: web
        """,
    )
    problem = only_problem(tmp_path)
    assert problem.location == Location(str(path), 2)
    assert problem.message.startswith(
        'unknown resource type "type.googleapis.com/envoy.config.cluster.v3.Clustr"; supported: '
    )
    for resource_type in resources.ADS_ORDER:
        assert resource_type.type_url in problem.message


def test_unknown_typed_config_type_points_at_its_type_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "listeners.yaml",
        """\
        resources:
        - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
          name: edge
          filter_chains:
          - filters:
            - name: mystery
              typed_config:
                "@type": type.googleapis.com/foo.Bar
                anything: 1
        """,
    )
    problem = only_problem(tmp_path)
    assert problem.location == Location(str(path), 8)
    assert problem.field_path == "Listener.filter_chains[0].filters[0].typed_config"
    assert problem.message == 'unknown type "type.googleapis.com/foo.Bar"'


def test_duplicate_yaml_key_names_both_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "c.yaml",
        """\
        resources:
        - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
          name: web
          connect_timeout: 2s
          name: api
        """,
    )
    problem = only_problem(tmp_path)
    assert problem.location == Location(str(path), 5)
    assert problem.message == 'duplicate key "name" (first on line 3)'


def test_same_field_in_two_spellings_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "c.yaml", CLUSTER_WEB + "  connectTimeout: 5s\n")
    problem = only_problem(tmp_path)
    assert problem.location == Location(str(path), 8)
    assert (
        problem.message == '"connectTimeout" and "connect_timeout" both set field connect_timeout'
    )


def test_same_field_in_two_spellings_deep_inside_an_any_is_an_error(tmp_path: Path) -> None:
    tls = (
        "  transport_socket:\n"
        "    name: envoy.transport_sockets.tls\n"
        "    typed_config:\n"
        '      "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n'
        "      common_tls_context: {alpn_protocols: [h2], alpnProtocols: [h2]}\n"
    )
    path = write(tmp_path, "c.yaml", CLUSTER_WEB + tls)
    problem = only_problem(tmp_path)
    assert problem.location == Location(str(path), 12)
    assert problem.message == '"alpnProtocols" and "alpn_protocols" both set field alpn_protocols'


# Each structural problem the locating walk names, on a resource json_format must refuse: the
# loader walks a resource only after json_format refused it, so one it accepted would pass.
STRUCTURAL_PROBLEMS = [
    (
        "  load_assignment: {cluster_name: web}\n  cluster_type: {name: custom}\n",
        9,
        '"cluster_type" and "type" are alternatives (cluster_discovery_type); set only one',
    ),
    ("  health_checks: {timeout: 1s}\n", 8, "expected a list, got mapping"),
    ("  metadata: {filter_metadata: [1]}\n", 8, "expected a mapping, got list"),
    ("  circuit_breakers: 3\n", 8, "expected a mapping (CircuitBreakers), got number"),
    (
        "  transport_socket: {name: tls, typed_config: {sni: x}}\n",
        8,
        'missing "@type" (a type URL naming the message)',
    ),
]


@pytest.mark.parametrize(("extra", "line", "message"), STRUCTURAL_PROBLEMS)
def test_every_structural_problem_is_refused_and_located(
    tmp_path: Path, extra: str, line: int, message: str
) -> None:
    path = write(tmp_path, "c.yaml", CLUSTER_WEB + extra)
    problem = only_problem(tmp_path)
    assert (problem.location, problem.message) == (Location(str(path), line), message)


def test_duplicate_resource_name_across_files_names_both_locations(tmp_path: Path) -> None:
    first = write(tmp_path, "a.yaml", CLUSTER_WEB)
    second = write(tmp_path, "b.yaml", "# another copy\n" + CLUSTER_WEB)
    problem = only_problem(tmp_path)
    assert problem.location == Location(str(second), 3)
    assert problem.message == f'duplicate Cluster "web" (first defined at {first}:2)'


def test_same_name_in_different_types_is_fine(tmp_path: Path) -> None:
    write(tmp_path, "c.yaml", CLUSTER_WEB)
    write(
        tmp_path,
        "e.yaml",
        """\
        resources:
        - "@type": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
          cluster_name: web
        """,
    )
    assert [r.name for r in load_directory(tmp_path)] == ["web", "web"]


def test_top_level_key_other_than_resources(tmp_path: Path) -> None:
    path = write(tmp_path, "c.yaml", CLUSTER_WEB + "static_resources: {}\n")
    problem = only_problem(tmp_path)
    assert problem.location == Location(str(path), 8)
    assert (
        problem.message
        == 'unexpected top-level key "static_resources"; only "resources" is allowed'
    )


def test_resources_must_be_a_list_of_mappings(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yaml", "resources: {name: web}\n")
    b = write(tmp_path, "b.yaml", "resources:\n- just a string\n")
    c = write(tmp_path, "c.yaml", "- resources: []\n")
    assert [str(p) for p in problems_of(tmp_path)] == [
        f'{a}:1: "resources" must be a list, not a mapping',
        f"{b}:2: a resource must be a mapping, not a string",
        f'{c}:1: top level is a list; expected a mapping with a single key "resources"',
    ]


def test_missing_name_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "c.yaml", CLUSTER_WEB.replace("  name: web\n", ""))
    problem = only_problem(tmp_path)
    assert problem.location == Location(str(path), 2)
    assert (problem.field_path, problem.message) == ("Cluster.name", "missing name")


def test_empty_directory_is_an_error(tmp_path: Path) -> None:
    write(tmp_path, "notes.txt", "resources: []")
    problem = only_problem(tmp_path)
    assert problem.location == Location(str(tmp_path))
    assert problem.message == "no *.yaml, *.yml, *.json files"


def test_path_that_is_not_a_directory_is_an_error(tmp_path: Path) -> None:
    file = write(tmp_path, "c.yaml", CLUSTER_WEB)
    assert only_problem(file).message == "not a directory"
    assert only_problem(tmp_path / "missing").message == "not a directory"


def test_json_file_loads(tmp_path: Path) -> None:
    document = {
        "resources": [
            {
                "@type": resources.CLUSTER,
                "name": "api",
                "type": "EDS",
                "connectTimeout": "1.5s",
                "edsClusterConfig": {"edsConfig": {"ads": {}, "resourceApiVersion": "V3"}},
            }
        ]
    }
    write(tmp_path, "c.json", json.dumps(document, indent="\t"))
    (resource,) = load_directory(tmp_path)
    assert (resource.type_url, resource.name) == (resources.CLUSTER, "api")
    assert resource.message.connect_timeout.nanos == 500_000_000


def test_json_that_yaml_rejects_falls_back_to_json(tmp_path: Path) -> None:
    # A surrogate-pair escape is valid JSON; PyYAML refuses it.
    cluster = {"@type": resources.CLUSTER, "name": "emoji", "altStatName": "\U0001f600"}
    path = write(tmp_path, "c.json", json.dumps({"resources": [cluster]}))
    assert "\\ud83d\\ude00" in path.read_text()
    (resource,) = load_directory(tmp_path)
    assert resource.message.alt_stat_name == "\U0001f600"


def test_malformed_json_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "c.json", '{\n  "resources": [\n    {"name": "x" "y": 1}\n  ]\n}\n')
    problem = only_problem(tmp_path)
    assert problem.location == Location(str(path), 3)
    assert problem.message.startswith("invalid JSON: ")


def test_json_errors_have_lines_when_yaml_reads_it(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "c.json",
        "{\n"
        '  "resources": [\n'
        f'    {{"@type": "{resources.CLUSTER}",\n'
        '     "name": "x",\n'
        '     "connectTimeout": 5}\n'
        "  ]\n"
        "}\n",
    )
    problem = only_problem(tmp_path)
    assert problem.location == Location(str(path), 5)
    assert problem.field_path == "Cluster.connect_timeout"


def test_camel_case_keys_load(tmp_path: Path) -> None:
    write(
        tmp_path,
        "c.yaml",
        """\
        resources:
        - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
          name: web
          type: EDS
          connectTimeout: 3s
          edsClusterConfig:
            edsConfig: {ads: {}, resourceApiVersion: V3}
          perConnectionBufferLimitBytes: 32768
        """,
    )
    (resource,) = load_directory(tmp_path)
    assert resource.message.connect_timeout.seconds == 3
    assert resource.message.per_connection_buffer_limit_bytes.value == 32768
    assert resource.message.eds_cluster_config.eds_config.HasField("ads")


def test_all_problems_from_all_files_are_reported_together(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yaml", "resources: [\n")
    b = write(
        tmp_path,
        "b.yaml",
        """\
        resources:
        - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
          name: web
          connect_timeout: abc
          bogus: 1
        - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
          name: fine
        """,
    )
    with pytest.raises(ConfigError) as caught:
        load_directory(tmp_path)
    problems = caught.value.problems
    assert [(p.location.file, p.location.line) for p in problems] == [
        (str(a), 2),
        (str(b), 4),
        (str(b), 5),
    ]
    assert str(caught.value).splitlines() == [str(p) for p in problems]


def test_yaml_anchors_and_merge_keys(tmp_path: Path) -> None:
    write(
        tmp_path,
        "c.yaml",
        """\
        resources:
        - &base
          "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
          name: web
          connect_timeout: 2s
        - <<: *base
          name: api
        """,
    )
    loaded = load_directory(tmp_path)
    assert [(r.name, r.message.connect_timeout.seconds) for r in loaded] == [("web", 2), ("api", 2)]


def test_load_file(tmp_path: Path) -> None:
    path = write(tmp_path, "c.yaml", CLUSTER_WEB)
    assert [r.name for r in load_file(path)] == ["web"]
    with pytest.raises(ConfigError, match="cannot read"):
        load_file(tmp_path / "missing.yaml")


def test_location_and_problem_strings() -> None:
    assert str(Location("a.yaml", 3)) == "a.yaml:3"
    assert str(Location("a.yaml")) == "a.yaml"
    assert str(ConfigProblem(Location("a.yaml"), None, "oops")) == "a.yaml: oops"


def test_values_json_format_lets_python_errors_out_for_are_refused_at_their_line(
    tmp_path: Path,
) -> None:
    cluster = '"@type": type.googleapis.com/envoy.config.cluster.v3.Cluster'
    write(tmp_path, "a.yaml", f"resources:\n- {cluster}\n  name: a\n  lb_policy: .inf\n")
    surrogate = {"@type": resources.CLUSTER, "name": "b", "common_lb_config": "\ud800"}
    unknown = {"@type": resources.CLUSTER, "name": "c", "transport_socket": {"name": "t"}}
    unknown["transport_socket"]["typed_config"] = {"@type": "type.googleapis.com/\ud800"}
    text = json.dumps({"resources": [surrogate, unknown]})
    (tmp_path / "b.json").write_text(text)
    found = [(p.location.line, p.field_path, p.message) for p in problems_of(tmp_path)]
    assert found[0][:2] == (4, "Cluster.lb_policy")
    assert "invalid value inf" in found[0][2]
    assert found[1][1:] == (
        "Cluster.common_lb_config",
        "expected a mapping (CommonLbConfig), got string",
    )
    assert found[2][1] == "Cluster.transport_socket.typed_config"
    assert len(found) == 3
