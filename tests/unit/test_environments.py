"""Environments: a base config plus one overlay per environment gives one snapshot each."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from controlplane import resources
from controlplane.config import ConfigError, ConfigProblem, Location
from controlplane.config.environments import (
    UnknownEnvironmentError,
    environment_names,
    load_config,
    load_environment,
)
from controlplane.config.field_rules import check_field_rules
from controlplane.snapshot import Snapshot

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "environments"

BASE = """\
resources:
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: web
  type: STATIC
  connect_timeout: 2s
  lb_policy: LEAST_REQUEST
  load_assignment:
    cluster_name: web
    endpoints:
    - lb_endpoints:
      - endpoint:
          address:
            socket_address: {address: "${HOST}", port_value: "${PORT}"}
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: extra
  type: STATIC
  connect_timeout: 1s
  alt_stat_name: "cost: $${not_a_variable} for ${ENV}"
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def config_dir(tmp_path: Path, overlay: str, base: str = BASE, env: str = "prod") -> Path:
    write(tmp_path, "clusters.yaml", base)
    write(tmp_path, f"environments/{env}.yaml", overlay)
    return tmp_path


VARIABLES = """\
variables:
  HOST: 10.0.0.1
  PORT: 8080
  ENV: prod
"""


def problems(directory: Path, env: str | None = "prod") -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as caught:
        load_environment(directory, env)
    return caught.value.problems


def only_problem(directory: Path, env: str | None = "prod") -> ConfigProblem:
    found = problems(directory, env)
    assert len(found) == 1, found
    return found[0]


def clusters(directory: Path, env: str | None) -> dict[str, object]:
    return {r.name: r.message for r in load_environment(directory, env)}


# --- The worked example ---------------------------------------------------------------------


def test_the_example_gives_a_different_snapshot_per_environment() -> None:
    assert environment_names(EXAMPLE) == ["prod", "staging"]
    built = {}
    for env in ("staging", "prod"):
        loaded = load_environment(EXAMPLE, env)
        built[env] = {(r.type_url, r.name): r.message for r in loaded}
        snapshot = Snapshot.from_messages((r.type_url, r.message) for r in loaded)
        built[env]["version"] = snapshot.version  # type: ignore[assignment]
    staging, prod = built["staging"], built["prod"]
    assert staging["version"] != prod["version"]
    port = lambda env: env[(resources.LISTENER, "edge_http")].address.socket_address.port_value  # noqa: E731
    assert (port(staging), port(prod)) == (10080, 80)
    web = lambda env: env[(resources.ENDPOINT, "web")].endpoints[0].lb_endpoints  # noqa: E731
    assert len(web(staging)) == 1
    assert [e.endpoint.address.socket_address.address for e in web(prod)] == [
        "10.0.1.10",
        "10.0.1.11",
    ]
    api_staging, api_prod = staging[(resources.CLUSTER, "api")], prod[(resources.CLUSTER, "api")]
    assert api_staging.lb_policy == api_staging.ROUND_ROBIN  # `lb_policy: null` deleted it
    assert api_prod.lb_policy == api_prod.LEAST_REQUEST
    assert api_prod.connect_timeout.ToMilliseconds() == 500
    route = staging[(resources.ROUTE, "edge_routes")].virtual_hosts[0].routes[1].route
    assert route.timeout.seconds == 120


def test_without_env_the_environments_folder_is_ignored(tmp_path: Path) -> None:
    base = BASE.replace('"${HOST}"', "10.0.0.9").replace('"${PORT}"', "80")
    base = base.replace(" for ${ENV}", "")
    directory = config_dir(tmp_path, "not: [an overlay", base=base)
    assert list(clusters(directory, None)) == ["web", "extra"]


def test_unknown_environment_lists_the_available_ones(tmp_path: Path) -> None:
    directory = config_dir(tmp_path, VARIABLES)
    write(tmp_path, "environments/staging.yaml", VARIABLES)
    with pytest.raises(UnknownEnvironmentError) as caught:
        load_environment(directory, "qa")
    assert caught.value.problems[0].message == 'unknown environment "qa"; available: prod, staging'


# --- Variables -------------------------------------------------------------------------------


def test_variables_substitute_typed_whole_values_and_text_with_escapes(tmp_path: Path) -> None:
    found = clusters(config_dir(tmp_path, VARIABLES), "prod")
    address = found["web"].load_assignment.endpoints[0].lb_endpoints[0].endpoint.address
    assert (address.socket_address.address, address.socket_address.port_value) == (
        "10.0.0.1",
        8080,
    )
    assert found["extra"].alt_stat_name == "cost: ${not_a_variable} for prod"


def test_an_undefined_variable_names_the_line_that_uses_it(tmp_path: Path) -> None:
    directory = config_dir(tmp_path, VARIABLES.replace("  HOST: 10.0.0.1\n", ""))
    problem = only_problem(directory)
    assert problem.location == Location(str(tmp_path / "clusters.yaml"), 13)
    assert problem.message == 'undefined variable ${HOST}: environment "prod" defines ENV, PORT'


def test_without_env_a_variable_is_undefined(tmp_path: Path) -> None:
    found = problems(config_dir(tmp_path, VARIABLES), None)
    assert [p.message for p in found] == [
        "undefined variable ${HOST}: no environment given (--env)",
        "undefined variable ${PORT}: no environment given (--env)",
        "undefined variable ${ENV}: no environment given (--env)",
    ]


def test_a_mapping_variable_cannot_go_inside_text(tmp_path: Path) -> None:
    overlay = VARIABLES.replace("  ENV: prod", "  ENV: {a: 1}")
    problem = only_problem(config_dir(tmp_path, overlay))
    assert problem.location.line == 18
    assert "is not text; use it as a whole value" in problem.message


# --- Patches ---------------------------------------------------------------------------------


def test_merge_patches_fields_deletes_nulls_and_replaces_lists(tmp_path: Path) -> None:
    overlay = VARIABLES + textwrap.dedent("""\
        patches:
        - "@type": cluster
          name: web
          merge:
            connect_timeout: 5s
            lb_policy: null
            load_assignment:
              endpoints:
              - lb_endpoints:
                - endpoint: {address: {socket_address: {address: 10.9.9.9, port_value: 1}}}
                - endpoint: {address: {socket_address: {address: 10.9.9.8, port_value: 2}}}
        """)
    web = clusters(config_dir(tmp_path, overlay), "prod")["web"]
    assert web.connect_timeout.seconds == 5
    assert web.lb_policy == web.ROUND_ROBIN
    assert web.load_assignment.cluster_name == "web"  # merged, not replaced
    endpoints = web.load_assignment.endpoints[0].lb_endpoints
    assert [e.endpoint.address.socket_address.port_value for e in endpoints] == [1, 2]


def test_remove_and_extra_resources(tmp_path: Path) -> None:
    overlay = VARIABLES + textwrap.dedent("""\
        resources:
        - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
          name: prod_only
          type: STATIC
          connect_timeout: 1s
        patches:
        - {"@type": type.googleapis.com/envoy.config.cluster.v3.Cluster, name: extra, remove: true}
        """)
    assert list(clusters(config_dir(tmp_path, overlay), "prod")) == ["web", "prod_only"]


def test_a_bad_value_in_a_patch_names_the_overlay_file_and_line(tmp_path: Path) -> None:
    overlay = VARIABLES + textwrap.dedent("""\
        patches:
        - "@type": cluster
          name: web
          merge:
            connect_timeout: soon
        """)
    problem = only_problem(config_dir(tmp_path, overlay))
    assert problem.location == Location(str(tmp_path / "environments/prod.yaml"), 9)
    assert problem.field_path == "Cluster.connect_timeout"
    assert "soon" in problem.message


def test_a_field_rule_broken_by_a_patch_names_the_overlay_line(tmp_path: Path) -> None:
    overlay = VARIABLES + textwrap.dedent("""\
        patches:
        - "@type": cluster
          name: web
          merge:
            connect_timeout: 0s
        """)
    loaded = load_config(config_dir(tmp_path, overlay), "prod")
    [problem] = check_field_rules(loaded.resources, loaded.sources)
    assert problem.location == Location(str(tmp_path / "environments/prod.yaml"), 9)
    assert problem.field_path == "Cluster.connect_timeout"


@pytest.mark.parametrize(
    ("patch", "line", "message"),
    [
        ('{"@type": cluster, name: nope, merge: {}}', 6, 'no cluster named "nope" to patch'),
        ('{"@type": clusters, name: web, merge: {}}', 6, 'a patch needs "@type": one of'),
        ('{"@type": cluster, merge: {}}', 6, "a patch needs the name"),
        ('{"@type": cluster, name: web}', 6, 'a patch has either "merge: {...}" or "remove: true"'),
        ('{"@type": cluster, name: web, merge: {name: x}}', 6, 'a patch cannot change "name"'),
        ('{"@type": cluster, name: web, mrege: {}}', 6, 'unexpected key "mrege"'),
        ("just text", 6, "a patch is a mapping"),
    ],
)
def test_bad_patches_name_their_line(tmp_path: Path, patch: str, line: int, message: str) -> None:
    overlay = VARIABLES + f"patches:\n- {patch}\n"
    problem = only_problem(config_dir(tmp_path, overlay))
    assert problem.location == Location(str(tmp_path / "environments/prod.yaml"), line)
    assert message in problem.message


def test_unexpected_overlay_keys_and_duplicates_are_reported(tmp_path: Path) -> None:
    overlay = VARIABLES + textwrap.dedent("""\
        variabels: {}
        resources:
        - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
          name: web
          type: STATIC
          connect_timeout: 1s
        """)
    found = problems(config_dir(tmp_path, overlay))
    overlay_file = str(tmp_path / "environments/prod.yaml")
    assert [(p.location, p.message.split(";")[0].split(" (")[0]) for p in found] == [
        (Location(overlay_file, 5), 'unexpected key "variabels"'),
        (Location(overlay_file, 7), 'duplicate Cluster "web"'),
    ]
