from pathlib import Path

import pytest

from controlplane.rollout.policy import PolicyError, check_probe_binaries, load_policies

GOOD = """
groups:
  edge:
    canary: {metadata: {canary: "true"}, node_id: "edge-canary-*"}
    min_existing: 1
    min_fresh: 1
    bake_seconds: 20
    auto_promote: false
    fresh_probe:
      envoy_binary: /usr/bin/envoy
      ready_timeout_seconds: 15
      check: {listener: edge_http, path: /healthz, expect_status: 200}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


def test_loads_a_full_policy(tmp_path) -> None:
    policy = load_policies(write(tmp_path, GOOD))["edge"]
    assert policy.canary.metadata == {"canary": "true"}
    assert policy.canary.node_id_glob == "edge-canary-*"
    assert (policy.min_existing, policy.min_fresh, policy.bake_seconds) == (1, 1, 20.0)
    assert policy.auto_promote is False
    assert policy.ack_timeout_seconds == 30.0  # default
    assert policy.fresh_probe is not None
    assert policy.fresh_probe.envoy_binary == Path("/usr/bin/envoy")
    assert policy.fresh_probe.check is not None
    assert policy.fresh_probe.check.listener == "edge_http"
    assert policy.fresh_probe.check.path == "/healthz"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("groups: {edge: {min_existing: 1}}", "groups.edge: needs a `canary` selector"),
        ("groups: {edge: {canary: {}}}", "groups.edge.canary: needs at least one of"),
        (
            "groups: {edge: {canary: {percent: 150}}}",
            "groups.edge.canary.percent: expected a number in (0, 100], got 150",
        ),
        (
            "groups: {edge: {canary: {percent: 5}, min_fresh: -1}}",
            "groups.edge.min_fresh: expected a whole number >= 0, got -1",
        ),
        (
            "groups: {edge: {canary: {percent: 5}, bake: 3}}",
            "groups.edge: unknown field(s) bake; valid:",
        ),
        (
            "groups: {edge: {canary: {percent: 5}, min_existing: 0}}",
            "groups.edge: proves nothing",
        ),
        (
            "groups: {edge: {canary: {percent: 5}, fresh_probe: {}}}",
            "groups.edge.fresh_probe.envoy_binary: needs the path of an Envoy binary",
        ),
        (
            "groups: {edge: {guard: {seconds: 0}}}",
            "groups.edge.guard.seconds: a guard of 0 seconds watches nothing",
        ),
        (
            "groups: {edge: {guard: {seconds: 60, first_sync: 3}}}",
            "groups.edge.guard: unknown field(s) first_sync; valid: first_sync_seconds, seconds",
        ),
        (
            "groups: {edge: {guard: {seconds: 60}, bake_seconds: 5}}",
            "groups.edge: bake_seconds need(s) a `canary` selector",
        ),
        ("groups: [1, 2]", "groups: expected a mapping, got list"),
        ("groups: {edge: {canary: [", "policy.yaml"),
    ],
)
def test_bad_policy_names_the_file_and_field(tmp_path, text, message) -> None:
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as caught:
        load_policies(path)
    assert str(caught.value).startswith(str(path))
    assert message in str(caught.value)


def test_the_shipped_example_policy_loads() -> None:
    repo = Path(__file__).resolve().parents[2]
    policy = load_policies(repo / "examples/rollout-policy.yaml")["default"]
    assert policy.min_existing == 1 and policy.min_fresh == 1
    assert policy.fresh_probe is not None and policy.fresh_probe.isolate_network


def test_an_isolated_probe_gets_a_unix_socket_beside_the_store(tmp_path) -> None:
    from controlplane.app import Config

    repo = Path(__file__).resolve().parents[2]
    policies = load_policies(repo / "examples/rollout-policy.yaml")
    config = Config(store_path=tmp_path / "db" / "xdscp.db", policies=policies)
    assert config.unix_socket == tmp_path / "db" / "xds.sock"
    assert Config(store_path=tmp_path / "xdscp.db").unix_socket is None


RELATIVE = """
groups:
  edge:
    canary: {node_id: "edge-canary-*"}
    fresh_probe: {envoy_binary: ../bin/envoy}
"""


def fake_envoy(path: Path, script: str, mode: int = 0o755) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(mode)
    return path


def test_a_relative_binary_is_relative_to_the_policy_files_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etc").mkdir()
    policy_file = write(tmp_path / "etc", RELATIVE)
    monkeypatch.chdir(tmp_path / "etc")  # not where the policy is read from, below
    policies = load_policies(Path("..") / "etc" / policy_file.name)
    assert policies["edge"].fresh_probe is not None
    assert policies["edge"].fresh_probe.envoy_binary == tmp_path / "bin" / "envoy"


def test_the_shipped_example_policy_names_the_repos_envoy() -> None:
    repo = Path(__file__).resolve().parents[2]
    probe = load_policies(repo / "examples/rollout-policy.yaml")["default"].fresh_probe
    assert probe is not None
    assert probe.envoy_binary == repo / ".tools/envoy/envoy/_bin/envoy"


@pytest.mark.parametrize(
    ("script", "mode", "problem"),
    [
        (None, 0o755, "no such file"),
        ("exit 0", 0o644, "not executable"),
        ("echo 'cannot load' >&2; exit 3", 0o755, "`--version` exited with 3: cannot load"),
    ],
)
def test_a_probe_binary_that_does_not_run_is_refused_naming_file_group_key_and_path(
    tmp_path: Path, script: str | None, mode: int, problem: str
) -> None:
    binary = tmp_path / "bin" / "envoy"
    if script is not None:
        fake_envoy(binary, script, mode)
    (tmp_path / "etc").mkdir()
    policy_file = write(tmp_path / "etc", RELATIVE)
    with pytest.raises(PolicyError) as caught:
        check_probe_binaries(policy_file, load_policies(policy_file))
    expected = f"{policy_file}: groups.edge.fresh_probe.envoy_binary: {binary}: {problem}"
    assert str(caught.value) == expected


def test_a_probe_binary_whose_version_runs_passes(tmp_path: Path) -> None:
    fake_envoy(tmp_path / "bin" / "envoy", 'test "$1" = --version')
    (tmp_path / "etc").mkdir()
    policy_file = write(tmp_path / "etc", RELATIVE)
    assert check_probe_binaries(policy_file, load_policies(policy_file)) is None


def test_a_guard_goes_with_a_canary_stage_or_alone(tmp_path) -> None:
    text = """
groups:
  edge:
    canary: {percent: 10}
    guard: {seconds: 300, first_sync_seconds: 30}
  web:
    guard: {seconds: 120}
"""
    policies = load_policies(write(tmp_path, text))
    edge, web = policies["edge"], policies["web"]
    assert edge.stages and edge.guard is not None
    assert (edge.guard.seconds, edge.guard.first_sync_seconds) == (300.0, 30.0)
    assert not web.stages and web.canary is None  # publishes straight to stable
    assert web.guard is not None
    assert (web.guard.seconds, web.guard.first_sync_seconds) == (120.0, 30.0)  # default
    assert load_policies(write(tmp_path, GOOD))["edge"].guard is None


def test_the_example_policys_commented_guard_loads_when_uncommented(tmp_path) -> None:
    repo = Path(__file__).resolve().parents[2]
    text = (repo / "examples/rollout-policy.yaml").read_text()
    head, guard = text.split("    # guard:", 1)
    uncommented = "    guard:" + guard.replace("\n    # ", "\n    ")
    policy = load_policies(write(tmp_path, head + uncommented))["default"]
    assert policy.guard is not None
    assert (policy.guard.seconds, policy.guard.first_sync_seconds) == (300.0, 30.0)
    assert policy.stages


def test_a_probe_that_cannot_isolate_its_network_is_refused_at_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    envoy = fake_envoy(tmp_path / "bin" / "envoy", 'test "$1" = --version')
    policy_file = write(
        tmp_path,
        f"groups:\n  edge:\n    canary: {{node_id: c-*}}\n"
        f"    fresh_probe: {{envoy_binary: {envoy}, isolate_network: true}}\n",
    )
    policies = load_policies(policy_file)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no unshare, no ip
    with pytest.raises(PolicyError) as caught:
        check_probe_binaries(policy_file, policies)
    assert str(caught.value) == (
        f"{policy_file}: groups.edge.fresh_probe.isolate_network: needs unshare and ip on PATH "
        "(util-linux, iproute2)"
    )
