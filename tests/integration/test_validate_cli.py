"""`xdsctl validate` (offline, optionally with a real Envoy) and `xdsctl diff`, as processes.

Run through `python -m controlplane.cli.authoring`, the authoring commands on their own.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from controlplane.config.environments import load_environment
from controlplane.config.envoy_validate import validate_with_envoy
from controlplane.snapshot import Snapshot
from tests.integration.harness import ENVOY_BINARY, REPO, XdsControlPlane

EXAMPLES = REPO / "examples" / "config"
ENVIRONMENTS = REPO / "examples" / "environments"

SECOND_SSH_CHAIN = """\
  - filters:
    - name: envoy.filters.network.tcp_proxy
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
        stat_prefix: edge_ssh_again
        cluster: ssh_bastion
        idle_timeout: 3600s
"""


def authoring(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controlplane.cli.main", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def envoy() -> str:
    if not ENVOY_BINARY.exists():
        pytest.fail(f"Envoy binary missing at {ENVOY_BINARY}: run `bash .ci/run` to install it")
    return str(ENVOY_BINARY)


def copy_examples(tmp_path: Path) -> Path:
    destination = tmp_path / "config"
    shutil.copytree(EXAMPLES, destination)
    return destination


# --- Offline -----------------------------------------------------------------------------------


def test_examples_validate_clean_offline() -> None:
    done = authoring("validate", str(EXAMPLES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1].startswith(f"{EXAMPLES}: 0 error(s), 0 warning(s), ")


def test_errors_exit_1_with_file_line_and_rule(tmp_path: Path) -> None:
    config = copy_examples(tmp_path)
    routes = config / "routes.yaml"
    text = routes.read_text()
    text = text.replace("retry_on: reset,connect-failure", "retry_on: retriable-4xx", 1)
    routes.write_text(text.replace("cluster: web", "cluster: wbe", 1))
    clusters = config / "clusters.yaml"
    clusters.write_text(clusters.read_text().replace("idle_timeout: 60s", "idle_timeout: 80s", 1))
    done = authoring("validate", str(config))
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == (
        f"warning[XDS001 keepalive-ordering]: {clusters}:25: Cluster.typed_extension_protocol_options"
        "[envoy.extensions.upstreams.http.v3.HttpProtocolOptions].common_http_protocol_options"
        ".idle_timeout: cluster web: upstream idle_timeout 80s is not shorter than the backend's "
        "keep-alive timeout 75s: Envoy may reuse a connection the backend is closing, and the "
        "request fails with a reset"
    )
    assert lines[1].startswith("    hint: set common_http_protocol_options.idle_timeout below")
    assert lines[2].startswith(f"warning[XDS003 idempotent-retry]: {routes}:25: ")
    typo_line = 1 + next(
        number for number, line in enumerate(text.splitlines()) if "cluster: web" in line
    )
    assert lines[4].startswith(f"error[XDS008 unknown-cluster]: {routes}:{typo_line}: ")
    assert (
        lines[-1] == f"{config}: 1 error(s), 2 warning(s), version " + lines[-1].rsplit(" ", 1)[1]
    )


def test_warnings_alone_exit_0(tmp_path: Path) -> None:
    config = copy_examples(tmp_path)
    (config / "spare.yaml").write_text(
        "resources:\n"
        '- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster\n'
        "  name: spare\n  type: STATIC\n  connect_timeout: 1s\n"
    )
    done = authoring("validate", str(config))
    assert done.returncode == 0, done.stdout
    assert done.stdout.startswith(f"warning[XDS007 unused-cluster]: {config / 'spare.yaml'}:2: ")
    assert done.stdout.splitlines()[-1].startswith(f"{config}: 0 error(s), 1 warning(s)")


def test_json_format_parses(tmp_path: Path) -> None:
    config = copy_examples(tmp_path)
    clusters = config / "clusters.yaml"
    clusters.write_text(
        clusters.read_text().replace("connect_timeout: 2s", "connect_timeout: 0s", 1)
    )
    done = authoring("validate", str(config), "--format", "json")
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert (report["ok"], report["errors"], report["warnings"]) == (False, 1, 0)
    [problem] = report["problems"]
    assert problem == {
        "severity": "error",
        "stage": "field-rules",
        "message": "must be greater than 0s, got 0s [validate: duration.gt]",
        "file": str(clusters),
        "line": 15,
        "field_path": "Cluster.connect_timeout",
        "rule": None,
        "resource": None,
        "hint": None,
    }
    clean = json.loads(authoring("validate", str(EXAMPLES), "--format", "json").stdout)
    assert clean["ok"] is True and clean["problems"] == [] and clean["envoy"] is None


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("validate",),
        ("validate", "no/such/dir"),
        ("validate", str(EXAMPLES), "--format", "yaml"),
        ("validate", str(ENVIRONMENTS), "--env", "qa"),
        ("validate", str(EXAMPLES), "--envoy", "/no/such/envoy"),
    ],
)
def test_usage_errors_exit_2(args: tuple[str, ...]) -> None:
    done = authoring(*args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr


def test_unknown_environment_lists_the_known_ones() -> None:
    done = authoring("validate", str(ENVIRONMENTS), "--env", "qa")
    assert 'unknown environment "qa"; available: prod, staging' in done.stderr


# --- With a real Envoy -----------------------------------------------------------------------


@pytest.mark.envoy
def test_envoy_accepts_the_examples() -> None:
    done = authoring("validate", str(EXAMPLES), "--envoy", envoy())
    assert done.returncode == 0, done.stdout + done.stderr
    assert "envoy: configuration 'bootstrap.json' OK" in done.stdout
    for env in ("staging", "prod"):
        done = authoring("validate", str(ENVIRONMENTS), "--env", env, "--envoy", envoy())
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.envoy
def test_envoy_refuses_what_our_rules_cannot_see(tmp_path: Path) -> None:
    """Two filter chains with the same (empty) match: parses, passes every rule, Envoy says no."""
    config = copy_examples(tmp_path)
    listeners = config / "listeners.yaml"
    listeners.write_text(listeners.read_text() + SECOND_SSH_CHAIN)
    offline = authoring("validate", str(config))
    assert offline.returncode == 0, offline.stdout

    done = authoring("validate", str(config), "--envoy", envoy(), "--format", "json")
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["envoy"]["ok"] is False
    message = report["envoy"]["message"]
    assert message.startswith(
        "error adding listener '127.0.0.1:10022': filter chain '' has the same"
    )
    assert [p["stage"] for p in report["problems"]] == ["envoy"]

    text = authoring("validate", str(config), "--envoy", envoy())
    assert text.returncode == 1
    assert f"error: Envoy refuses: {message}" in text.stdout


@pytest.mark.envoy
def test_envoy_agrees_with_the_field_rules(tmp_path: Path) -> None:
    """What check_field_rules reports, Envoy refuses too (its message, without the proto dump)."""
    config = copy_examples(tmp_path)
    clusters = config / "clusters.yaml"
    clusters.write_text(
        clusters.read_text().replace("connect_timeout: 2s", "connect_timeout: 0s", 1)
    )
    loaded = load_environment(config)
    snapshot = Snapshot.from_messages((r.type_url, r.message) for r in loaded)
    verdict = validate_with_envoy(snapshot, envoy())
    assert not verdict.ok
    assert verdict.message.startswith("Proto constraint validation failed")
    assert "ConnectTimeout: value must be greater than 0s" in verdict.message
    assert "\n" not in verdict.message


# --- diff ------------------------------------------------------------------------------------


EXPECTED_CHANGE = """\
~ cluster api
    typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].common_http_protocol_options.idle_timeout: "25s" -> "20s"
0 added, 0 removed, 1 changed
"""


def test_diff_of_two_directories_is_offline(tmp_path: Path) -> None:
    config = copy_examples(tmp_path)
    clusters = config / "clusters.yaml"
    clusters.write_text(clusters.read_text().replace("idle_timeout: 25s", "idle_timeout: 20s"))
    done = authoring("diff", str(EXAMPLES), str(config), "--server", "127.0.0.1:1")
    assert done.returncode == 0, done.stderr
    header, body = done.stdout.split("\n", 2)[:2], done.stdout.split("\n", 2)[2]
    assert header[0].startswith(f"--- {EXAMPLES} (version ")
    assert body == EXPECTED_CHANGE


def test_diff_against_stored_versions_and_the_publish_preview(
    control_plane: XdsControlPlane, tmp_path: Path
) -> None:
    # diff only reads: the read token is enough.
    read_token = str(control_plane.read_token_file)
    server = ("--server", control_plane.admin_address, "--token-file", read_token)
    config = copy_examples(tmp_path)
    clusters = config / "clusters.yaml"
    clusters.write_text(clusters.read_text().replace("idle_timeout: 25s", "idle_timeout: 20s"))

    nothing = authoring("diff", str(EXAMPLES), *server)
    assert nothing.returncode == 0, nothing.stderr
    assert nothing.stdout.startswith("--- group default: no stable version\n")
    assert nothing.stdout.endswith("\n14 added, 0 removed, 0 changed\n")

    first = control_plane.xdsctl("publish", str(EXAMPLES)).stdout.strip()
    against_stable = authoring("diff", str(config), *server)
    assert against_stable.returncode == 0, against_stable.stderr
    assert against_stable.stdout.startswith(f"--- group default stable (version {first})\n")
    assert against_stable.stdout.split("\n", 2)[2] == EXPECTED_CHANGE

    published = control_plane.xdsctl("publish", str(config))
    second = published.stdout.strip()
    # publish shows the same diff before it sends anything
    assert published.stderr.startswith(
        f"--- group default stable (version {first})\n+++ version {second}\n" + EXPECTED_CHANGE
    )
    stored = authoring("diff", first, second, *server)
    assert stored.returncode == 0, stored.stderr
    assert stored.stdout == f"--- version {first}\n+++ version {second}\n" + EXPECTED_CHANGE

    missing = authoring("diff", "0" * 16, second, *server)
    assert missing.returncode == 1 and "not_found" in missing.stderr
