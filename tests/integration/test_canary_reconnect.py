"""The gate counts every canary, with real Envoys: one restarted mid-rollout (a new process,
holding nothing) and one whose xDS connection drops and comes back holding stable.

The connection drop goes through a TCP relay between Envoy and xdscp (gated_group.Relay),
which the test cuts and restores; Envoy and xdscp are the real ones.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration import edge_config
from tests.integration.gated_group import CANARY, Relay, gated_groups
from tests.integration.harness import Envoy, free_port, wait_for


@pytest.fixture
def group(tmp_path: Path):  # type: ignore[no-untyped-def]
    with gated_groups(tmp_path) as make:
        yield make


def test_a_canary_restarted_mid_rollout_is_pending_then_counted_fresh_and_promotes(
    group, tmp_path
) -> None:
    edge = group(
        {
            "min_existing": 1,
            "min_fresh": 1,  # only the restarted canary can give it
            "bake_seconds": 1,
            "ack_timeout_seconds": 30,
            "deadline_seconds": 600,
        }
    )
    canary = Envoy(tmp_path, "edge-canary-1", "edge", edge.plane.xds_port, metadata=CANARY)
    try:
        canary.start()
        wait_for(lambda: edge.synced("edge-canary-1", edge.v1), what="canary on v1")
        edge.gate_on()
        wait_for(lambda: edge.synced("edge-canary-1", edge.v1), what="canary back on v1")
        v2 = edge.publish("v2", "b")
        wait_for(
            lambda: edge.rollout().get("existing_acked") == ["edge-canary-1"],
            what="the running canary ACKs v2",
        )

        canary.stop()
        during = wait_for(
            lambda: (r := edge.rollout()).get("pending") and r, what="the canary shown pending"
        )
        assert during["phase"] == "canary"
        assert [(p["node_id"], p["waiting_for"]) for p in during["pending"]] == [
            ("edge-canary-1", "reconnect")
        ]
        text = edge.plane.xdsctl("rollout", "status").stdout
        assert "waiting for:\n    edge-canary-1: reconnect (disconnected " in text, text

        canary.admin_address_path.unlink()  # start() then waits for the new process
        canary.start()  # a new process with the same node id: it holds nothing
        done = wait_for(
            lambda: (r := edge.rollout()).get("phase") != "canary" and r,
            timeout=60,
            what="the rollout ends",
        )
        assert done["phase"] == "promoted", done
        assert done["existing_acked"] == ["edge-canary-1"]
        assert done["fresh_acked"] == ["edge-canary-1"]
        assert "pending" not in done
        wait_for(lambda: canary.route_targets() == {"b"}, what="the canary serves v2")
        wait_for(lambda: edge.synced("edge-canary-1", v2), what="canary SYNCED on v2")
    finally:
        canary.stop()


def test_a_canary_that_reconnects_holding_stable_counts_as_existing(group, tmp_path) -> None:
    edge = group(
        {
            "min_existing": 1,
            "min_fresh": 0,
            "bake_seconds": 1,
            "ack_timeout_seconds": 30,
            "deadline_seconds": 600,
        }
    )
    edge.relay = Relay(edge.plane.xds_port)
    canary = Envoy(tmp_path, "edge-canary-1", "edge", edge.relay.port, metadata=CANARY)
    try:
        canary.start()
        wait_for(lambda: edge.synced("edge-canary-1", edge.v1), what="canary on v1")
        edge.relay.cut()  # the canary keeps running on v1, without a control plane
        edge.gate_on()  # (the relay still points at the same xDS port)
        v2 = edge.publish("v2", "b")
        staged = edge.rollout()
        assert staged["phase"] == "canary" and staged["candidate"] == v2
        assert not edge.synced("edge-canary-1", edge.v1)  # not connected at staging

        edge.relay.restore()  # it reconnects reporting the v1 it holds, then gets v2
        done = wait_for(
            lambda: (r := edge.rollout()).get("phase") != "canary" and r,
            timeout=60,
            what="the rollout ends",
        )
        assert done["phase"] == "promoted", done
        assert done["existing_acked"] == ["edge-canary-1"]
        assert done.get("fresh_acked", []) == []
        wait_for(lambda: canary.route_targets() == {"b"}, what="the canary serves v2")
    finally:
        canary.stop()


def test_a_canary_that_cannot_ack_is_named_with_what_it_owes_until_its_ack_timeout(
    group, tmp_path
) -> None:
    edge = group(
        {"min_existing": 1, "bake_seconds": 1, "ack_timeout_seconds": 8, "deadline_seconds": 600}
    )
    canary = Envoy(tmp_path, "edge-canary-1", "edge", edge.plane.xds_port, metadata=CANARY)
    # Endpoints from a management server that never answers, waited for forever: the cluster
    # never warms, so Envoy accepts the update but holds its CDS ACK.
    never_warms = {
        "@type": edge_config.CLUSTER,
        "name": "stuck",
        "type": "EDS",
        "connect_timeout": "1s",
        "eds_cluster_config": {
            "eds_config": {
                "api_config_source": {
                    "api_type": "GRPC",
                    "transport_api_version": "V3",
                    "grpc_services": [
                        {
                            "google_grpc": {
                                "target_uri": f"127.0.0.1:{free_port()}",
                                "stat_prefix": "legacy",
                            }
                        }
                    ],
                },
                "initial_fetch_timeout": "0s",
                "resource_api_version": "V3",
            }
        },
    }
    try:
        canary.start()
        edge.gate_on()
        wait_for(lambda: edge.synced("edge-canary-1", edge.v1), what="canary back on v1")
        directory = edge_config.write(
            tmp_path / "stuck",
            listener_port=edge.port,
            backends=edge.backends,
            routes=[edge_config.route_to("a")],
            extra_clusters=[never_warms],
        )
        v2 = edge.plane.xdsctl("publish", str(directory), "--group", "edge").stdout.strip()
        during = wait_for(
            lambda: (r := edge.rollout()).get("pending") and r, what="the canary shown pending"
        )
        assert [(p["node_id"], p["waiting_for"], p["types"]) for p in during["pending"]] == [
            ("edge-canary-1", "ack", ["CLUSTER"])
        ]
        text = edge.plane.xdsctl("rollout", "status", "--group", "edge").stdout
        assert f"    edge-canary-1: ACK of CLUSTER for {v2}" in text, text

        done = wait_for(
            lambda: (r := edge.rollout()).get("phase") != "canary" and r,
            timeout=30,
            what="the rollout ends",
        )
        assert done["phase"] == "aborted"
        assert done["reason"] == "canary edge-canary-1 did not ACK the candidate within 8s"
    finally:
        canary.stop()
