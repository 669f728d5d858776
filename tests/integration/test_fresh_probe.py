"""The fresh probe with the real Envoy binary against a real xdscp.

The config only fresh Envoys fail on (case b) is a listener whose routes come over gRPC from
somewhere else that never answers, with `initial_fetch_timeout: 0s` (wait forever):

    rds:
      route_config_name: edge_routes
      config_source:
        resource_api_version: V3
        initial_fetch_timeout: 0s
        api_config_source:
          api_type: GRPC
          transport_api_version: V3
          grpc_services:
          - google_grpc: {target_uri: "127.0.0.1:<dead port>", stat_prefix: rds_dead}

A running Envoy ACKs it and keeps serving on its old listener while the new one warms
forever; a fresh Envoy's server init waits on that listener and never goes LIVE. (With
`envoy_grpc` pointing at a cluster from the snapshot, Envoy instead NACKs the listener:
ApiConfigSource clusters must be static, i.e. in the bootstrap.)
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane import resources
from controlplane.config.loader import load_directory
from controlplane.rollout.probe import HttpCheck, ProbeConfig, ProbeResult, XdsEndpoint, run_probe
from controlplane.snapshot import Snapshot
from tests.integration import edge_config, harness
from tests.integration.harness import (
    ENVOY_BINARY,
    Envoy,
    XdsControlPlane,
    free_port,
    http_get,
    wait_for,
)

pytestmark = pytest.mark.envoy

REQUIRED_TYPES = {"Cluster", "Listener"}
DIRECT = {"status": 200, "body": {"inline_string": "direct\n"}}


class SocketXdsControlPlane(XdsControlPlane):
    """xdscp that also serves xDS on a Unix socket (`serve --xds-socket`)."""

    def __init__(self, workdir: Path, xds_socket: Path) -> None:
        super().__init__(workdir, "--xds-socket", str(xds_socket))
        self.xds_socket = xds_socket

    def start(self) -> XdsControlPlane:
        real = harness.subprocess
        socket_args = ["--xds-socket", str(self.xds_socket)]

        class WithSocket:  # adds the flag if the harness does not pass extra args itself
            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            @staticmethod
            def Popen(args: list[str], **kw: Any) -> subprocess.Popen[bytes]:
                extra = [] if "--xds-socket" in args else socket_args
                return real.Popen([*args, *extra], **kw)

        harness.subprocess = WithSocket()  # type: ignore[assignment]
        try:
            return super().start()
        finally:
            harness.subprocess = real

    def xds(self) -> XdsEndpoint:
        return XdsEndpoint(tcp=("127.0.0.1", self.xds_port), unix_socket=self.xds_socket)

    def is_synced(self, node_id: str) -> bool:
        types = self.node_types(node_id)
        return set(types) >= REQUIRED_TYPES and all(t["state"] == "SYNCED" for t in types.values())


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[SocketXdsControlPlane]:
    socket_dir = Path(tempfile.mkdtemp(prefix="xdscp-"))  # short: sun_path is 108 bytes
    plane = SocketXdsControlPlane(tmp_path, socket_dir / "xds.sock")
    try:
        plane.start()
        wait_for(plane.xds_socket.exists, timeout=10, what="xDS Unix socket")
        yield plane
    finally:
        plane.stop()
        shutil.rmtree(socket_dir, ignore_errors=True)


@pytest.fixture(autouse=True)
def _envoy_binary() -> None:
    if not ENVOY_BINARY.exists():
        pytest.fail(f"Envoy binary missing at {ENVOY_BINARY}: run `bash .ci/run` to install it")


# --- config -----------------------------------------------------------------------------------


def write_config(
    directory: Path, listener_port: int, backend_port: int, *, fresh_fails: bool = False
) -> Path:
    """edge_config's edge: "/up" to backend a, anything else a direct_response 200."""
    routes = [
        edge_config.route_to("a", "/up"),
        {"match": {"prefix": "/"}, "direct_response": DIRECT},
    ]
    edge_config.write(
        directory, listener_port=listener_port, backends={"a": backend_port}, routes=routes
    )
    if fresh_fails:
        _routes_from_a_dead_grpc_source(directory / "listeners.yaml")
    return directory


def _routes_from_a_dead_grpc_source(listeners_file: Path) -> None:
    config = yaml.safe_load(listeners_file.read_text())
    manager = config["resources"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    manager["rds"]["config_source"] = {
        "resource_api_version": "V3",
        "initial_fetch_timeout": "0s",  # wait for the routes forever
        "api_config_source": {
            "api_type": "GRPC",
            "transport_api_version": "V3",
            "grpc_services": [
                {"google_grpc": {"target_uri": f"127.0.0.1:{free_port()}", "stat_prefix": "dead"}}
            ],
        },
    }
    listeners_file.write_text(yaml.safe_dump(config, sort_keys=False))


def snapshot_of(directory: Path) -> Snapshot:
    resources.load_all_descriptors()
    return Snapshot.from_messages((r.type_url, r.message) for r in load_directory(directory))


def publish(plane: XdsControlPlane, directory: Path) -> Snapshot:
    plane.xdsctl("publish", str(directory))  # group "default"
    return snapshot_of(directory)


# --- process checks ---------------------------------------------------------------------------


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            found.append(int(entry.name))
    return found


def assert_torn_down(result: ProbeResult) -> None:
    assert result.pid is not None and result.workdir is not None
    assert not Path(f"/proc/{result.pid}/cmdline").exists() or result.node_id.encode() not in (
        Path(f"/proc/{result.pid}/cmdline").read_bytes()
    )
    assert processes_mentioning(result.node_id) == []
    assert not result.workdir.exists()
    assert list(Path(tempfile.gettempdir()).glob(f"{result.node_id}-*")) == []


def probe(
    plane: SocketXdsControlPlane,
    candidate: Snapshot,
    *,
    timeout: float = 20.0,
    isolate: bool = False,
    check: HttpCheck | None = None,
) -> ProbeResult:
    config = ProbeConfig(ENVOY_BINARY, timeout, isolate_network=isolate, check=check)
    return asyncio.run(
        run_probe(
            config,
            group="default",
            candidate=candidate,
            xds=plane.xds(),
            is_synced=plane.is_synced,
        )
    )


# --- tests ------------------------------------------------------------------------------------


def test_a_good_config_is_ready(plane: SocketXdsControlPlane, upstream, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a = upstream("a")
    candidate = publish(plane, write_config(tmp_path / "v1", free_port(), a.port))

    result = probe(plane, candidate)

    assert result.ok, result
    assert result.reason == "ready"
    assert result.node_id.startswith("xdscp-probe-default-")
    assert result.seconds < 20
    assert_torn_down(result)


def test_isolated_probe_checks_its_own_listener_beside_an_envoy_on_the_same_port(
    plane: SocketXdsControlPlane,
    upstream,  # type: ignore[no-untyped-def]
    start_envoy: Callable[..., Envoy],
    tmp_path: Path,
) -> None:
    a = upstream("a")
    port = free_port()
    candidate = publish(plane, write_config(tmp_path / "v1", port, a.port))
    running = start_envoy("edge-1", "default", plane.xds_port)  # holds 127.0.0.1:port
    url = f"http://127.0.0.1:{port}/up"
    wait_for(lambda: http_get(url, timeout=2) == (200, "backend=a path=/up\n"), what="edge-1")
    requests_before = running.stats()["http.edge.downstream_rq_total"]

    ok = probe(
        plane,
        candidate,
        isolate=True,
        check=HttpCheck(listener="edge_http", path="/probe", host="example.com"),
    )
    wrong = probe(
        plane,
        candidate,
        isolate=True,
        check=HttpCheck(listener="edge_http", path="/probe", expect_status=204),
    )

    assert ok.ok, ok
    assert ok.reason == "ready"
    assert not wrong.ok
    assert wrong.reason == "check edge_http GET /probe returned 200, expected 204"
    assert_torn_down(ok)
    assert_torn_down(wrong)
    # The checks reached the probe's own listener, and the Envoy already on the host was not
    # disturbed: it saw none of those requests and still serves.
    assert running.stats()["http.edge.downstream_rq_total"] == requests_before
    assert running.process is not None and running.process.poll() is None
    assert http_get(url, timeout=2) == (200, "backend=a path=/up\n")
    assert plane.is_synced("edge-1")


def test_a_config_only_fresh_envoys_fail_on_is_caught(
    plane: SocketXdsControlPlane,
    upstream,  # type: ignore[no-untyped-def]
    start_envoy: Callable[..., Envoy],
    tmp_path: Path,
) -> None:
    a = upstream("a")
    port = free_port()
    publish(plane, write_config(tmp_path / "v1", port, a.port))
    running = start_envoy("edge-1", "default", plane.xds_port)
    url = f"http://127.0.0.1:{port}/up"
    wait_for(lambda: http_get(url, timeout=2) == (200, "backend=a path=/up\n"), what="edge-1")

    candidate = publish(plane, write_config(tmp_path / "v2", port, a.port, fresh_fails=True))

    # The running Envoy ACKs the new listener, warms it forever, and serves on the old one.
    def running_acked_v2() -> bool:
        listener = plane.node_types("edge-1").get("Listener", {})
        expected = candidate.of_type(resources.LISTENER).version
        return listener.get("state") == "SYNCED" and listener.get("acked_version") == expected

    wait_for(running_acked_v2, timeout=20, what="edge-1 ACKs the new listener")
    stats = running.stats()
    assert stats["listener_manager.lds.update_rejected"] == "0"
    assert stats["listener_manager.total_listeners_warming"] == "1"
    assert stats["listener_manager.total_listeners_active"] == "1"
    assert http_get(url, timeout=2) == (200, "backend=a path=/up\n")
    assert running.admin("/ready") == (200, "LIVE\n")

    # A fresh Envoy on the same config never becomes LIVE.
    result = probe(plane, candidate, timeout=5)

    assert not result.ok
    assert result.reason.startswith("not LIVE after 5s (server state: INITIALIZING"), result
    assert "RDS init edge_routes" in result.reason
    assert 5 <= result.seconds < 10
    assert_torn_down(result)
    assert http_get(url, timeout=2) == (200, "backend=a path=/up\n")  # still the old listener


@pytest.mark.parametrize("isolate", [False, True], ids=["host", "isolated"])
def test_cancelling_the_probe_still_tears_envoy_down(
    plane: SocketXdsControlPlane,
    upstream,  # type: ignore[no-untyped-def]
    tmp_path: Path,
    isolate: bool,
) -> None:
    a = upstream("a")
    candidate = publish(plane, write_config(tmp_path / "v1", free_port(), a.port))
    asked: list[str] = []

    def never_synced(node_id: str) -> bool:  # Envoy is LIVE when this is first asked
        asked.append(node_id)
        return False

    async def cancel_mid_wait() -> tuple[str, list[int], list[Path]]:
        config = ProbeConfig(ENVOY_BINARY, ready_timeout_seconds=30, isolate_network=isolate)
        task = asyncio.create_task(
            run_probe(
                config,
                group="default",
                candidate=candidate,
                xds=plane.xds(),
                is_synced=never_synced,
            )
        )
        deadline = time.monotonic() + 20
        while not asked and not task.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert asked and not task.done(), "the probe Envoy never became LIVE"
        node_id = asked[0]
        pids = processes_mentioning(node_id)
        workdirs = list(Path(tempfile.gettempdir()).glob(f"{node_id}-*"))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 15)
        return node_id, pids, workdirs

    node_id, pids, workdirs = asyncio.run(cancel_mid_wait())

    assert len(pids) == 1 and len(workdirs) == 1  # it was running, in its temp dir
    assert processes_mentioning(node_id) == []
    assert not os.path.exists(f"/proc/{pids[0]}/cmdline") or (
        node_id.encode() not in Path(f"/proc/{pids[0]}/cmdline").read_bytes()
    )
    assert not workdirs[0].exists()
