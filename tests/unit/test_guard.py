"""The guard after a promotion: its state machine alone, then wired by the controller over
simulated Envoys (sans-IO streams), a real store and a fake clock."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from controlplane.resources import CLUSTER, LISTENER
from controlplane.rollout.controller import GUARD_ACTOR
from controlplane.rollout.guard import Guard, GuardedNode, GuardPhase
from controlplane.rollout.policy import CanarySelector, GuardPolicy, RolloutPolicy
from controlplane.store import LAST_GOOD, STABLE
from controlplane.xds.stream import Send, SotwStream
from tests.unit.test_rollout_controller import V1, V2, Plane, SimEnvoy

GUARD = GuardPolicy(seconds=60, first_sync_seconds=10)
GUARD_ONLY = RolloutPolicy(canary=None, guard=GUARD)


def node(node_id: str = "edge-1", **fields: object) -> GuardedNode:
    values: dict[str, object] = {
        "stream_id": 1,
        "version": "v2",
        "connected_at": 100.0,
        "started_empty": True,
        "first_synced": True,
    }
    values.update(fields)
    return GuardedNode(node_id=node_id, **values)  # type: ignore[arg-type]


def guard() -> Guard:
    return Guard("edge", "v2", rollback_to="v1", started_at=100.0, policy=GUARD)


# -- the state machine ------------------------------------------------------------------------


def test_a_nack_of_the_guarded_version_trips_the_guard() -> None:
    g = guard()
    assert g.observe(101, [node(rejection="cannot bind")]) is GuardPhase.TRIPPED
    assert g.reason == "node edge-1 NACKed v2: cannot bind"
    assert g.ended_at == 101
    assert g.observe(102, []) is None  # ended: stays tripped


def test_a_nack_of_another_version_is_not_the_guards_business() -> None:
    g = guard()
    assert g.observe(101, [node(version="v1", rejection="bad")]) is None
    assert g.phase is GuardPhase.WATCHING


def test_a_node_starting_on_the_guarded_version_gets_first_sync_seconds() -> None:
    g = guard()
    stuck = node(connected_at=120.0, first_synced=False, missing=("never asked for LDS",))
    assert g.observe(130, [stuck]) is None  # exactly the bound: still within it
    assert g.observe(130.5, [stuck]) is GuardPhase.TRIPPED
    assert g.reason == (
        "node edge-1 started on v2 and did not finish its first sync within 10s: "
        "never asked for LDS"
    )


def test_a_node_already_starting_when_the_guard_began_counts_from_the_guards_start() -> None:
    g = guard()
    starting = node(connected_at=50.0, first_synced=False)
    assert g.observe(105, [starting]) is None
    assert g.observe(111, [starting]) is GuardPhase.TRIPPED


def test_a_node_that_reconnected_with_config_or_finished_its_sync_never_trips_it() -> None:
    g = guard()
    nodes = [
        node("reconnected", started_empty=False, first_synced=False),
        node("synced", first_synced=True),
    ]
    assert g.observe(159, nodes) is None
    assert g.remaining(159) == 1


def test_the_guard_passes_after_its_seconds_without_a_failure() -> None:
    g = guard()
    assert g.observe(160, [node()]) is GuardPhase.PASSED
    assert g.reason == "no NACK and no stuck node in 60s"


# -- wired by the controller ------------------------------------------------------------------


class StartingEnvoy:
    """An Envoy starting from nothing on ADS: ACKs clusters, then asks for listeners only if
    `initializes` (else its clusters never finish initializing: it stays PRE_INITIALIZING)."""

    def __init__(self, plane: Plane, node_id: str, *, initializes: bool) -> None:
        self.plane = plane
        self.initializes = initializes
        self.stream = SotwStream(
            900 + len(node_id), plane.assignments.resolve, clock=plane.clock, monotonic=plane.clock
        )
        first = discovery_pb2.DiscoveryRequest(
            type_url=CLUSTER,
            node=base_pb2.Node(id=node_id, cluster="edge", user_agent_name="envoy"),
        )
        self.pending: list[Send] = list(self.stream.receive(first)[2])
        plane.fleet.add(self.stream, self)
        self.settle()

    def wake(self) -> None:
        assert self.stream.node is not None
        self.pending += self.stream.on_snapshot(self.plane.assignments.resolve(self.stream.node))
        self.plane.fleet.touched(self.stream)
        self.settle()

    def close(self) -> None:
        self.plane.fleet.remove(self.stream)

    def settle(self) -> None:
        while self.pending:
            sent = self.pending.pop(0)
            reply = discovery_pb2.DiscoveryRequest(
                type_url=sent.type_url, response_nonce=sent.nonce, version_info=sent.version
            )
            self.pending += self.stream.receive(reply)[2]
            if sent.type_url == CLUSTER and self.initializes and LISTENER not in self.stream.types:
                asked = discovery_pb2.DiscoveryRequest(type_url=LISTENER)
                self.pending += self.stream.receive(asked)[2]
            self.plane.fleet.touched(self.stream)
            self.plane.fleet.progressed()


class NackingEnvoy(SimEnvoy):
    """A running Envoy that NACKs the listeners of V2 (e.g. a port it cannot bind)."""

    def settle(self) -> None:
        while self.pending:
            sent = self.pending.pop(0)
            reply = discovery_pb2.DiscoveryRequest(
                type_url=sent.type_url, response_nonce=sent.nonce
            )
            if sent.version == V2.of_type(LISTENER).version:
                reply.error_detail.CopyFrom(status_pb2.Status(code=3, message="cannot bind"))
            else:
                reply.version_info = sent.version
            self.pending += self.stream.receive(reply)[2]
            self.plane.fleet.touched(self.stream)
            self.plane.fleet.progressed()


async def guarded_plane(tmp_path, policy: RolloutPolicy = GUARD_ONLY) -> tuple[Plane, SimEnvoy]:
    """V1 stable and last_good on a running Envoy, then V2 published under `policy`."""
    plane = await Plane(tmp_path, policies={"edge": policy}).load()
    # The first version goes in directly, as if published before the policy existed.
    await Plane(tmp_path, policies={}).controller.publish("edge", V1, message="v1", actor="a")
    await plane.controller.load()
    web = SimEnvoy(plane, "web-1", canary=False)
    await plane.advance(1)
    assert plane.store.pointers()["edge"][LAST_GOOD] == V1.version
    assert plane.controller.guards() == {}  # V1 had no last_good before it: nothing to guard
    return plane, web


async def test_a_guard_only_policy_publishes_straight_to_stable_and_holds_last_good(
    tmp_path,
) -> None:
    plane, web = await guarded_plane(tmp_path)
    assert await plane.publish(V2) == "promoted"
    assert web.version == V2.version
    assert set(plane.controller.guards()) == {"edge"}
    await plane.advance(30)
    assert plane.store.pointers()["edge"] == {STABLE: V2.version, LAST_GOOD: V1.version}

    await plane.advance(31)  # the guard passes; last_good catches up, the fleet quiet
    assert plane.controller.guards() == {}
    await plane.advance(1)
    assert plane.store.pointers()["edge"] == {STABLE: V2.version, LAST_GOOD: V2.version}


async def test_a_node_stuck_starting_on_the_new_stable_rolls_the_group_back(tmp_path) -> None:
    plane, web = await guarded_plane(tmp_path)
    await plane.publish(V2)
    fresh = StartingEnvoy(plane, "fresh-1", initializes=False)
    assert fresh.stream.snapshot is not None and fresh.stream.snapshot.version == V2.version
    await plane.advance(10)
    assert set(plane.controller.guards()) == {"edge"}  # within first_sync_seconds

    await plane.advance(0.5)
    assert plane.controller.guards() == {}
    assert plane.store.pointers()["edge"] == {STABLE: V1.version, LAST_GOOD: V1.version}
    assert web.version == fresh.stream.snapshot.version == V1.version
    [entry] = [e for e in plane.store.history("edge") if e.action == "rollback"]
    assert (entry.version, entry.actor) == (V1.version, GUARD_ACTOR)
    assert entry.message == (
        "node fresh-1 started on " + V2.version + " and did not finish its first sync within "
        "10s: never asked for LDS"
    )
    assert plane.controller._metrics.guard_trips.labels("edge")._value.get() == 1
    [last] = plane.controller.last_guards().values()  # what `rollout status` shows
    assert (last.phase, last.reason) == (GuardPhase.TRIPPED, entry.message)


async def test_a_node_that_starts_and_initializes_on_the_new_stable_is_fine(tmp_path) -> None:
    plane, _ = await guarded_plane(tmp_path)
    await plane.publish(V2)
    fresh = StartingEnvoy(plane, "fresh-1", initializes=True)
    assert fresh.stream.first_synced_at is not None
    await plane.advance(20)
    assert set(plane.controller.guards()) == {"edge"}
    assert plane.store.pointers()["edge"][STABLE] == V2.version


async def test_a_nack_of_the_new_stable_rolls_the_group_back(tmp_path) -> None:
    plane, _ = await guarded_plane(tmp_path)
    nacking = NackingEnvoy(plane, "web-2", canary=False)
    await plane.publish(V2)
    await plane.advance(0.2)
    assert plane.store.pointers()["edge"][STABLE] == V1.version
    assert nacking.version == V1.version
    [entry] = [e for e in plane.store.history("edge") if e.action == "rollback"]
    assert entry.actor == GUARD_ACTOR
    assert entry.message.startswith("node web-2 NACKed ")


async def test_the_guard_starts_after_a_canary_promotion_too(tmp_path) -> None:
    policy = RolloutPolicy(
        canary=CanarySelector(metadata={"canary": "true"}), min_existing=1, guard=GUARD
    )
    plane, _ = await guarded_plane(tmp_path, policy)
    SimEnvoy(plane, "canary-1", canary=True)
    await plane.advance(1)  # the canary is an existing node
    assert await plane.publish(V2) == "staged"
    assert plane.controller.guards() == {}
    await plane.advance(1)
    await plane.advance(31)  # bake 30 s (default), then promotion
    assert plane.store.pointers()["edge"][STABLE] == V2.version
    assert set(plane.controller.guards()) == {"edge"}
    StartingEnvoy(plane, "fresh-1", initializes=False)
    await plane.advance(11)
    assert plane.store.pointers()["edge"][STABLE] == V1.version


async def test_a_manual_rollback_ends_the_guard(tmp_path) -> None:
    plane, _ = await guarded_plane(tmp_path)
    await plane.publish(V2)
    outcome = await plane.controller.rollback("edge", to_version=None, actor="ops", reason="")
    assert outcome.version == V1.version
    assert plane.controller.guards() == {}
    [last] = plane.controller.last_guards().values()
    assert (last.phase, last.reason) == (
        GuardPhase.CANCELLED,
        f"rolled back to {V1.version} by ops",
    )


async def test_a_restart_guards_a_stable_that_is_not_last_good_again(tmp_path) -> None:
    plane, _ = await guarded_plane(tmp_path)
    await plane.publish(V2)
    restarted = await Plane(tmp_path, policies={"edge": GUARD_ONLY}).load()
    [guard] = restarted.controller.guards().values()
    assert (guard.version, guard.rollback_to) == (V2.version, V1.version)
    assert guard.started_at == restarted.clock.now
    unguarded = await Plane(tmp_path, policies={}).load()
    assert unguarded.controller.guards() == {}


def test_rollout_status_shows_a_watching_guard_with_its_time_left_and_an_ended_one_why() -> None:
    from controlplane.admin.v1 import admin_pb2
    from controlplane.cli import render

    watching = admin_pb2.GuardStatus(
        group="edge", version="v2", rollback_to="v1", phase="watching",
        seconds=300, seconds_left=241.6, first_sync_seconds=30,
    )  # fmt: skip
    assert render.rollouts(admin_pb2.ListRolloutsResponse(guards=[watching])) == (
        "group edge: guard WATCHING on v2, 242s of 300s left\n"
        "  a NACK, or an Envoy starting on it not synced within 30s, rolls back to v1"
    )
    tripped = admin_pb2.GuardStatus(
        group="edge", version="v2", rollback_to="v1", phase="tripped",
        reason="node e-1 NACKed v2: bad", ended_at=1000.0,
    )  # fmt: skip
    assert render.guard(tripped).startswith("group edge: guard TRIPPED on v2, ")
    assert render.guard(tripped).endswith(" ago: node e-1 NACKed v2: bad")
