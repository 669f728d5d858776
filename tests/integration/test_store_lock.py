"""One server per store: a second `xdsctl serve` on the same SQLite file exits at start-up,
naming the store and the pid of the server that holds it; once that one stops, the store is
free for the next."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.integration.harness import REPO, XdsControlPlane, http_get


def serve(store: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable, "-m", "controlplane.cli.main", "serve",
            "--xds-address", "127.0.0.1:0", "--admin-address", "127.0.0.1:0",
            "--http-address", "127.0.0.1:0", "--store", str(store),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip


def test_a_second_server_on_the_same_store_exits_naming_the_store_and_its_owner(
    tmp_path: Path,
) -> None:
    first = XdsControlPlane(tmp_path).start()
    try:
        assert first.process is not None
        second = serve(first.store)
        assert second.returncode == 1, second.stderr
        assert (
            f"xdsctl: store {first.store} is in use by another xdscp server "
            f"(pid {first.process.pid}), which holds {first.store}.lock"
        ) in second.stderr
        assert '"serving"' not in second.stderr
        # The first is undisturbed.
        assert http_get(f"http://127.0.0.1:{first.http_port}/readyz")[0] == 200
    finally:
        assert first.stop() == 0

    crashed = XdsControlPlane(tmp_path).start()  # the lock went with the first server
    assert crashed.process is not None
    crashed.process.kill()  # no clean shutdown: the kernel drops the lock all the same
    crashed.process.wait(timeout=10)
    XdsControlPlane(tmp_path).start().stop()
