"""The canary gate and rollback with real Envoys: two long-running (one canary) plus the
built-in fresh probe, which starts a throwaway Envoy in its own network namespace.

Both long-running Envoys bind the same listener port (SO_REUSEPORT), so per-Envoy state is
asserted through each one's admin /config_dump, not through traffic.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration import edge_config
from tests.integration.harness import ENVOY_BINARY, Envoy, XdsControlPlane, free_port, wait_for

CANARY = {"canary": "true"}


def policy_file(directory: Path) -> Path:
    path = directory / "rollout-policy.yaml"
    policy = {
        "groups": {
            "edge": {
                "canary": {"metadata": CANARY},
                "min_existing": 1,
                "min_fresh": 1,  # the probe is the fresh canary
                "bake_seconds": 1,
                "ack_timeout_seconds": 15,
                "deadline_seconds": 90,
                "fresh_probe": {
                    "envoy_binary": str(ENVOY_BINARY),
                    "ready_timeout_seconds": 8,
                    "isolate_network": True,
                },
            }
        }
    }
    path.write_text(yaml.safe_dump(policy))
    return path


class Fleet:
    """The edge group: one canary and one ordinary Envoy, both running v1.

    v1 is published before the canary policy is switched on (xdscp restarts with it), as a
    team adopting the gate would do; every later publish goes through the gate.
    """

    def __init__(self, tmp_path: Path, start_envoy, database_url: str | None = None) -> None:  # type: ignore[no-untyped-def]
        self.tmp_path = tmp_path
        self.plane = XdsControlPlane(tmp_path, database_url=database_url).start()
        self.port = free_port()
        self.backends = {"a": free_port(), "b": free_port(), "c": free_port()}
        self.v1 = self.publish("v1", route_to="a", expect="published")
        self.canary = start_envoy("edge-canary-1", "edge", self.plane.xds_port, metadata=CANARY)
        self.web = start_envoy("edge-web-1", "edge", self.plane.xds_port)
        self.wait_synced(self.v1, 2)
        self.plane.stop()
        self.plane.extra_args = (
            "--rollout-policy", str(policy_file(tmp_path)),
            "--xds-socket", str(tmp_path / "xds.sock"),
        )  # fmt: skip
        self.plane.start()
        self.wait_synced(self.v1, 2)

    def wait_synced(self, version: str, count: int) -> None:
        def synced() -> bool:
            nodes = [n for n in self.plane.status() if n["node_id"].startswith("edge-")]
            return len(nodes) == count and all(
                n["snapshot_version"] == version and all(t["state"] == "SYNCED" for t in n["types"])
                for n in nodes
            )

        wait_for(synced, what=f"{count} Envoys SYNCED on {version}")

    def publish(self, name: str, *, route_to: str, expect: str, **config: Any) -> str:
        directory = edge_config.write(
            self.tmp_path / name,
            listener_port=self.port,
            backends=self.backends,
            routes=[edge_config.route_to(route_to)],
            **config,
        )
        result = self.plane.xdsctl("publish", str(directory), "--group", "edge", "-m", name)
        assert expect in result.stderr, result.stderr
        return result.stdout.strip()

    def rollout(self) -> dict[str, Any]:
        listed = json.loads(self.plane.xdsctl("rollout", "status", "--json").stdout)
        return next((r for r in listed.get("rollouts", []) if r["group"] == "edge"), {})

    def wait_phase(self, *phases: str, timeout: float = 60) -> dict[str, Any]:
        return wait_for(
            lambda: (r := self.rollout()).get("phase") in phases and r,
            timeout=timeout,
            what=f"rollout phase in {phases}",
        )


@pytest.fixture
def fleet(tmp_path: Path, start_envoy):  # type: ignore[no-untyped-def]
    fleet = Fleet(tmp_path, start_envoy)
    yield fleet
    fleet.plane.stop()


def test_a_bad_candidate_never_reaches_the_ordinary_envoy_and_the_canary_returns_to_stable(
    fleet, tmp_path
) -> None:
    gated_plane = fleet.plane
    web_rds_before = fleet.web.stats()["http.edge.rds.edge_routes.update_attempt"]
    bad_route = edge_config.nacked_regex_route("b")
    directory = edge_config.write(
        tmp_path / "bad",
        listener_port=fleet.port,
        backends=fleet.backends,
        routes=[bad_route, edge_config.route_to("b")],
    )
    gated_plane.xdsctl("publish", str(directory), "--group", "edge")

    rollout = fleet.wait_phase("aborted")
    assert rollout["reason"].startswith("canary edge-canary-1 NACKed the candidate: ")
    assert "missing )" in rollout["reason"]
    # The ordinary Envoy was never sent the candidate: same routes, no RDS update attempted.
    assert fleet.web.route_targets() == {"a"}
    assert fleet.web.stats()["http.edge.rds.edge_routes.update_attempt"] == web_rds_before
    # The canary is back on stable in our view, and Envoy itself still holds v1's routes.
    wait_for(
        lambda: all(
            n["snapshot_version"] == fleet.v1
            for n in gated_plane.status()
            if n["node_id"].startswith("edge-")
        ),
        what="both Envoys assigned v1 again",
    )
    assert fleet.canary.route_targets() == {"a"}
    table = gated_plane.xdsctl("rollout", "status").stdout
    assert "ABORTED" in table and "missing )" in table


def test_a_candidate_fresh_envoys_cannot_start_on_is_refused_by_the_probe(fleet) -> None:
    # RDS from a management server that never answers, waiting for it forever: a running
    # Envoy keeps its old listener while the new one warms (and ACKs the update); a fresh
    # Envoy cannot finish initializing, so it never becomes ready.
    unreachable_rds = {
        "api_config_source": {
            "api_type": "GRPC",
            "transport_api_version": "V3",
            "grpc_services": [
                {"google_grpc": {"target_uri": f"127.0.0.1:{free_port()}", "stat_prefix": "legacy"}}
            ],
        },
        "initial_fetch_timeout": "0s",
        "resource_api_version": "V3",
    }
    fleet.publish(
        "fresh-fail",
        route_to="a",
        expect="staged",
        rds_source=unreachable_rds,
    )

    rollout = fleet.wait_phase("aborted")
    assert rollout["reason"].startswith("fresh probe failed: "), rollout["reason"]
    assert "LIVE" in rollout["reason"]
    assert rollout["existing_acked"] == ["edge-canary-1"]  # the running canary took it fine
    assert rollout["probe_state"] == "failed"
    assert fleet.web.route_targets() == {"a"}
    _, web_listeners = fleet.web.admin("/config_dump?resource=dynamic_listeners")
    assert "google_grpc" not in web_listeners  # never reached the ordinary Envoy
    _, canary_listeners = fleet.canary.admin("/config_dump?resource=dynamic_listeners")
    assert "google_grpc" not in canary_listeners  # the canary is back on stable


def test_a_good_candidate_is_promoted_to_all_and_rollback_restores_the_previous_one(
    fleet, start_envoy
) -> None:
    gated_plane = fleet.plane
    wait_for(
        lambda: gated_plane.xdsctl("snapshots", "--json").stdout.count('"last_good"') >= 1,
        what="v1 recorded as last_good",
    )
    v2 = fleet.publish("v2", route_to="b", expect="staged")
    rollout = fleet.wait_phase("promoted")
    assert rollout["candidate"] == v2
    assert rollout["existing_acked"] == ["edge-canary-1"]
    assert len(rollout["fresh_acked"]) == 1 and rollout["fresh_acked"][0].startswith("xdscp-probe-")
    for envoy in (fleet.canary, fleet.web):
        wait_for(lambda e=envoy: e.route_targets() == {"b"}, what=f"{envoy.node_id} on v2")
    late: Envoy = start_envoy("edge-web-2", "edge", gated_plane.xds_port)
    wait_for(lambda: late.route_targets() == {"b"}, what="a new Envoy starts on v2")

    result = gated_plane.xdsctl(
        "rollback", "--group", "edge", "--reason", "test", "--timeout", "30"
    )
    assert re.fullmatch(rf"3/3 nodes ACKed {fleet.v1} in \d+\.\d\ds\n", result.stdout), (
        result.stdout
    )
    for envoy in (fleet.canary, fleet.web, late):
        assert envoy.route_targets() == {"a"}, envoy.node_id
    history = json.loads(gated_plane.xdsctl("snapshots", "--json").stdout)
    assert history["groups"]["edge"]["pointers"]["stable"] == fleet.v1
    assert history["entries"][0]["action"] in ("rollback", "last_good")
