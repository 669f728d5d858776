"""xdsctl rollout status / promote / abort and rollback, end to end against `xdsctl serve`,
with ADS clients standing in for Envoys (the Envoy scenarios are in test_canary_rollout)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import yaml

from tests.integration import edge_config
from tests.integration.ads_client import AckingNode
from tests.integration.harness import XdsControlPlane, free_port, wait_for

POLICY = {
    "groups": {
        "edge": {
            "canary": {"node_id": "canary-*"},
            "min_existing": 1,
            "bake_seconds": 0,
            "auto_promote": False,
        }
    }
}


@pytest.fixture
def plane(tmp_path: Path):  # type: ignore[no-untyped-def]
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(POLICY))
    plane = XdsControlPlane(tmp_path, "--rollout-policy", str(tmp_path / "policy.yaml")).start()
    yield plane
    plane.stop()


def publish(plane: XdsControlPlane, directory: Path, route_to: str) -> str:
    edge_config.write(
        directory,
        listener_port=free_port(),
        backends={"a": 1, "b": 2},
        routes=[edge_config.route_to(route_to)],
    )
    return plane.xdsctl("publish", str(directory), "--group", "edge").stdout.strip()


def rollout(plane: XdsControlPlane) -> dict:  # type: ignore[type-arg]
    listed = json.loads(plane.xdsctl("rollout", "status", "--group", "edge", "--json").stdout)
    return listed["rollouts"][0]


def held(plane: XdsControlPlane, node_id: str) -> str | None:
    """The snapshot version `node_id` holds, by `xdsctl status` (None: not connected)."""
    nodes = {n["node_id"]: n for n in plane.status()}
    return nodes[node_id].get("held_version") if node_id in nodes else None


def test_manual_promotion_abort_and_rollback_after_a_restart(plane, tmp_path) -> None:
    canary = AckingNode(plane.xds_port, "canary-1", "edge")
    other = AckingNode(plane.xds_port, "web-1", "edge")
    try:
        v0 = publish(plane, tmp_path / "v0", "b")  # a group's first publish: straight to stable
        wait_for(lambda: held(plane, "web-1") == v0, what="web-1 gets v0")
        v1 = publish(plane, tmp_path / "v1", "a")
        wait_for(lambda: rollout(plane)["phase"] == "awaiting_promotion", what="v1 verified")
        assert rollout(plane)["existing_acked"] == ["canary-1"]
        assert held(plane, "web-1") == v0  # the ordinary node keeps stable meanwhile

        promoted = plane.xdsctl("rollout", "promote", "--group", "edge", "--reason", "ship it")
        assert "PROMOTED" in promoted.stdout and "ship it" in promoted.stdout
        wait_for(lambda: held(plane, "web-1") == v1, what="web-1 gets v1")

        v2 = publish(plane, tmp_path / "v2", "b")
        wait_for(lambda: rollout(plane)["candidate"] == v2, what="v2 staged")
        aborted = plane.xdsctl("rollout", "abort", "--group", "edge", "--reason", "changed my mind")
        assert "ABORTED" in aborted.stdout and "changed my mind" in aborted.stdout
        nothing = plane.xdsctl("rollout", "promote", "--group", "edge", check=False)
        assert nothing.returncode == 1
        assert "group edge has no rollout in progress" in nothing.stderr
        snapshots = json.loads(plane.xdsctl("snapshots", "--group", "edge", "--json").stdout)
        actions = [e["action"] for e in snapshots["entries"]]
        # Newest first: the abort, after v2 was staged (and maybe verified), after v1's promote.
        assert actions[0] == "abort" and "stage" in actions[1:3] and "promote" in actions
        assert snapshots["groups"]["edge"]["pointers"]["stable"] == v1
        assert "candidate" not in snapshots["groups"]["edge"]["pointers"]
    finally:
        canary.close()
        other.close()

    plane.stop()
    plane.start()
    node = AckingNode(plane.xds_port, "web-2", "edge")
    try:
        result = plane.xdsctl("rollback", "--group", "edge", "--to", v1, "--timeout", "20")
        assert result.stdout.startswith(f"1/1 nodes ACKed {v1} in ")
        unknown = plane.xdsctl("rollback", "--group", "edge", "--to", "0" * 16, check=False)
        assert unknown.returncode == 1
        assert (
            f"not_found: version {'0' * 16} is not in the store; nothing changed" in unknown.stderr
        )
    finally:
        node.close()


def test_rollback_reports_nodes_that_do_not_ack(plane, tmp_path) -> None:
    """A node that never ACKs the rolled-back version is listed, and the exit status is 1."""
    canary = AckingNode(plane.xds_port, "canary-1", "edge")
    try:
        publish(plane, tmp_path / "v0", "b")  # a group's first publish: straight to stable
        v1 = publish(plane, tmp_path / "v1", "a")
        wait_for(lambda: rollout(plane)["phase"] == "awaiting_promotion", what="v1 verified")
        plane.xdsctl("rollout", "promote", "--group", "edge")
    finally:
        canary.close()
    # A node that subscribes but will never ACK: a raw stream that sends one request only.
    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import discovery_pb2

    channel = grpc.insecure_channel(f"127.0.0.1:{plane.xds_port}")
    call = channel.stream_stream(
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
        request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
        response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
    )
    first = discovery_pb2.DiscoveryRequest(
        type_url="type.googleapis.com/envoy.config.cluster.v3.Cluster",
        node=base_pb2.Node(id="silent-1", cluster="edge"),
    )
    hold = threading.Event()

    def requests():  # type: ignore[no-untyped-def]
        yield first
        hold.wait(60)  # keep the stream open, never ACK

    responses = call(requests(), timeout=60)
    try:
        next(responses)  # it got v1's clusters and never answers
        result = plane.xdsctl(
            "rollback", "--group", "edge", "--to", v1, "--timeout", "2", check=False
        )
        assert result.returncode == 1
        assert "0/1 nodes ACKed" in result.stdout
        assert "not ACKed: silent-1: WARMING" in result.stderr  # CDS never ACKed
    finally:
        hold.set()
        responses.cancel()
        channel.close()
