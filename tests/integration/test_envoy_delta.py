"""A real Envoy on a delta ADS stream (api_type DELTA_GRPC): the same scenarios as state of
the world, plus what delta adds (nothing resent after a restart, removals)."""

from __future__ import annotations

import json

from tests.integration import edge_config
from tests.integration.harness import free_port, http_get, wait_for

TYPES = ("Cluster", "ClusterLoadAssignment", "Listener", "RouteConfiguration")


def serving(url: str, expected: str) -> bool:
    status, body = http_get(url, timeout=2)
    return status == 200 and body.startswith(expected)


def synced(plane, node_id: str) -> bool:  # type: ignore[no-untyped-def]
    types = plane.node_types(node_id)
    return sorted(types) == sorted(TYPES) and all(t["state"] == "SYNCED" for t in types.values())


def start(control_plane, upstream, start_envoy, tmp_path):  # type: ignore[no-untyped-def]
    a, b = upstream("a"), upstream("b")
    port = free_port()
    backends = {"a": a.port, "b": b.port}
    edge_config.write(
        tmp_path / "v1", listener_port=port, backends=backends, routes=[edge_config.route_to("a")]
    )
    control_plane.xdsctl("publish", str(tmp_path / "v1"), "--group", "edge")
    envoy = start_envoy("edge-delta-1", "edge", control_plane.xds_port, api_type="DELTA_GRPC")
    url = f"http://127.0.0.1:{port}/x"
    wait_for(lambda: serving(url, "backend=a"), what="traffic through a delta Envoy")
    wait_for(lambda: synced(control_plane, "edge-delta-1"), what="SYNCED on every type")
    return envoy, port, backends, url


def test_delta_traffic_flows_and_a_route_change_applies(
    control_plane, upstream, start_envoy, tmp_path
) -> None:
    _envoy, port, backends, url = start(control_plane, upstream, start_envoy, tmp_path)
    node = next(n for n in control_plane.status() if n["node_id"] == "edge-delta-1")
    assert node["protocol"] == "delta"
    assert "delta" in control_plane.xdsctl("status").stdout
    edge_config.write(
        tmp_path / "v2", listener_port=port, backends=backends, routes=[edge_config.route_to("b")]
    )
    control_plane.xdsctl("publish", str(tmp_path / "v2"), "--group", "edge")
    wait_for(lambda: serving(url, "backend=b"), timeout=10, what="route change over delta")
    pushes = [e for e in control_plane.log_events() if e["event"] == "push"]
    assert [e["type_url"].rsplit(".", 1)[1] for e in pushes].count("Cluster") == 1


def test_delta_nack_is_recorded_and_envoy_keeps_serving(
    control_plane, upstream, start_envoy, tmp_path
) -> None:
    _envoy, port, backends, url = start(control_plane, upstream, start_envoy, tmp_path)
    bad = edge_config.nacked_regex_route("b")
    edge_config.write(tmp_path / "bad", listener_port=port, backends=backends, routes=[bad])
    control_plane.xdsctl("publish", str(tmp_path / "bad"), "--group", "edge")
    route = wait_for(
        lambda: (
            (r := control_plane.node_types("edge-delta-1").get("RouteConfiguration"))
            and r["state"] == "NACKED"
            and r
        ),
        what="delta RDS NACK",
    )
    assert "missing )" in route["nack_error"]
    assert serving(url, "backend=a")


def test_after_a_restart_a_delta_envoy_is_sent_nothing_for_unchanged_resources(
    control_plane, upstream, start_envoy, tmp_path
) -> None:
    envoy, _port, _backends, url = start(control_plane, upstream, start_envoy, tmp_path)
    assert control_plane.stop() == 0
    control_plane.start()
    wait_for(lambda: envoy.stats()["control_plane.connected_state"] == "1", what="reconnect")
    wait_for(lambda: synced(control_plane, "edge-delta-1"), what="SYNCED after restart")
    _, body = http_get(f"http://127.0.0.1:{control_plane.http_port}/metrics")
    pushes = [line for line in body.splitlines() if line.startswith("xdscp_pushes_total")]
    acks = [line for line in body.splitlines() if line.startswith("xdscp_acks_total")]
    # Our own counters: the restarted server sent not a single response (and got no ACK).
    assert pushes and all(line.endswith(" 0.0") for line in pushes + acks), pushes + acks
    assert [e for e in control_plane.log_events() if e["event"] == "push"] == []
    assert serving(url, "backend=a")


def test_a_removed_cluster_disappears_from_envoy(
    control_plane, upstream, start_envoy, tmp_path
) -> None:
    envoy, port, backends, _url = start(control_plane, upstream, start_envoy, tmp_path)
    assert {"a", "b"} <= envoy.cluster_names()
    edge_config.write(
        tmp_path / "v2",
        listener_port=port,
        backends={"a": backends["a"]},
        routes=[edge_config.route_to("a")],
    )
    control_plane.xdsctl("publish", str(tmp_path / "v2"), "--group", "edge")
    wait_for(lambda: "b" not in envoy.cluster_names(), timeout=10, what="cluster b removed")
    assert "a" in envoy.cluster_names()
    removals = [e for e in control_plane.log_events() if e["event"] == "push" and e.get("removed")]
    assert any("b" in e["removed"] for e in removals)
    assert (
        json.loads(control_plane.xdsctl("status", "--json").stdout)["nodes"][0]["protocol"]
        == "delta"
    )
