"""Guarding the fleet after a promotion, with real Envoys (issue 13, must-have 11).

The outage's kind of config: running Envoys accept it, and an Envoy starting on it never
finishes initializing. Here that is a cluster that never finishes initializing, of two kinds:
an EDS cluster whose endpoints come from a source that never answers
(edge_config.never_warming_cluster), and a STATIC cluster with an active HTTP health check of
a host that accepts the connection and never answers (Envoy waits for the first round of
health checks before a cluster is initialized). A running Envoy keeps serving and only holds
its CDS ACK (WARMING); a new Envoy ACKs CDS, never asks for LDS and stays PRE_INITIALIZING.

The group has a guard-only policy, so the publish goes straight to stable and the guard
watches. A new Envoy then starts: its own stream shows it STUCK within --first-sync-timeout,
and once the guard's first_sync_seconds pass, xdscp rolls the group back to last_good by
itself, and the new Envoy becomes ready on it.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration import edge_config
from tests.integration.harness import Envoy, HttpUpstream, XdsControlPlane, free_port, http_get
from tests.integration.test_envoy_warming import (
    STUCK,
    Edge,
    bounded,
    pointers,
    serving,
    synced_on,
)

FIRST_SYNC_TIMEOUT = 2  # serve --first-sync-timeout: when a fresh node shows as STUCK
GUARD_FIRST_SYNC_SECONDS = 8  # the guard's bound: the rollback comes after STUCK shows


@pytest.fixture
def silent_host() -> Iterator[int]:
    """A port that accepts TCP connections (the kernel's backlog) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


def health_checked_cluster(name: str, port: int) -> dict[str, Any]:
    """A STATIC cluster whose one host is health checked over HTTP, the first check waiting
    an hour for its answer: the cluster does not finish initializing before that."""
    return {
        **edge_config.static_cluster(name, port=port),
        "health_checks": [
            {
                "timeout": "3600s",
                "interval": "3600s",
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
                "http_health_check": {"path": "/healthz"},
            }
        ],
    }


@pytest.fixture
def guarded_plane(tmp_path: Path) -> Iterator[XdsControlPlane]:
    policy = tmp_path / "rollout-policy.yaml"
    policy.write_text(
        yaml.safe_dump(
            {
                "groups": {
                    "edge": {
                        "guard": {"seconds": 300, "first_sync_seconds": GUARD_FIRST_SYNC_SECONDS}
                    }
                }
            }
        )
    )
    plane = XdsControlPlane(
        tmp_path,
        "--rollout-policy",
        str(policy),
        "--first-sync-timeout",
        str(FIRST_SYNC_TIMEOUT),
    ).start()
    yield plane
    plane.stop()


def stuck_rows(plane: XdsControlPlane, node_id: str) -> list[str]:
    """The `xdsctl status` lines showing `node_id` as STUCK."""
    text = plane.xdsctl("status").stdout
    return [line for line in text.splitlines() if line.startswith(node_id) and " STUCK " in line]


@pytest.mark.parametrize(
    ("api_type", "never_initializes"),
    [
        ("GRPC", "eds_source_never_answers"),
        ("DELTA_GRPC", "eds_source_never_answers"),
        ("GRPC", "health_check_never_answers"),
    ],
    ids=["sotw-eds-source", "delta-eds-source", "sotw-health-check"],
)
def test_a_new_envoy_stuck_on_the_new_stable_shows_stuck_and_the_guard_rolls_back_so_it_starts(
    api_type: str,
    never_initializes: str,
    silent_host: int,
    guarded_plane: XdsControlPlane,
    tmp_path: Path,
    upstream: Callable[[str], HttpUpstream],
    start_envoy: Callable[..., Envoy],
) -> None:
    plane = guarded_plane
    edge = Edge(plane, tmp_path)
    a = upstream("a")
    v1, _ = edge.publish({"a": a.port}, [edge_config.route_to("a")])
    running = start_envoy("edge-1", "edge", plane.xds_port, api_type=api_type)  # /ready LIVE
    bounded(lambda: synced_on(plane, "edge-1", v1), "edge-1 SYNCED on v1", plane, running)
    bounded(lambda: pointers(plane).get("last_good") == v1, "v1 is last_good", plane, running)

    # Straight to stable (no canary stage), and the guard starts watching.
    stuck_cluster = (
        edge_config.never_warming_cluster(STUCK, free_port())
        if never_initializes == "eds_source_never_answers"
        else health_checked_cluster(STUCK, silent_host)
    )
    v2, stderr = edge.publish(
        {"a": a.port}, [edge_config.route_to("a")], extra_clusters=[stuck_cluster]
    )
    assert f"published {v2} to group edge" in stderr
    assert pointers(plane) == {"stable": v2, "last_good": v1}
    watching = plane.xdsctl("rollout", "status", "--group", "edge").stdout
    assert watching.startswith(f"group edge: guard WATCHING on {v2}, "), watching
    assert watching.rstrip().endswith(f"rolls back to {v1}"), watching
    # The running Envoy accepts it: no NACK, the new cluster warming, traffic still served.
    bounded(
        lambda: STUCK in running.clusters("dynamic_warming_clusters"),
        "edge-1 warming the new cluster",
        plane,
        running,
    )
    assert running.stats()["cluster_manager.cds.update_rejected"] == "0"
    assert serving(edge.url(), "backend=a")

    fresh = Envoy(tmp_path, "edge-fresh", "edge", plane.xds_port, api_type=api_type)
    fresh.start(ready=False)
    try:
        # Its own stream shows it stuck, on v2, before the guard acts.
        [row] = bounded(
            lambda: stuck_rows(plane, "edge-fresh"),
            "xdsctl status shows edge-fresh STUCK",
            plane,
            running,
            fresh,
        )
        assert v2 in row.split(), row
        assert "never asked for LDS" in row, row
        assert fresh.admin("/ready")[0] == 503  # Envoy agrees: not initialized

        # The guard rolls the group back to last_good by itself...
        bounded(
            lambda: pointers(plane).get("stable") == v1,
            "the guard rolls edge back to v1",
            plane,
            running,
            fresh,
            timeout=GUARD_FIRST_SYNC_SECONDS + 15,
        )
        history = json.loads(plane.xdsctl("snapshots", "--group", "edge", "--json").stdout)
        rollback = next(e for e in history["entries"] if e["action"] == "rollback")
        assert (rollback["version"], rollback["actor"]) == (v1, "xdscp-guard")
        assert rollback["message"] == (
            f"node edge-fresh started on {v2} and did not finish its first sync within "
            f"{GUARD_FIRST_SYNC_SECONDS}s: never asked for LDS"
        )

        # ...and the new Envoy becomes ready on it, like the running one.
        bounded(
            lambda: fresh.admin("/ready") == (200, "LIVE\n"),
            "edge-fresh /ready LIVE",
            plane,
            running,
            fresh,
        )
        bounded(lambda: synced_on(plane, "edge-fresh", v1), "edge-fresh SYNCED", plane, fresh)
        bounded(lambda: synced_on(plane, "edge-1", v1), "edge-1 SYNCED", plane, running)
        assert STUCK not in fresh.cluster_names()
        assert not stuck_rows(plane, "edge-fresh")

        # Reported like a manual rollback: the reason, N/M ACKed and the time taken.
        events = bounded(
            lambda: [e for e in plane.log_events() if e.get("event") == "rollback converged"],
            "rollback converged in the log",
            plane,
        )
        assert (events[0]["actor"], events[0]["acked"], events[0]["version"]) == (
            "xdscp-guard",
            "2/2",
            v1,
        )
        assert events[0]["seconds"] >= 0
        tripped = [e for e in plane.log_events() if e.get("event") == "guard tripped: rolling back"]
        assert tripped and tripped[0]["reason"] == rollback["message"]
        [guard] = json.loads(plane.xdsctl("rollout", "status", "--json").stdout)["guards"]
        assert (guard["phase"], guard["reason"]) == ("tripped", rollback["message"])
        _, metrics = http_get(f"http://127.0.0.1:{plane.http_port}/metrics")
        assert re.search(r'^xdscp_guard_trips_total\{group="edge"\} 1\.0$', metrics, re.M)
        assert re.search(r'^xdscp_guard_watching\{group="edge"\} 0\.0$', metrics, re.M)
        assert re.search(r'^xdscp_nodes_stuck\{group="edge"\} 0\.0$', metrics, re.M)
    finally:
        fresh.stop()


def test_an_envoy_stuck_in_initialization_shows_stuck_also_after_it_reconnects(
    tmp_path: Path, upstream: Callable[[str], HttpUpstream]
) -> None:
    """No guard here: the stream rule alone. An Envoy starting on config it cannot finish
    initializing on is STUCK; after xdscp restarts it reconnects reporting the clusters it
    ACKed (not empty), still never asks for listeners, and is STUCK again; a publish without
    the cluster lets it start, and it is STUCK no more."""
    plane = XdsControlPlane(tmp_path, "--first-sync-timeout", str(FIRST_SYNC_TIMEOUT)).start()
    edge = Edge(plane, tmp_path)
    a = upstream("a")
    stuck_cluster = edge_config.never_warming_cluster(STUCK, free_port())
    edge.publish({"a": a.port}, [edge_config.route_to("a")], extra_clusters=[stuck_cluster])
    envoy = Envoy(tmp_path, "edge-new", "edge", plane.xds_port)
    try:
        envoy.start(ready=False)
        [row] = bounded(lambda: stuck_rows(plane, "edge-new"), "edge-new STUCK", plane, envoy)
        assert "never asked for LDS" in row, row
        [node] = [n for n in plane.status() if n["node_id"] == "edge-new"]
        assert node["started_empty"] and node["stuck"], node
        assert node["missing"] == ["never asked for LDS"], node
        _, metrics = http_get(f"http://127.0.0.1:{plane.http_port}/metrics")
        assert re.search(r'^xdscp_nodes_stuck\{group="edge"\} 1\.0$', metrics, re.M)

        plane.stop()
        plane.start()
        bounded(lambda: plane.status(), "edge-new reconnected", plane, envoy)
        [row] = bounded(lambda: stuck_rows(plane, "edge-new"), "edge-new STUCK again", plane, envoy)
        assert "never asked for LDS" in row, row
        [node] = [n for n in plane.status() if n["node_id"] == "edge-new"]
        assert not node.get("started_empty"), node  # it reported the clusters it holds
        assert envoy.admin("/ready")[0] == 503

        v2, _ = edge.publish({"a": a.port}, [edge_config.route_to("a")])
        bounded(
            lambda: envoy.admin("/ready") == (200, "LIVE\n"), "edge-new /ready LIVE", plane, envoy
        )
        bounded(lambda: synced_on(plane, "edge-new", v2), "edge-new SYNCED", plane, envoy)
        assert not stuck_rows(plane, "edge-new")
    finally:
        envoy.stop()
        plane.stop()
