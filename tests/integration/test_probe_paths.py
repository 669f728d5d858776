"""The fresh probe as an operator meets it: the shipped policy run the way the README runs
`serve`, start-up checks of the probe's Envoy, and what a failed or cut-off probe reports.

The README's way: `xdsctl serve --rollout-policy examples/rollout-policy.yaml` from the
repository's top directory, with the default (relative) store `.xdscp/xdscp.db`. Relative
paths in the policy are relative to the policy file; the store and the probe's xDS socket
beside it are made absolute once, so the probe's Envoy (run from a temp dir of its own)
reaches them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration import edge_config
from tests.integration.harness import (
    ENVOY_BINARY,
    REPO,
    XdsControlPlane,
    free_port,
    http_get,
    wait_for,
)
from tests.integration.test_fresh_probe import processes_mentioning, write_config

pytestmark = pytest.mark.envoy

PROBE_PREFIX = "xdscp-probe-default-"  # node ids of the probes of group default


def xdsctl_env() -> dict[str, str]:
    """This checkout's code, whatever the working directory."""
    return {**os.environ, "PYTHONPATH": str(REPO)}


class ReadmeServe(XdsControlPlane):
    """`xdsctl serve` from the top of a copy of the repository, with the default store and
    token paths (relative, as the README runs it); only the ports are chosen at run time."""

    def __init__(self, checkout: Path, *extra_args: str) -> None:
        super().__init__(checkout / ".xdscp", *extra_args)
        self.checkout = checkout
        self.log_path = checkout / "xdscp.log"

    def start(self) -> XdsControlPlane:
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable, "-m", "controlplane.cli.main", "serve",
                    "--xds-address", f"127.0.0.1:{self.xds_port}",
                    "--admin-address", self.admin_address,
                    "--http-address", f"127.0.0.1:{self.http_port}",
                    *self.extra_args,
                ],
                cwd=self.checkout,
                env=xdsctl_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        serving = wait_for(self._serving, timeout=30, what="xdscp serving")
        self.xds_port, self.admin_port, self.http_port = (
            int(serving[name].rsplit(":", 1)[1]) for name in ("xds", "admin", "http")
        )
        assert http_get(f"http://127.0.0.1:{self.http_port}/readyz")[0] == 200
        return self

    def xdsctl(
        self, *args: str, check: bool = True, token_file: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """xdsctl from the checkout: the token from its default place, .xdscp/admin-token."""
        token = ["--token-file", str(token_file)] if token_file else []
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "controlplane.cli.main",
                *args,
                "--server",
                self.admin_address,
                *token,
            ],
            cwd=self.checkout,
            env=xdsctl_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and result.returncode != 0:
            pytest.fail(f"xdsctl {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
        return result


@pytest.fixture
def checkout() -> Iterator[Path]:
    """A copy of the repository's examples beside its `.tools` (as a fresh clone after
    scripts/setup has them), at a short path: the xDS socket's path is at most 107 bytes."""
    directory = Path(tempfile.mkdtemp(prefix="xdscp-clone-"))
    try:
        shutil.copytree(REPO / "examples", directory / "examples")
        (directory / ".tools").symlink_to((REPO / ".tools").resolve())
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def rollout(plane: XdsControlPlane) -> dict[str, Any]:
    listed = json.loads(plane.xdsctl("rollout", "status", "--json").stdout)
    return next((r for r in listed.get("rollouts", []) if r["group"] == "default"), {})


def wait_phase(plane: XdsControlPlane, phase: str, timeout: float) -> dict[str, Any]:
    return wait_for(
        lambda: (r := rollout(plane)).get("phase") == phase and r,
        timeout=timeout,
        what=f"rollout {phase}",
        explain=lambda: json.dumps([rollout(plane), plane.status()], indent=2),
    )


def test_the_shipped_example_policy_promotes_with_the_readmes_relative_paths(
    checkout: Path, start_envoy, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    plane = ReadmeServe(checkout)
    port, backends = free_port(), {"a": free_port(), "b": free_port()}
    try:
        # A team adopting the gate: v1 is stable on a running canary before the policy.
        plane.start()
        v1 = edge_config.write(
            tmp_path / "v1",
            listener_port=port,
            backends=backends,
            routes=[edge_config.route_to("a")],
        )
        plane.xdsctl("publish", str(v1), "-m", "v1")
        canary = start_envoy("edge-canary-1", "default", plane.xds_port)  # the policy's glob
        plane.stop()
        plane.extra_args = ("--rollout-policy", "examples/rollout-policy.yaml")
        plane.start()
        serving = next(e for e in plane.log_events() if e.get("event") == "serving")
        assert serving["store"] == str(checkout / ".xdscp" / "xdscp.db")
        assert serving["xds_socket"] == str(checkout / ".xdscp" / "xds.sock")
        wait_for(
            lambda: plane.node_types("edge-canary-1").get("Listener", {}).get("state") == "SYNCED",
            what="the canary reconnected before the rollout (so it counts as existing)",
        )

        v2 = edge_config.write(
            tmp_path / "v2",
            listener_port=port,
            backends=backends,
            routes=[edge_config.route_to("b")],
        )
        published = plane.xdsctl("publish", str(v2), "-m", "v2")
        assert "staged" in published.stderr, published.stderr
        candidate = published.stdout.strip()

        # The probe ran the Envoy named relative to examples/, over the socket beside the
        # relative store, got LIVE in its own network namespace, and the bake (30s) passed.
        promoted = wait_phase(plane, "promoted", timeout=120)
        assert promoted["candidate"] == candidate
        assert promoted["probe_state"] == "passed", promoted
        assert promoted["existing_acked"] == ["edge-canary-1"]
        assert [n for n in promoted["fresh_acked"] if n.startswith(PROBE_PREFIX)], promoted
        wait_for(lambda: canary.route_targets() == {"b"}, what="the canary on the promoted routes")
    finally:
        plane.stop()


def write_policy(directory: Path, envoy_binary: str, **probe: Any) -> Path:
    path = directory / "policy.yaml"
    fresh_probe = {"envoy_binary": envoy_binary, "isolate_network": True, **probe}
    policy = {
        "groups": {
            "default": {
                "canary": {"node_id": "canary-*"},
                "min_existing": 0,
                "min_fresh": 1,  # the probe is the fresh canary
                "bake_seconds": 0,
                "deadline_seconds": 300,
                "fresh_probe": fresh_probe,
            }
        }
    }
    path.write_text(yaml.safe_dump(policy))
    return path


@pytest.mark.parametrize(
    ("content", "problem"),
    [(None, "no such file"), (b"not a program\n", "cannot run it: Exec format error")],
)
def test_serve_exits_naming_the_policy_group_key_and_path_when_the_probes_envoy_does_not_run(
    tmp_path: Path, content: bytes | None, problem: str
) -> None:
    (tmp_path / "conf").mkdir()
    write_policy(tmp_path / "conf", "../bin/envoy")  # relative to conf/, not to the cwd
    binary = tmp_path / "bin" / "envoy"
    if content is not None:
        binary.parent.mkdir()
        binary.write_bytes(content)
        binary.chmod(0o755)
    result = subprocess.run(
        [
            sys.executable, "-m", "controlplane.cli.main", "serve",
            "--xds-address", "127.0.0.1:0", "--admin-address", "127.0.0.1:0",
            "--http-address", "127.0.0.1:0",
            "--rollout-policy", "conf/policy.yaml",
        ],
        cwd=tmp_path,
        env=xdsctl_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    expected = f"xdsctl: conf/policy.yaml: groups.default.fresh_probe.envoy_binary: {binary}: "
    assert expected + problem in result.stderr, result.stderr
    assert "serving" not in result.stderr


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[XdsControlPlane]:
    """xdscp whose group default is gated by the probe alone (no canary is running)."""
    policy = write_policy(tmp_path, str(ENVOY_BINARY), ready_timeout_seconds=5)
    plane = XdsControlPlane(tmp_path, "--rollout-policy", str(policy))
    try:
        yield plane.start()
    finally:
        plane.stop()


def test_a_probe_that_never_gets_ready_reports_the_tail_of_its_envoys_log(
    gated: XdsControlPlane, tmp_path: Path
) -> None:
    # Routes from a gRPC source that never answers, waited for forever: a fresh Envoy's
    # init never ends, and its log says why (the stream to the dead source keeps failing).
    stable = write_config(tmp_path / "v0", free_port(), free_port())
    gated.xdsctl("publish", str(stable))  # a group's first publish goes straight to stable
    config = write_config(tmp_path / "v1", free_port(), free_port(), fresh_fails=True)
    gated.xdsctl("publish", str(config))

    aborted = wait_phase(gated, "aborted", timeout=60)
    assert aborted["probe_state"] == "failed"
    assert aborted["reason"].startswith("fresh probe failed: not LIVE after 5s"), aborted
    assert "\n" not in aborted["reason"]  # the log is in probe_reason, not in the outcome
    reason, _, tail = aborted["probe_reason"].partition("\nenvoy log (last lines):\n")
    assert reason.startswith("not LIVE after 5s (server state: INITIALIZING"), reason
    assert "StreamRoutes gRPC config stream to" in tail, tail  # Envoy on the dead source
    assert 0 < len(tail.splitlines()) <= 20 and len(tail.encode()) <= 4096

    text = gated.xdsctl("rollout", "status").stdout
    assert tail.splitlines()[-1] in text  # what an operator reads
    [finished] = [e for e in gated.log_events() if e.get("event") == "fresh probe finished"]
    assert finished["ok"] is False and finished["envoy_log_tail"] == tail


def probes_of(xds_socket: Path) -> dict[int, Path]:
    """{pid: work dir} of the running probe Envoys whose bootstrap names this xDS socket
    (other test runs on the machine may run probes of their own)."""
    found = {}
    for pid in processes_mentioning(PROBE_PREFIX):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            bootstrap = Path(argv[argv.index("-c") + 1])
            if str(xds_socket) in bootstrap.read_text():
                found[pid] = bootstrap.parent
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not an Envoy
    return found


def test_an_aborted_rollout_tears_its_probe_down_and_shows_it_cancelled(
    tmp_path: Path,
) -> None:
    policy = write_policy(tmp_path, str(ENVOY_BINARY), ready_timeout_seconds=120)
    plane = XdsControlPlane(tmp_path, "--rollout-policy", str(policy))
    try:
        plane.start()
        stable = write_config(tmp_path / "v0", free_port(), free_port())
        plane.xdsctl("publish", str(stable))  # a group's first publish: straight to stable
        config = write_config(tmp_path / "v1", free_port(), free_port(), fresh_fails=True)
        plane.xdsctl("publish", str(config))
        probes = wait_for(lambda: probes_of(tmp_path / "xds.sock"), what="the probe running")
        assert rollout(plane)["probe_state"] == "running"

        plane.xdsctl("rollout", "abort", "--reason", "not today")
        aborted = rollout(plane)
        assert aborted["phase"] == "aborted"
        assert aborted["probe_state"] == "cancelled", aborted
        assert aborted["probe_reason"] == "cancelled: the rollout aborted"
        wait_for(
            lambda: not any(Path(f"/proc/{pid}").exists() for pid in probes),
            timeout=20,
            what="the probe's Envoy stopped",
        )
        wait_for(
            lambda: not any(workdir.exists() for workdir in probes.values()),
            timeout=10,
            what="the probe's temp dir removed",
        )
        assert rollout(plane)["probe_state"] == "cancelled"
    finally:
        plane.stop()
