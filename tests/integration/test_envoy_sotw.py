"""A real Envoy (official binary) on a state-of-the-world ADS stream from xdscp."""

from __future__ import annotations

import json
from pathlib import Path

from tests.integration import edge_config
from tests.integration.harness import Envoy, XdsControlPlane, free_port, http_get, wait_for

TYPES = ("Cluster", "ClusterLoadAssignment", "Listener", "RouteConfiguration")


def all_synced(plane: XdsControlPlane, node_id: str) -> bool:
    types = plane.node_types(node_id)
    return sorted(types) == sorted(TYPES) and all(t["state"] == "SYNCED" for t in types.values())


def serving(url: str, expected: str) -> bool:
    status, body = http_get(url, timeout=2)
    return status == 200 and body.startswith(expected)


def publish_edge(plane: XdsControlPlane, directory: Path, listener_port: int, **kw) -> str:  # type: ignore[no-untyped-def]
    edge_config.write(directory, listener_port=listener_port, **kw)
    return plane.xdsctl("publish", str(directory), "--group", "edge").stdout.strip()


def start_edge(control_plane, upstream, start_envoy, tmp_path):  # type: ignore[no-untyped-def]
    a, b = upstream("a"), upstream("b")
    port = free_port()
    backends = {"a": a.port, "b": b.port}
    publish_edge(
        control_plane, tmp_path / "v1", port, backends=backends, routes=[edge_config.route_to("a")]
    )
    envoy = start_envoy("edge-1", "edge", control_plane.xds_port)
    url = f"http://127.0.0.1:{port}/hello"
    wait_for(lambda: serving(url, "backend=a path=/hello"), what="traffic through Envoy to a")
    wait_for(lambda: all_synced(control_plane, "edge-1"), what="edge-1 SYNCED on every type")
    return envoy, port, backends, url


def test_traffic_flows_and_a_route_change_applies_without_restart(
    control_plane, upstream, start_envoy, tmp_path
) -> None:
    envoy, port, backends, url = start_edge(control_plane, upstream, start_envoy, tmp_path)
    pid, uptime_before = envoy.process.pid, int(envoy.stats()["server.uptime"])

    publish_edge(
        control_plane, tmp_path / "v2", port, backends=backends, routes=[edge_config.route_to("b")]
    )
    wait_for(lambda: serving(url, "backend=b path=/hello"), timeout=10, what="route change")

    assert envoy.process.pid == pid and envoy.process.poll() is None
    assert int(envoy.stats()["server.uptime"]) >= uptime_before  # same Envoy, not restarted
    wait_for(lambda: all_synced(control_plane, "edge-1"), what="SYNCED after the change")
    # Only the routes changed: clusters were not pushed a second time.
    pushes = [e for e in control_plane.log_events() if e["event"] == "push"]
    cluster_pushes = [e for e in pushes if e["type_url"].endswith("Cluster")]
    route_pushes = [e for e in pushes if e["type_url"].endswith("RouteConfiguration")]
    assert len(cluster_pushes) == 1
    assert len(route_pushes) == 2


def test_a_config_envoy_rejects_is_nacked_and_envoy_keeps_the_old_one(
    control_plane, upstream, start_envoy, tmp_path
) -> None:
    envoy, port, backends, url = start_edge(control_plane, upstream, start_envoy, tmp_path)
    bad_route = edge_config.nacked_regex_route("b")
    publish_edge(
        control_plane,
        tmp_path / "bad",
        port,
        backends=backends,
        routes=[bad_route, edge_config.route_to("a")],
    )

    def route_nacked() -> dict | None:  # type: ignore[type-arg]
        route = control_plane.node_types("edge-1").get("RouteConfiguration")
        return route if route and route["state"] == "NACKED" else None

    route = wait_for(route_nacked, what="RDS NACK in xdsctl status")
    assert "missing )" in route["nack_error"]
    assert route["acked_version"] != route["nacked_version"]
    table = control_plane.xdsctl("status").stdout
    assert "NACKED" in table and "missing )" in table

    assert serving(url, "backend=a path=/hello")  # still the previous routes
    assert int(envoy.stats()["http.edge.rds.edge_routes.update_rejected"]) >= 1
    nacks = [e for e in control_plane.log_events() if e["event"] == "nack"]
    assert len(nacks) >= 1 and "missing )" in nacks[0]["error"]
    # Not resent in a loop: the rejected route version went out exactly once.
    route_pushes = [
        e
        for e in control_plane.log_events()
        if e["event"] == "push" and e["version"] == route["nacked_version"]
    ]
    assert len(route_pushes) == 1


def test_after_an_xdscp_restart_envoy_holds_the_same_version(
    control_plane, upstream, start_envoy, tmp_path
) -> None:
    envoy, _, _, url = start_edge(control_plane, upstream, start_envoy, tmp_path)
    held = {k: v for k, v in envoy.stats().items() if k.endswith(".version_text")}
    history_before = json.loads(control_plane.xdsctl("snapshots", "--json").stdout)

    assert control_plane.stop() == 0
    wait_for(
        lambda: envoy.stats()["control_plane.connected_state"] == "0", what="Envoy sees xdscp go"
    )
    control_plane.start()
    wait_for(lambda: envoy.stats()["control_plane.connected_state"] == "1", what="Envoy reconnects")
    wait_for(lambda: all_synced(control_plane, "edge-1"), what="SYNCED after restart")

    assert {k: v for k, v in envoy.stats().items() if k.endswith(".version_text")} == held
    assert json.loads(control_plane.xdsctl("snapshots", "--json").stdout) == history_before
    events = control_plane.log_events()
    # Wildcard types (clusters, listeners) are not re-sent: the version names all of them.
    # Named ones (endpoints, routes) are: a version does not say which names a client holds.
    pushed = {e["type_url"].rsplit(".", 1)[1] for e in events if e["event"] == "push"}
    assert pushed <= {"ClusterLoadAssignment", "RouteConfiguration"}
    assert any(e["event"] == "stream opened" and e.get("node_id") == "edge-1" for e in events)
    assert serving(url, "backend=a path=/hello")


def test_envoy_without_a_group_snapshot_gets_default(
    control_plane, upstream, start_envoy, tmp_path
) -> None:
    a = upstream("a")
    port = free_port()
    edge_config.write(
        tmp_path / "d",
        listener_port=port,
        backends={"a": a.port},
        routes=[edge_config.route_to("a")],
    )
    control_plane.xdsctl("publish", str(tmp_path / "d"))  # group default
    envoy: Envoy = start_envoy("lonely-1", "no-such-group", control_plane.xds_port)
    wait_for(lambda: serving(f"http://127.0.0.1:{port}/", "backend=a"), what="default config")
    node = next(n for n in control_plane.status() if n["node_id"] == "lonely-1")
    assert node["group"] == "no-such-group"
    assert envoy.stats()["control_plane.connected_state"] == "1"
