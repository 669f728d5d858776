"""Cluster warming with a real Envoy, over state of the world and delta.

Envoy holds its CDS ACK while a cluster it was sent is warming, and an EDS cluster finishes
warming only when its ClusterLoadAssignment arrives (see ENVOY_NOTES.md, "Warming, ACKs and
keepalive"). So a control plane must send endpoints without waiting for that ACK, re-send them
for every cluster a CDS response adds or changes, and be able to replace a CDS response that
will never be ACKed (a cluster that never warms) with a newer one.

Every EDS cluster here waits for its endpoints forever (`initial_fetch_timeout: 0s`), so a
deadlock shows as a bounded wait that fails rather than as Envoy's default 15 s delay.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from controlplane.resources import ENDPOINT
from tests.integration import edge_config
from tests.integration.harness import (
    ENVOY_BINARY,
    Envoy,
    HttpUpstream,
    XdsControlPlane,
    free_port,
    http_get,
    wait_for,
)

T = TypeVar("T")
PROTOCOLS = pytest.mark.parametrize("api_type", ["GRPC", "DELTA_GRPC"], ids=["sotw", "delta"])
BOUND = 10.0  # seconds, for what should take well under 2 s
TYPES = ("Cluster", "ClusterLoadAssignment", "Listener", "RouteConfiguration")
CANARY = {"canary": "true"}
STUCK = "stuck"  # the cluster that never warms
WARMING_TIMEOUT = 1  # serve --warming-timeout, where a test waits for it
StartEnvoy = Callable[..., Envoy]


class Edge:
    """The edge group's config on one listener port: EDS clusters named by their backends,
    each waiting for its endpoints forever."""

    def __init__(self, plane: XdsControlPlane, tmp_path: Path) -> None:
        self.plane = plane
        self.tmp_path = tmp_path
        self.port = free_port()
        self._published = 0

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def write(self, backends: dict[str, int], routes: list[dict[str, Any]], **config: Any) -> Path:
        self._published += 1
        return edge_config.write(
            self.tmp_path / f"config-{self._published}",
            listener_port=self.port,
            backends=backends,
            routes=routes,
            eds_initial_fetch_timeout="0s",
            **config,
        )

    def publish(
        self, backends: dict[str, int], routes: list[dict[str, Any]], **config: Any
    ) -> tuple[str, str]:
        """Publish to group edge; (version, xdsctl's stderr)."""
        directory = self.write(backends, routes, **config)
        result = self.plane.xdsctl("publish", str(directory), "--group", "edge")
        return result.stdout.strip(), result.stderr


def serving(url: str, expected: str) -> bool:
    status, body = http_get(url, timeout=2)
    return status == 200 and body.startswith(expected)


def synced_on(plane: XdsControlPlane, node_id: str, version: str | None = None) -> bool:
    """The node ACKed every type (of the version it should hold, or of `version`)."""
    node = next((n for n in plane.status() if n["node_id"] == node_id), None)
    if node is None or (version is not None and node["snapshot_version"] != version):
        return False
    states = {t["type_url"].rsplit(".", 1)[-1]: t["state"] for t in node.get("types", [])}
    return sorted(states) == sorted(TYPES) and set(states.values()) == {"SYNCED"}


def diagnose(plane: XdsControlPlane, *envoys: Envoy) -> str:
    """What xdscp and each Envoy hold, for a failure message."""
    lines = []
    for envoy in envoys:
        try:
            stats = envoy.stats()
            lines.append(
                f"envoy {envoy.node_id}: warming={sorted(envoy.clusters('dynamic_warming_clusters'))}"
                f" active={sorted(envoy.clusters())}"
                f" warming_clusters={stats.get('cluster_manager.warming_clusters')}"
                f" cds.update_success={stats.get('cluster_manager.cds.update_success')}"
                f" cds.update_rejected={stats.get('cluster_manager.cds.update_rejected')}"
            )
        except Exception as error:  # an Envoy that is down is itself the diagnosis
            lines.append(f"envoy {envoy.node_id}: admin unreachable: {error!r}")
    try:
        for node in plane.status():
            types = {t["type_url"].rsplit(".", 1)[-1]: t["state"] for t in node.get("types", [])}
            lines.append(f"xdscp: {node['node_id']} on {node['snapshot_version']}: {types}")
    except BaseException as error:  # pytest.fail from xdsctl is a BaseException
        lines.append(f"xdscp status unavailable: {error!r}")
    return "\n".join(lines)


def bounded(
    condition: Callable[[], T],
    what: str,
    plane: XdsControlPlane,
    *envoys: Envoy,
    timeout: float = BOUND,
) -> T:
    """wait_for, failing with what xdscp and the Envoys hold at the time."""
    return wait_for(condition, timeout=timeout, what=what, explain=lambda: diagnose(plane, *envoys))


def warming_clusters(envoy: Envoy) -> int:
    return int(envoy.stats()["cluster_manager.warming_clusters"])


def cluster_state(plane: XdsControlPlane, node_id: str) -> str | None:
    cluster = plane.node_types(node_id).get("Cluster")
    return cluster["state"] if cluster else None


@pytest.fixture
def edge(control_plane: XdsControlPlane, tmp_path: Path) -> Edge:
    return Edge(control_plane, tmp_path)


# --- EDS clusters added or changed -----------------------------------------------------------


@PROTOCOLS
def test_an_added_eds_cluster_gets_its_endpoints_before_cds_is_acked(
    api_type: str,
    edge: Edge,
    upstream: Callable[[str], HttpUpstream],
    start_envoy: StartEnvoy,
) -> None:
    plane = edge.plane
    a, b = upstream("a"), upstream("b")
    edge.publish({"a": a.port}, [edge_config.route_to("a")])
    envoy = start_envoy("edge-1", "edge", plane.xds_port, api_type=api_type)
    bounded(lambda: serving(edge.url("/x"), "backend=a"), "traffic to a", plane, envoy)
    bounded(lambda: synced_on(plane, "edge-1"), "edge-1 SYNCED on v1", plane, envoy)

    v2, _ = edge.publish({"a": a.port, "b": b.port}, [edge_config.route_to("b")])

    bounded(
        lambda: serving(edge.url("/x"), "backend=b path=/x"),
        "traffic through the route to the added EDS cluster b",
        plane,
        envoy,
    )
    bounded(lambda: synced_on(plane, "edge-1", v2), "edge-1 SYNCED on v2", plane, envoy)
    assert warming_clusters(envoy) == 0
    assert envoy.cluster_hosts("b") == {f"127.0.0.1:{b.port}"}
    assert envoy.stats()["cluster_manager.cds.update_rejected"] == "0"


@PROTOCOLS
def test_endpoints_go_out_once_for_the_names_envoy_asks_for_after_a_cluster_is_added(
    api_type: str,
    edge: Edge,
    upstream: Callable[[str], HttpUpstream],
    start_envoy: StartEnvoy,
) -> None:
    """Envoy asks for an added cluster's endpoints once it has applied the CDS response that
    adds it. xdscp holds EDS for that request (ordering.SUBSCRIPTION_GRACE_SECONDS, counted
    from when the CDS response was written), so a change to the endpoints Envoy already
    asks for and the added cluster's endpoints go out in one EDS response, not two."""
    plane = edge.plane
    a, moved, b = upstream("a"), upstream("a"), upstream("b")
    edge.publish({"a": a.port}, [edge_config.route_to("a")])
    envoy = start_envoy("edge-1", "edge", plane.xds_port, api_type=api_type)
    bounded(lambda: synced_on(plane, "edge-1"), "edge-1 SYNCED on v1", plane, envoy)
    eds_pushes = plane.metric("xdscp_pushes_total", type_url=ENDPOINT)

    v2, _ = edge.publish({"a": moved.port, "b": b.port}, [edge_config.route_to("b")])

    bounded(lambda: synced_on(plane, "edge-1", v2), "edge-1 SYNCED on v2", plane, envoy)
    assert envoy.cluster_hosts("a") == {f"127.0.0.1:{moved.port}"}
    assert envoy.cluster_hosts("b") == {f"127.0.0.1:{b.port}"}
    assert plane.metric("xdscp_pushes_total", type_url=ENDPOINT) - eds_pushes == 1


@PROTOCOLS
def test_a_changed_eds_cluster_is_sent_its_endpoints_again_and_keeps_them(
    api_type: str,
    edge: Edge,
    upstream: Callable[[str], HttpUpstream],
    start_envoy: StartEnvoy,
) -> None:
    plane = edge.plane
    a = upstream("a")
    edge.publish({"a": a.port}, [edge_config.route_to("a")])
    envoy = start_envoy("edge-1", "edge", plane.xds_port, api_type=api_type)
    bounded(lambda: serving(edge.url(), "backend=a"), "traffic to a", plane, envoy)
    bounded(lambda: synced_on(plane, "edge-1"), "edge-1 SYNCED on v1", plane, envoy)
    assert envoy.clusters()["a"]["connect_timeout"] == "1s"

    # Only cluster a's definition changes: Envoy re-creates it, and it warms again.
    v2, stderr = edge.publish(
        {"a": a.port}, [edge_config.route_to("a")], cluster_fields={"a": {"connect_timeout": "2s"}}
    )
    assert "~ cluster a" in stderr and "0 added, 0 removed, 1 changed" in stderr, stderr

    bounded(
        lambda: envoy.clusters().get("a", {}).get("connect_timeout") == "2s",
        "Envoy's active cluster a with connect_timeout 2s",
        plane,
        envoy,
    )
    bounded(lambda: synced_on(plane, "edge-1", v2), "edge-1 SYNCED on v2", plane, envoy)
    assert warming_clusters(envoy) == 0
    assert envoy.cluster_hosts("a") == {f"127.0.0.1:{a.port}"}
    assert serving(edge.url("/after"), "backend=a path=/after")


# --- a cluster that never warms ----------------------------------------------------------------


def run_v1(
    edge: Edge, a: HttpUpstream, start_envoy: StartEnvoy, node_id: str, **bootstrap: Any
) -> tuple[str, Envoy]:
    """v1 (cluster a, every route to it) published, an Envoy on it, v1 recorded as last_good."""
    plane = edge.plane
    v1, _ = edge.publish({"a": a.port}, [edge_config.route_to("a")])
    envoy = start_envoy(node_id, "edge", plane.xds_port, **bootstrap)
    bounded(lambda: serving(edge.url(), "backend=a"), "traffic to a", plane, envoy)
    bounded(lambda: synced_on(plane, node_id, v1), f"{node_id} SYNCED on v1", plane, envoy)
    bounded(
        lambda: pointers(plane).get("last_good") == v1, "v1 recorded as last_good", plane, envoy
    )
    return v1, envoy


def pointers(plane: XdsControlPlane) -> dict[str, str]:
    history = json.loads(plane.xdsctl("snapshots", "--json").stdout)
    return history.get("groups", {}).get("edge", {}).get("pointers", {})


def publish_stuck(edge: Edge, a: HttpUpstream) -> tuple[str, str]:
    """v1 plus the cluster that never warms (routes unchanged)."""
    return edge.publish(
        {"a": a.port},
        [edge_config.route_to("a")],
        extra_clusters=[edge_config.never_warming_cluster(STUCK, free_port())],
    )


def assert_stuck(plane: XdsControlPlane, envoy: Envoy) -> None:
    """Envoy accepted the cluster that never warms and keeps serving, its CDS unACKed."""
    bounded(
        lambda: STUCK in envoy.clusters("dynamic_warming_clusters"),
        f"Envoy warming cluster {STUCK}",
        plane,
        envoy,
    )
    assert warming_clusters(envoy) == 1
    assert envoy.stats()["cluster_manager.cds.update_rejected"] == "0"  # accepted, not NACKed
    bounded(
        lambda: cluster_state(plane, envoy.node_id) == "WARMING",
        f"xdsctl status: {envoy.node_id}'s Cluster type WARMING",
        plane,
        envoy,
    )
    cluster = plane.node_types(envoy.node_id)["Cluster"]
    assert cluster["acked_version"] != cluster["expected_version"], cluster  # CDS unACKed


def assert_released(
    edge: Edge, envoy: Envoy, v1: str, a: HttpUpstream, start_envoy: StartEnvoy, api_type: str
) -> None:
    """After v1 is back on stable: Envoy drops the cluster, takes later publishes, and a new
    Envoy starts."""
    plane = edge.plane
    bounded(
        lambda: (
            not envoy.clusters("dynamic_warming_clusters")
            and warming_clusters(envoy) == 0
            and STUCK not in envoy.cluster_names()
        ),
        f"Envoy drops the warming cluster {STUCK}",
        plane,
        envoy,
    )
    bounded(lambda: synced_on(plane, envoy.node_id, v1), "SYNCED on v1 again", plane, envoy)
    assert serving(edge.url(), "backend=a")

    v3, _ = edge.publish(
        {"a": a.port},
        [edge_config.direct_response("/changed", "changed\n"), edge_config.route_to("a")],
    )
    bounded(
        lambda: serving(edge.url("/changed"), "changed"),
        "a later route change reaches the Envoy",
        plane,
        envoy,
    )
    bounded(lambda: synced_on(plane, envoy.node_id, v3), "SYNCED on v3", plane, envoy)

    fresh = start_envoy("edge-fresh", "edge", plane.xds_port, api_type=api_type)  # waits LIVE
    assert fresh.admin("/ready") == (200, "LIVE\n")
    assert STUCK not in fresh.cluster_names()
    assert "/changed" in json.dumps(fresh.config_dump("dynamic_route_configs"))
    bounded(lambda: synced_on(plane, "edge-fresh", v3), "the new Envoy SYNCED", plane, fresh)


@PROTOCOLS
def test_a_cluster_that_never_warms_is_released_by_publishing_a_config_without_it(
    api_type: str,
    edge: Edge,
    upstream: Callable[[str], HttpUpstream],
    start_envoy: StartEnvoy,
) -> None:
    a = upstream("a")
    v1, envoy = run_v1(edge, a, start_envoy, "edge-1", api_type=api_type)
    publish_stuck(edge, a)
    assert_stuck(edge.plane, envoy)
    assert serving(edge.url(), "backend=a")

    again, _ = edge.publish({"a": a.port}, [edge_config.route_to("a")])  # v1's config again
    assert again == v1

    assert_released(edge, envoy, v1, a, start_envoy, api_type)


@PROTOCOLS
def test_a_cluster_that_never_warms_is_released_by_rollback(
    api_type: str,
    edge: Edge,
    upstream: Callable[[str], HttpUpstream],
    start_envoy: StartEnvoy,
) -> None:
    a = upstream("a")
    v1, envoy = run_v1(edge, a, start_envoy, "edge-1", api_type=api_type)
    publish_stuck(edge, a)
    assert_stuck(edge.plane, envoy)

    result = edge.plane.xdsctl(
        "rollback", "--group", "edge", "--reason", "never warms", "--timeout", "10", check=False
    )
    assert result.returncode == 0, (
        f"rollback exited {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}\n"
        + diagnose(edge.plane, envoy)
    )
    assert re.fullmatch(rf"1/1 nodes ACKed {v1} in \d+\.\d\ds\n", result.stdout), result.stdout

    assert_released(edge, envoy, v1, a, start_envoy, api_type)


@PROTOCOLS
def test_routes_held_behind_a_cluster_that_never_warms_go_out_when_the_warming_timeout_ends(
    api_type: str,
    tmp_path: Path,
    upstream: Callable[[str], HttpUpstream],
    start_envoy: StartEnvoy,
) -> None:
    """Routes wait for the CDS ACK (make before break), which Envoy holds while a cluster
    warms; once the warming timeout passes they are sent anyway, on the shell's tick
    (server.Deadlines), and a running Envoy applies them with its CDS still unACKed."""
    plane = XdsControlPlane(tmp_path / "plane", "--warming-timeout", str(WARMING_TIMEOUT))
    (tmp_path / "plane").mkdir()
    plane.start()
    try:
        edge = Edge(plane, tmp_path)
        a = upstream("a")
        _, envoy = run_v1(edge, a, start_envoy, "edge-1", api_type=api_type)
        edge.publish(
            {"a": a.port},
            [edge_config.direct_response("/held", "held\n"), edge_config.route_to("a")],
            extra_clusters=[edge_config.never_warming_cluster(STUCK, free_port())],
        )
        bounded(
            lambda: serving(edge.url("/held"), "held"),
            "the route change reaches the Envoy after the warming timeout",
            plane,
            envoy,
        )
        assert STUCK in envoy.clusters("dynamic_warming_clusters")  # CDS still unACKed
        cluster = plane.node_types(envoy.node_id)["Cluster"]
        assert cluster["state"] == "WARMING", cluster
        assert cluster["acked_version"] != cluster["expected_version"], cluster
        assert serving(edge.url(), "backend=a")
    finally:
        plane.stop()


@PROTOCOLS
def test_an_envoy_reconnecting_with_a_cluster_still_warming_is_tracked_and_released(
    api_type: str,
    edge: Edge,
    upstream: Callable[[str], HttpUpstream],
    start_envoy: StartEnvoy,
) -> None:
    """Envoy keeps CDS paused across a reconnect while a cluster warms: on the new stream it
    asks for endpoints, listeners and routes, never for clusters. xdscp takes the CDS
    subscription as given, so the node shows WARMING (never SYNCED) and a rollback reaches
    it."""
    a = upstream("a")
    v1, envoy = run_v1(edge, a, start_envoy, "edge-1", api_type=api_type)
    publish_stuck(edge, a)
    assert_stuck(edge.plane, envoy)

    assert edge.plane.stop() == 0
    edge.plane.start()
    bounded(
        lambda: envoy.stats()["control_plane.connected_state"] == "1",
        "Envoy reconnects",
        edge.plane,
        envoy,
    )
    bounded(
        lambda: cluster_state(edge.plane, envoy.node_id) == "WARMING",
        "the reconnected node's clusters shown WARMING",
        edge.plane,
        envoy,
    )
    assert not synced_on(edge.plane, envoy.node_id)
    assert STUCK in envoy.clusters("dynamic_warming_clusters")

    result = edge.plane.xdsctl("rollback", "--group", "edge", "--timeout", "10", check=False)
    assert result.returncode == 0, f"{result.stdout}{result.stderr}" + diagnose(edge.plane, envoy)
    assert_released(edge, envoy, v1, a, start_envoy, api_type)


@PROTOCOLS
def test_a_fresh_envoy_asking_for_bootstrap_endpoints_first_still_gets_its_clusters(
    api_type: str,
    edge: Edge,
    upstream: Callable[[str], HttpUpstream],
    start_envoy: StartEnvoy,
) -> None:
    """A fresh Envoy initializes an EDS cluster of its bootstrap (fed over ADS) before CDS,
    so its first request is for endpoints, like an Envoy that reconnects with CDS paused.
    It reports holding nothing, so xdscp leaves its clusters for it to ask for (the first
    push is its endpoints, not unrequested clusters), and with CDS initial_fetch_timeout 0s
    it becomes ready, routes traffic and holds the bootstrap cluster's endpoints."""
    a, boot = upstream("a"), upstream("boot")
    directory = edge.write({"a": a.port}, [edge_config.route_to("a")])
    boot_endpoints = {
        "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
        **edge_config.load_assignment("boot", boot.port),
    }
    (directory / "boot.yaml").write_text(yaml.safe_dump({"resources": [boot_endpoints]}))
    v1 = edge.plane.xdsctl("publish", str(directory), "--group", "edge").stdout.strip()
    boot_cluster = {
        "name": "boot",
        "type": "EDS",
        "connect_timeout": "1s",
        "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}},
    }
    envoy = start_envoy(  # returns once /ready says LIVE
        "edge-1",
        "edge",
        edge.plane.xds_port,
        api_type=api_type,
        cds_initial_fetch_timeout="0s",
        static_clusters=[boot_cluster],
    )
    bounded(lambda: serving(edge.url(), "backend=a"), "traffic to a", edge.plane, envoy)
    assert envoy.cluster_hosts("boot") == {f"127.0.0.1:{boot.port}"}
    bounded(lambda: synced_on(edge.plane, "edge-1", v1), "SYNCED on v1", edge.plane, envoy)
    pushes = [e["type_url"] for e in edge.plane.log_events() if e["event"] == "push"]
    assert pushes[0].endswith("ClusterLoadAssignment"), pushes  # it asked for endpoints first


@PROTOCOLS
def test_when_envoy_drops_its_last_eds_cluster_the_empty_subscription_counts_as_held(
    api_type: str,
    edge: Edge,
    upstream: Callable[[str], HttpUpstream],
    start_envoy: StartEnvoy,
) -> None:
    """Envoy asks for no endpoints once its last EDS cluster is gone, and does not ACK an
    empty answer to that: xdscp sends none, and the node is SYNCED on the new version."""
    a, s = upstream("a"), upstream("s")
    _, envoy = run_v1(edge, a, start_envoy, "edge-1", api_type=api_type)
    static = edge_config.static_cluster("s", port=s.port)
    v2, _ = edge.publish({}, [edge_config.route_to("s")], extra_clusters=[static])
    bounded(lambda: serving(edge.url(), "backend=s"), "traffic to the static cluster", edge.plane)
    bounded(lambda: synced_on(edge.plane, "edge-1", v2), "SYNCED on v2", edge.plane, envoy)


# --- a canary that takes a cluster that never warms ---------------------------------------------


def rollout_policy(path: Path) -> Path:
    """Canaries by metadata; the fresh probe gives up quickly, long before a canary's ACK
    timeout, so the probe is what aborts the rollout."""
    policy = {
        "groups": {
            "edge": {
                "canary": {"metadata": CANARY},
                "min_existing": 1,
                "min_fresh": 1,
                "bake_seconds": 1,
                "ack_timeout_seconds": 60,
                "deadline_seconds": 90,
                "fresh_probe": {
                    "envoy_binary": str(ENVOY_BINARY),
                    "ready_timeout_seconds": 5,
                    "isolate_network": True,
                },
            }
        }
    }
    path.write_text(yaml.safe_dump(policy))
    return path


def rollout(plane: XdsControlPlane) -> dict[str, Any]:
    listed = json.loads(plane.xdsctl("rollout", "status", "--json").stdout)
    return next((r for r in listed.get("rollouts", []) if r["group"] == "edge"), {})


@PROTOCOLS
def test_a_canary_that_took_a_never_warming_cluster_returns_to_stable_when_the_rollout_aborts(
    api_type: str,
    edge: Edge,
    upstream: Callable[[str], HttpUpstream],
    start_envoy: StartEnvoy,
    tmp_path: Path,
) -> None:
    plane = edge.plane
    a = upstream("a")
    # v1 goes out before the gate is switched on, as in test_canary_rollout.
    v1, canary = run_v1(edge, a, start_envoy, "edge-canary-1", api_type=api_type, metadata=CANARY)
    plane.stop()
    plane.extra_args = (
        "--rollout-policy", str(rollout_policy(tmp_path / "rollout-policy.yaml")),
        "--xds-socket", str(tmp_path / "xds.sock"),
    )  # fmt: skip
    plane.start()
    bounded(lambda: synced_on(plane, "edge-canary-1", v1), "canary back on v1", plane, canary)

    bad, stderr = publish_stuck(edge, a)
    assert "staged" in stderr, stderr

    bounded(
        lambda: STUCK in canary.clusters("dynamic_warming_clusters"),
        f"the canary was sent the candidate (warming {STUCK})",
        plane,
        canary,
    )
    aborted = bounded(
        lambda: (r := rollout(plane)).get("phase") == "aborted" and r,
        "the rollout aborted",
        plane,
        canary,
        timeout=45,  # the probe's 5 s ready timeout plus starting and tearing it down
    )
    assert aborted["candidate"] == bad
    assert aborted["probe_state"] == "failed", aborted
    assert aborted["reason"].startswith("fresh probe failed: "), aborted["reason"]
    assert "not LIVE" in aborted["reason"], aborted["reason"]

    bounded(
        lambda: (
            STUCK not in canary.clusters("dynamic_warming_clusters")
            and STUCK not in canary.clusters()
            and warming_clusters(canary) == 0
        ),
        f"the canary drops {STUCK}",
        plane,
        canary,
    )
    bounded(
        lambda: synced_on(plane, "edge-canary-1", v1),
        "xdsctl status: the canary SYNCED on stable v1",
        plane,
        canary,
    )
    assert pointers(plane).get("stable") == v1
    assert serving(edge.url(), "backend=a")
