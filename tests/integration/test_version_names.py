"""Short version prefixes and the pointer names, wherever xdsctl takes a version, against a
real server: get, diff and rollback --to."""

from __future__ import annotations

import json
from pathlib import Path

from tests.integration import edge_config
from tests.integration.harness import XdsControlPlane


def publish(plane: XdsControlPlane, directory: Path, timeout: str) -> str:
    cluster = edge_config.static_cluster("a", connect_timeout=timeout)
    edge_config.write_clusters(directory, [cluster])
    return plane.xdsctl("publish", str(directory), "--group", "edge").stdout.strip()


def test_prefixes_and_pointer_names_work_in_get_diff_and_rollback(
    control_plane: XdsControlPlane, tmp_path: Path
) -> None:
    plane = control_plane
    v1 = publish(plane, tmp_path / "v1", "1s")
    v2 = publish(plane, tmp_path / "v2", "2s")
    assert v1[:8] != v2[:8]

    assert plane.xdsctl("get", "stable", "--group", "edge").stdout.startswith(
        f"# xdsctl get {v2}\n"
    )
    assert plane.xdsctl("get", v1[:8]).stdout.startswith(f"# xdsctl get {v1}\n")
    diff = plane.xdsctl("diff", v1[:8], "stable", "--group", "edge").stdout
    assert diff.startswith(f"--- {v1[:8]} (version {v1})\n+++ stable (version {v2})\n")
    assert "connect_timeout" in diff

    rolled = plane.xdsctl("rollback", "--group", "edge", "--to", v1[:10], "--timeout", "1")
    assert f"rolled back group edge to {v1}" in rolled.stderr + rolled.stdout
    pointers = json.loads(plane.xdsctl("snapshots", "--group", "edge", "--json").stdout)
    assert pointers["groups"]["edge"]["pointers"]["stable"] == v1

    none = plane.xdsctl("get", "candidate", "--group", "edge", check=False)
    assert none.returncode == 1 and "group edge has no candidate version" in none.stderr
    short = plane.xdsctl("get", v1[:6], check=False)
    assert short.returncode == 1 and "at least 8 hex digits" in short.stderr
