"""A partial NACK with a real Envoy, over state of the world and delta.

Envoy applies every valid cluster of a CDS update and NACKs the update for the invalid ones,
so after the NACK it holds a mix of the old and the new version. A rollback must then bring
it back to the old version exactly: over delta that means the server must know what the
client really holds after the NACK, not what it held before it.

Cluster b is invalid in a way only Envoy detects: a STATIC cluster whose host is the name
"localhost", not an IP address. `xdsctl publish` accepts it; Envoy NACKs it with
"malformed IP address: localhost".
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration import edge_config
from tests.integration.harness import Envoy, XdsControlPlane, wait_for

PROTOCOLS = pytest.mark.parametrize("api_type", ["GRPC", "DELTA_GRPC"], ids=["sotw", "delta"])
BOUND = 10.0  # seconds, for what should take well under 2 s


def publish(plane: XdsControlPlane, directory: Path, clusters: list[dict[str, Any]]) -> str:
    edge_config.write_clusters(directory, clusters)
    return plane.xdsctl("publish", str(directory), "--group", "edge").stdout.strip()


def held(envoy: Envoy) -> dict[str, str]:
    """{name: connect_timeout} of the dynamic clusters Envoy holds (active and warming)."""
    return {
        name: cluster["connect_timeout"]
        for kind in ("dynamic_active_clusters", "dynamic_warming_clusters")
        for name, cluster in envoy.clusters(kind).items()
    }


def cluster_type(plane: XdsControlPlane, node_id: str) -> dict[str, Any]:
    return plane.node_types(node_id).get("Cluster", {})


@PROTOCOLS
def test_a_rollback_after_a_partial_nack_restores_exactly_the_previous_clusters(
    api_type: str,
    control_plane: XdsControlPlane,
    start_envoy: Callable[..., Envoy],
    tmp_path: Path,
) -> None:
    plane = control_plane
    v1 = publish(plane, tmp_path / "v1", [edge_config.static_cluster("a", connect_timeout="1s")])
    envoy = start_envoy("edge-1", "edge", plane.xds_port, api_type=api_type)
    wait_for(lambda: held(envoy) == {"a": "1s"}, timeout=BOUND, what="Envoy holds v1")
    wait_for(
        lambda: cluster_type(plane, "edge-1").get("state") == "SYNCED",
        timeout=BOUND,
        what="CDS SYNCED on v1",
    )

    v2 = publish(
        plane,
        tmp_path / "v2",
        [
            edge_config.static_cluster("a", connect_timeout="2s"),
            edge_config.static_cluster("b", address="localhost"),
            edge_config.static_cluster("c"),
        ],
    )
    assert v2 != v1
    nacked = wait_for(
        lambda: (t := cluster_type(plane, "edge-1")).get("state") == "NACKED" and t,
        timeout=BOUND,
        what="the CDS NACK in xdsctl status",
    )
    assert "malformed IP address: localhost" in nacked["nack_error"], nacked
    # Envoy applied the valid clusters of v2 and kept serving: a mix of v1 and v2.
    wait_for(
        lambda: held(envoy) == {"a": "2s", "c": "1s"},
        timeout=BOUND,
        what="Envoy holding a@2s and c after the partial NACK",
    )
    assert int(envoy.stats()["cluster_manager.cds.update_rejected"]) >= 1

    result = plane.xdsctl(
        "rollback", "--group", "edge", "--to", v1, "--reason", "partial nack", "--timeout", "10"
    )
    assert re.fullmatch(rf"1/1 nodes ACKed {v1} in \d+\.\d\ds\n", result.stdout), result.stdout

    wait_for(
        lambda: held(envoy) == {"a": "1s"},
        timeout=BOUND,
        what="Envoy holding v1 exactly (a@1s, no b, no c)",
        explain=lambda: f"Envoy holds {held(envoy)}; xdscp: {cluster_type(plane, 'edge-1')}",
    )
    assert set(envoy.clusters("dynamic_active_clusters")) == {"a"}
    wait_for(
        lambda: cluster_type(plane, "edge-1").get("state") == "SYNCED",
        timeout=BOUND,
        what="CDS SYNCED on v1 after the rollback",
    )


@PROTOCOLS
def test_a_rollback_to_what_envoy_still_holds_after_a_nack_reports_it_at_once(
    api_type: str,
    control_plane: XdsControlPlane,
    start_envoy: Callable[..., Envoy],
    tmp_path: Path,
) -> None:
    """v2 only adds a cluster Envoy rejects, so after its NACK Envoy still holds exactly v1.
    Rolling back to v1 needs nothing sent and brings no ACK: the node counts as on v1 the
    moment it is assigned v1, and `xdsctl rollback` says so without waiting out its
    timeout."""
    plane = control_plane
    v1 = publish(plane, tmp_path / "v1", [edge_config.static_cluster("a")])
    envoy = start_envoy("edge-1", "edge", plane.xds_port, api_type=api_type)
    wait_for(
        lambda: cluster_type(plane, "edge-1").get("state") == "SYNCED",
        timeout=BOUND,
        what="CDS SYNCED on v1",
    )
    publish(
        plane,
        tmp_path / "v2",
        [edge_config.static_cluster("a"), edge_config.static_cluster("b", address="localhost")],
    )
    wait_for(
        lambda: cluster_type(plane, "edge-1").get("state") == "NACKED",
        timeout=BOUND,
        what="the CDS NACK in xdsctl status",
    )
    assert set(held(envoy)) == {"a"}

    started = time.monotonic()
    result = plane.xdsctl("rollback", "--group", "edge", "--to", v1, "--timeout", "30")
    assert re.fullmatch(rf"1/1 nodes ACKed {v1} in \d+\.\d\ds\n", result.stdout), result.stdout
    # Well inside the command's 30 s timeout: it did not wait for an ACK that never comes.
    assert time.monotonic() - started < BOUND
    assert set(held(envoy)) == {"a"}
