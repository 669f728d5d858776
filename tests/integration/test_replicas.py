"""Several xdscp replicas on one PostgreSQL (issue 14), with real Envoys spread across them:
one fleet whichever replica an Envoy or an operator talks to, one rollout leader, and no
single point of failure (a replica killed, the leader killed mid-bake, the database
restarted).

Envoys of one group bind the same listener port (SO_REUSEPORT), so what each Envoy holds is
read from its own admin /config_dump, not through traffic.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE
from tests.integration import edge_config
from tests.integration.gated_group import CANARY
from tests.integration.harness import Envoy, XdsControlPlane, free_port, wait_for
from tests.integration.postgres import PostgresServer
from tests.integration.replicas import (
    LEADER_EVENT,
    TAKEOVER_TIMEOUT_SECONDS,
    Replicas,
    database_down,
    readyz,
)

GROUP = "edge"
ROUTES_UPDATES = "http.edge.rds.edge_routes.update_attempt"


@pytest.fixture
def start_replicas(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Replicas]]:
    """start(count, *serve_args, database_url=...): replicas r1..rN on one database (by
    default a fresh one on the session's PostgreSQL), stopped at the end of the test."""
    started: list[Replicas] = []

    def start(count: int, *serve_args: str, database_url: str | None = None) -> Replicas:
        url = database_url or request.getfixturevalue("database_url")
        started.append(Replicas(tmp_path / "replicas", url, count, *serve_args))
        return started[-1].start()

    yield start
    for replicas in started:
        replicas.stop()


class Edge:
    """The edge group's config: one listener, routes to backend `a` or `b` (ports that only
    name endpoints: no traffic is sent)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.port = free_port()
        self.backends = {"a": free_port(), "b": free_port()}

    def write(self, name: str, *routes: dict[str, Any]) -> Path:
        return edge_config.write(
            self.tmp_path / name,
            listener_port=self.port,
            backends=self.backends,
            routes=list(routes),
            eds_initial_fetch_timeout="0s",
        )

    def publish(
        self, via: XdsControlPlane, name: str, *routes: dict[str, Any], expect: str = "published"
    ) -> str:
        directory = self.write(name, *routes)
        result = via.xdsctl("publish", str(directory), "--group", GROUP, "-m", name)
        assert expect in result.stderr, result.stderr
        return result.stdout.strip()


@pytest.fixture
def edge(tmp_path: Path) -> Edge:
    return Edge(tmp_path)


def envoy_on(
    start_envoy: Callable[..., Envoy], node_id: str, *planes: XdsControlPlane, **bootstrap: Any
) -> Envoy:
    """An Envoy of the edge group whose xds cluster is these replicas."""
    ports = [plane.xds_port for plane in planes]
    return start_envoy(node_id, GROUP, ports, cds_initial_fetch_timeout="0s", **bootstrap)


def wait_routed(envoys: list[Envoy], backend: str, timeout: float = 20) -> None:
    for envoy in envoys:
        wait_for(
            lambda e=envoy: e.route_targets() == {backend},
            timeout=timeout,
            what=f"{envoy.node_id} routing to {backend}",
        )


def policy_args(tmp_path: Path, **timing: float) -> tuple[str, ...]:
    """--rollout-policy for the edge group: canaries by metadata, one existing canary's ACK
    proves a candidate (no fresh probe), then `timing` (bake_seconds...)."""
    policy = {"canary": {"metadata": CANARY}, "min_existing": 1, "min_fresh": 0, **timing}
    path = tmp_path / "rollout-policy.yaml"
    path.write_text(yaml.safe_dump({"groups": {GROUP: policy}}))
    return ("--rollout-policy", str(path))


def routes_updated_at(envoy: Envoy) -> float:
    """When Envoy last applied its edge_routes (unix seconds, its own clock)."""
    (config,) = envoy.config_dump("dynamic_route_configs")
    return datetime.fromisoformat(config["last_updated"]).timestamp()


def pushes_by_type(plane: XdsControlPlane) -> dict[str, float]:
    """The replica's xdscp_pushes_total for the edge group, by xDS type."""
    return {
        url.rsplit(".", 1)[1]: plane.metric("xdscp_pushes_total", type_url=url, group=GROUP)
        for url in (CLUSTER, ENDPOINT, LISTENER, ROUTE)
    }


def test_a_publish_through_one_replica_reaches_every_envoy_on_every_replica(
    start_replicas, start_envoy, edge
) -> None:
    replicas = start_replicas(3)
    r1 = replicas["r1"]
    v1 = edge.publish(r1, "v1", edge_config.route_to("a"))
    envoys = [
        envoy_on(start_envoy, f"edge-{name}", plane) for name, plane in replicas.planes.items()
    ]
    wait_routed(envoys, "a")

    v2 = edge.publish(r1, "v2", edge_config.route_to("b"))
    assert v2 != v1
    wait_routed(envoys, "b", timeout=10)
    # The followers learned of the move through its notification, not the periodic re-read.
    for follower in (replicas["r2"], replicas["r3"]):
        followed = [
            e
            for e in follower.log_events()
            if e.get("event") == "followed the leader" and e.get("stable") == v2
        ]
        assert [(e["group"], e["notified"]) for e in followed] == [(GROUP, True)], followed
    # Through any replica: the whole fleet, each node on the replica its bootstrap names.
    for via in replicas.planes.values():
        wait_for(
            lambda via=via: all(
                replicas.synced_on(via, f"edge-{name}", v2, name) for name in replicas.planes
            ),
            what=f"every Envoy SYNCED on v2 through {replicas.name_of(via)}",
            explain=replicas.explain,
        )


@pytest.mark.parametrize(
    ("api_type", "resent"),
    [
        ("DELTA_GRPC", set()),
        # State of the world names no resources in a version: the named types (endpoints,
        # routes) are sent again on any new stream, as after a restart of one server
        # (test_envoy_sotw.test_after_an_xdscp_restart_envoy_holds_the_same_version).
        ("GRPC", {"ClusterLoadAssignment", "RouteConfiguration"}),
    ],
    ids=["delta", "sotw"],
)
def test_an_envoy_whose_replica_is_killed_reconnects_to_another_and_is_sent_nothing_it_holds(
    start_replicas, start_envoy, edge, api_type, resent
) -> None:
    replicas = start_replicas(3)
    r1, r2, r3 = (replicas[name] for name in ("r1", "r2", "r3"))
    v1 = edge.publish(r1, "v1", edge_config.route_to("a"))
    envoy = envoy_on(start_envoy, "edge-moving", r2, r3, api_type=api_type)
    wait_routed([envoy], "a")
    first = wait_for(
        lambda: next(
            (name for name in ("r2", "r3") if replicas.synced_on(r1, "edge-moving", v1, name)),
            None,
        ),
        what="edge-moving SYNCED on r2 or r3",
        explain=replicas.explain,
    )
    second = "r3" if first == "r2" else "r2"
    held = envoy.held_versions()
    pushed_before = pushes_by_type(replicas[second])

    replicas.kill(replicas[first])
    wait_for(
        lambda: replicas.synced_on(replicas[second], "edge-moving", v1, second),
        what=f"edge-moving SYNCED on {second} after {first} was killed",
        explain=replicas.explain,
    )
    assert envoy.stats()["control_plane.connected_state"] == "1"
    time.sleep(1)  # a push the new stream still had to make would be counted by now

    pushed_after = pushes_by_type(replicas[second])
    grew = {kind for kind, count in pushed_after.items() if count != pushed_before[kind]}
    assert grew <= resent, (pushed_before, pushed_after)
    assert envoy.held_versions() == held
    assert envoy.route_targets() == {"a"}


def test_a_rollback_through_any_replica_reaches_every_envoy_and_reports_the_whole_fleet(
    start_replicas, start_envoy, edge
) -> None:
    replicas = start_replicas(3)
    r1, r3 = replicas["r1"], replicas["r3"]
    v1 = edge.publish(r1, "v1", edge_config.route_to("a"))
    envoys = [
        envoy_on(start_envoy, f"edge-{name}", plane) for name, plane in replicas.planes.items()
    ]
    wait_routed(envoys, "a")
    edge.publish(r1, "v2", edge_config.route_to("b"))
    wait_routed(envoys, "b")

    result = r3.xdsctl(
        "rollback", "--group", GROUP, "--to", v1, "--reason", "test", "--timeout", "30"
    )
    assert re.fullmatch(rf"3/3 nodes ACKed {v1} in \d+\.\d\ds\n", result.stdout), result.stdout
    for envoy in envoys:
        assert envoy.route_targets() == {"a"}, envoy.node_id
    history = json.loads(replicas["r2"].xdsctl("snapshots", "--json").stdout)
    assert history["groups"][GROUP]["pointers"]["stable"] == v1


def test_a_postgresql_restart_keeps_replicas_serving_and_publishes_resume_with_nothing_lost(
    start_replicas, start_envoy, edge, own_postgres: PostgresServer
) -> None:
    replicas = start_replicas(2, database_url=own_postgres.create_database())
    r1, r2 = replicas["r1"], replicas["r2"]
    edge.publish(r1, "v1", edge_config.route_to("a"))
    envoys = [
        envoy_on(start_envoy, f"edge-{name}", plane) for name, plane in replicas.planes.items()
    ]
    wait_routed(envoys, "a")
    history_before = json.loads(r2.xdsctl("snapshots", "--json").stdout)

    with database_down(own_postgres):
        for plane in (r1, r2):
            wait_for(
                lambda p=plane: plane_says_database_down(p),
                what=f"{replicas.name_of(plane)}: /readyz 200 'database unreachable', metric 0",
                explain=replicas.explain,
            )
        late = envoy_on(start_envoy, "edge-late", r2)
        wait_routed([late], "a")
        down = edge.write("down", edge_config.route_to("b"))
        failed = r1.xdsctl("publish", str(down), "--group", GROUP, "-m", "down", check=False)
        assert failed.returncode != 0 and "database" in failed.stderr, failed.stderr
        assert own_postgres.password not in failed.stderr

    for plane in (r1, r2):
        wait_for(
            lambda p=plane: (
                p.metric("xdscp_database_up") == 1 and "database unreachable" not in readyz(p)[1]
            ),
            what=f"{replicas.name_of(plane)} sees the database back",
            explain=replicas.explain,
        )
    v2 = edge.publish(r2, "v2", edge_config.route_to("b"))
    wait_routed([*envoys, late], "b")
    history = json.loads(r1.xdsctl("snapshots", "--json").stdout)
    assert [e for e in history_before["entries"] if e not in history["entries"]] == []
    assert history["groups"][GROUP]["pointers"]["stable"] == v2


def plane_says_database_down(plane: XdsControlPlane) -> bool:
    status, body = readyz(plane)
    return (
        status == 200 and "database unreachable" in body and plane.metric("xdscp_database_up") == 0
    )


def test_the_leader_promotes_what_a_canary_on_another_replica_acks_and_aborts_what_it_nacks(
    start_replicas, start_envoy, edge, tmp_path
) -> None:
    replicas = start_replicas(
        3, *policy_args(tmp_path, bake_seconds=1, ack_timeout_seconds=15, deadline_seconds=60)
    )
    r1, r2, r3 = (replicas[name] for name in ("r1", "r2", "r3"))
    edge.publish(r1, "v1", edge_config.route_to("a"))
    canary = envoy_on(start_envoy, "edge-canary", r2, metadata=CANARY)
    web = envoy_on(start_envoy, "edge-web", r3)
    wait_routed([canary, web], "a")
    web_routes_updates = web.stats()[ROUTES_UPDATES]

    bad = edge_config.nacked_regex_route("b")
    edge.publish(r1, "bad", bad, edge_config.route_to("b"), expect="staged")
    aborted = wait_for(
        lambda: (r := r3.rollout(GROUP)).get("phase") == "aborted" and r,
        timeout=30,
        what="the NACKed candidate aborted",
        explain=replicas.explain,
    )
    assert aborted["reason"].startswith("canary edge-canary NACKed the candidate: "), aborted
    assert "missing )" in aborted["reason"]
    wait_routed([canary], "a")  # the canary is back on stable
    assert web.route_targets() == {"a"}
    assert web.stats()[ROUTES_UPDATES] == web_routes_updates  # never sent the candidate

    v2 = edge.publish(r1, "v2", edge_config.route_to("b"), expect="staged")
    promoted = wait_for(
        lambda: (r := r2.rollout(GROUP)).get("phase") == "promoted" and r,
        timeout=30,
        what="the ACKed candidate promoted",
        explain=replicas.explain,
    )
    assert promoted["candidate"] == v2
    assert promoted["existing_acked"] == ["edge-canary"]
    wait_routed([canary, web], "b")
    assert replicas.leader_now() is r1


def test_killing_the_leader_mid_bake_hands_the_rollout_to_another_replica_that_ends_it(
    start_replicas, start_envoy, edge, tmp_path
) -> None:
    bake_seconds = 8.0
    replicas = start_replicas(
        3,
        *policy_args(
            tmp_path, bake_seconds=bake_seconds, ack_timeout_seconds=15, deadline_seconds=60
        ),
    )
    r1, r2, r3 = (replicas[name] for name in ("r1", "r2", "r3"))
    edge.publish(r1, "v1", edge_config.route_to("a"))
    canary = envoy_on(start_envoy, "edge-canary", r2, metadata=CANARY)
    web = envoy_on(start_envoy, "edge-web", r3)
    wait_routed([canary, web], "a")
    web_routes_updates = int(web.stats()[ROUTES_UPDATES])

    v2 = edge.publish(r2, "v2", edge_config.route_to("b"), expect="staged")
    baking = wait_for(
        lambda: (r := r2.rollout(GROUP)).get("bake_seconds_left", 0) > 0 and r,
        timeout=20,
        what="the canary's ACK recorded and the bake started",
        explain=replicas.explain,
    )
    assert baking["phase"] == "canary" and baking["existing_acked"] == ["edge-canary"]
    assert canary.route_targets() == {"b"}
    assert web.route_targets() == {"a"}
    assert replicas.leader_now() is r1

    replicas.kill(r1)
    leader = replicas.wait_leader(other_than=r1, timeout=TAKEOVER_TIMEOUT_SECONDS)
    name = replicas.name_of(leader)
    assert any(
        e.get("event") == LEADER_EVENT and e.get("replica") == name for e in leader.log_events()
    ), f"{name} leads without logging {LEADER_EVENT!r}"

    promoted = wait_for(
        lambda: (r := r3.rollout(GROUP)).get("phase") in ("promoted", "aborted") and r,
        timeout=30,
        what="the rollout ended by the new leader",
        explain=replicas.explain,
    )
    assert (promoted["phase"], promoted["candidate"]) == ("promoted", v2), promoted
    # The bake was served in full, not cut short (or skipped) by the takeover.
    assert promoted["ended_at"] >= baking["bake_started_at"] + bake_seconds, promoted
    wait_routed([canary, web], "b")
    # The ordinary Envoy first applied the candidate after the promotion, and only once.
    assert routes_updated_at(web) >= promoted["ended_at"]
    assert int(web.stats()[ROUTES_UPDATES]) == web_routes_updates + 1
