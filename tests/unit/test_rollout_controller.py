"""The rollout controller over simulated Envoys (sans-IO streams), a real store, a fake clock."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2

from controlplane.resources import CLUSTER, LISTENER
from controlplane.rollout.controller import NotFoundError, RolloutController, RolloutError
from controlplane.rollout.gate import Phase
from controlplane.rollout.policy import CanarySelector, RolloutPolicy
from controlplane.store import CANDIDATE, LAST_GOOD, STABLE, StoreError
from controlplane.store.sqlite import SQLiteStore
from controlplane.xds.assignments import Assignments
from controlplane.xds.evidence import FleetEvidence, GroupProgress
from controlplane.xds.fleet import Fleet
from controlplane.xds.stream import Send, SotwStream
from tests import factories

POLICY = RolloutPolicy(
    canary=CanarySelector(metadata={"canary": "true"}),
    min_existing=1,
    min_fresh=1,
    bake_seconds=5,
    ack_timeout_seconds=30,
    deadline_seconds=300,
)
V1 = factories.edge_snapshot()
# Each version changes the listener, so Envoys that ask only for CDS and LDS see it.
V2 = factories.edge_snapshot(prefix="/v2", listener_port=10002)
V3 = factories.edge_snapshot(prefix="/v3", listener_port=10003)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class SimEnvoy:
    """An Envoy on a sans-IO stream: asks for CDS and LDS, ACKs (or NACKs) what arrives."""

    ids = itertools.count(1)

    def __init__(self, plane: Plane, node_id: str, *, canary: bool, nack: str | None = None):
        self.plane = plane
        self.nack = nack
        self.stream = SotwStream(next(self.ids), plane.assignments.resolve, clock=plane.clock)
        node = base_pb2.Node(id=node_id, cluster="edge")
        if canary:
            node.metadata.CopyFrom(
                struct_pb2.Struct(fields={"canary": struct_pb2.Value(string_value="true")})
            )
        self.pending: list[Send] = []
        first = discovery_pb2.DiscoveryRequest(type_url=CLUSTER, node=node)
        self.pending += self.stream.receive(first)[2]
        plane.fleet.add(self.stream, self)
        self.pending += self.stream.receive(discovery_pb2.DiscoveryRequest(type_url=LISTENER))[2]
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
                type_url=sent.type_url, response_nonce=sent.nonce
            )
            if self.nack is not None and self.plane.is_candidate(sent.version):
                reply.error_detail.CopyFrom(status_pb2.Status(code=3, message=self.nack))
            else:
                reply.version_info = sent.version
            self.pending += self.stream.receive(reply)[2]
            # as the gRPC shell does after each event, and after an ACK or NACK
            self.plane.fleet.touched(self.stream)
            self.plane.fleet.progressed()

    @property
    def version(self) -> str | None:
        return self.stream.snapshot.version if self.stream.snapshot else None


class Plane:
    def __init__(self, tmp_path, policies: dict[str, RolloutPolicy] | None = None) -> None:
        self.clock = Clock()
        self.store = SQLiteStore(tmp_path / "xdscp.db")
        self.assignments = Assignments()
        self.fleet = Fleet()
        self.assignments.subscribe(self.fleet.wake_all)
        self.controller = RolloutController(
            self.store,
            self.assignments,
            self.fleet,
            {"edge": POLICY} if policies is None else policies,
            clock=self.clock,
        )

    async def load(self) -> Plane:
        """What a server does at start: serve the stored state."""
        await self.controller.load()
        return self

    def is_candidate(self, type_version: str) -> bool:
        candidate = self.assignments.candidate("edge")
        return candidate is not None and type_version in candidate.type_versions().values()

    async def publish(self, snapshot, message: str = "") -> str:  # type: ignore[no-untyped-def]
        return (
            await self.controller.publish("edge", snapshot, message=message, actor="alice")
        ).outcome

    async def advance(self, seconds: float) -> None:
        self.clock.now += seconds
        await self.controller.tick()


@pytest.fixture
async def plane(tmp_path) -> Plane:
    p = await Plane(tmp_path).load()
    # Bootstrap: the first version goes in directly, as if published before the policy existed.
    await Plane(tmp_path, policies={}).controller.publish("edge", V1, message="v1", actor="a")
    await p.controller.load()
    return p


async def test_group_without_policy_publishes_straight_to_stable_and_records_last_good(
    tmp_path,
) -> None:
    p = await Plane(tmp_path, policies={}).load()
    assert await p.publish(V1) == "promoted"
    envoy = SimEnvoy(p, "web-1", canary=False)
    assert envoy.version == V1.version
    await p.advance(1)
    assert p.store.pointers()["edge"] == {STABLE: V1.version, LAST_GOOD: V1.version}
    assert await p.publish(V1) == "unchanged"


async def test_last_good_not_recorded_while_the_store_fails_is_recorded_once_it_works(
    tmp_path, monkeypatch
) -> None:
    p = await Plane(tmp_path, policies={}).load()
    await p.publish(V1)
    SimEnvoy(p, "web-1", canary=False)
    working = p.store.pointers

    def down() -> dict[str, dict[str, str]]:
        raise StoreError("database db:5432/x: read pointers failed, the database is unavailable")

    monkeypatch.setattr(p.store, "pointers", down)
    await p.advance(1)
    monkeypatch.setattr(p.store, "pointers", working)
    assert LAST_GOOD not in p.store.pointers()["edge"]
    await p.advance(1)  # the fleet has not moved since: the ACK is not forgotten
    assert p.store.pointers()["edge"] == {STABLE: V1.version, LAST_GOOD: V1.version}


async def test_the_first_publish_of_a_group_with_a_policy_goes_straight_to_stable(
    tmp_path,
) -> None:
    p = await Plane(
        tmp_path
    ).load()  # the edge policy, and no stable yet: nothing to canary against
    assert await p.publish(V1) == "promoted"
    assert p.controller.rollout("edge") is None
    assert SimEnvoy(p, "canary-1", canary=True).version == V1.version
    assert await p.publish(V2) == "staged"  # from now on, through the canaries


async def test_canaries_get_the_candidate_others_stay_on_stable_then_all_get_it(plane) -> None:
    canary = SimEnvoy(plane, "canary-1", canary=True)
    web = SimEnvoy(plane, "web-1", canary=False)
    await plane.advance(1)  # last_good = V1
    assert await plane.publish(V2, "new routes") == "staged"
    assert (canary.version, web.version) == (V2.version, V1.version)
    assert plane.store.pointers()["edge"][CANDIDATE] == V2.version

    plane.clock.now += 2
    newcomer = SimEnvoy(plane, "web-2", canary=False)  # joins mid-rollout: stable
    fresh_canary = SimEnvoy(plane, "canary-2", canary=True)  # starts from nothing on V2
    assert (newcomer.version, fresh_canary.version) == (V1.version, V2.version)
    await plane.advance(1)
    rollout = plane.controller.rollout("edge")
    assert rollout.existing_acked == ["canary-1"] and rollout.fresh_acked == ["canary-2"]

    await plane.advance(6)  # bake passed
    assert rollout.phase is Phase.PROMOTED
    assert {e.version for e in (canary, web, newcomer, fresh_canary)} == {V2.version}
    later = SimEnvoy(plane, "web-3", canary=False)
    assert later.version == V2.version  # new nodes get exactly what canaries verified
    await plane.advance(1)
    assert plane.store.pointers()["edge"] == {STABLE: V2.version, LAST_GOOD: V2.version}
    actions = [e.action for e in reversed(plane.store.history("edge"))]
    assert actions == ["publish", "last_good", "stage", "promote", "last_good"]


async def test_nack_from_a_canary_aborts_and_returns_it_to_stable(plane) -> None:
    canary = SimEnvoy(plane, "canary-1", canary=True, nack="missing ): ((")
    web = SimEnvoy(plane, "web-1", canary=False)
    await plane.publish(V2)
    assert canary.stream.rejection() == "missing ): (("
    await plane.advance(1)

    rollout = plane.controller.rollout("edge")
    assert rollout.phase is Phase.ABORTED
    assert rollout.reason == "canary canary-1 NACKed the candidate: missing ): (("
    assert canary.version == V1.version and web.version == V1.version
    assert CANDIDATE not in plane.store.pointers()["edge"]
    entry = next(e for e in plane.store.history("edge") if e.action == "abort")
    assert (entry.version, entry.message, entry.actor) == (V2.version, rollout.reason, "xdscp-gate")


async def test_canary_disconnecting_is_pending_and_aborts_if_it_never_returns(plane) -> None:
    canary = SimEnvoy(plane, "canary-1", canary=True)
    await plane.publish(V2)
    await plane.advance(1)
    canary.close()
    await plane.advance(1)
    rollout = plane.controller.rollout("edge")
    assert [(p.node_id, p.waiting_for) for p in rollout.pending] == [("canary-1", "reconnect")]
    await plane.advance(POLICY.ack_timeout_seconds + 1)
    assert rollout.reason == (
        "canary canary-1 disconnected during the rollout and did not reconnect within 30s"
    )


async def test_a_canary_restarted_mid_rollout_counts_as_fresh_and_promotes(plane) -> None:
    canary = SimEnvoy(plane, "canary-1", canary=True)
    await plane.advance(1)  # connected before staging
    await plane.publish(V2)
    await plane.advance(1)
    canary.close()
    await plane.advance(1)
    restarted = SimEnvoy(plane, "canary-1", canary=True)  # a new process: holds nothing
    await plane.advance(1)
    rollout = plane.controller.rollout("edge")
    assert rollout.existing_acked == ["canary-1"] and rollout.fresh_acked == ["canary-1"]
    await plane.advance(POLICY.bake_seconds)
    assert rollout.phase is Phase.PROMOTED
    assert restarted.version == V2.version


async def test_publishing_during_a_rollout_is_refused(plane) -> None:
    SimEnvoy(plane, "canary-1", canary=True)
    await plane.publish(V2)
    with pytest.raises(RolloutError, match="already rolling out"):
        await plane.publish(V3)
    assert plane.store.pointers()["edge"][CANDIDATE] == V2.version


async def test_publishing_the_candidate_again_during_its_rollout_changes_nothing(plane) -> None:
    SimEnvoy(plane, "canary-1", canary=True)
    assert await plane.publish(V2) == "staged"
    history = plane.store.history("edge", 100)
    assert await plane.publish(V2) == "staged"  # a re-run, e.g. after a cut-off answer
    assert plane.store.history("edge", 100) == history
    assert plane.controller.rollout("edge").candidate == V2.version


async def test_restart_mid_rollout_aborts_and_never_promotes(plane, tmp_path) -> None:
    canary = SimEnvoy(plane, "canary-1", canary=True)
    await plane.publish(V2)
    await plane.advance(1)
    plane.store.close()

    restarted = await Plane(tmp_path).load()  # load() runs on the same store
    rollout = restarted.controller.rollout("edge")
    assert rollout.phase is Phase.ABORTED
    assert rollout.reason == "control plane restarted mid-rollout"
    assert restarted.store.pointers()["edge"] == {STABLE: V1.version}
    assert restarted.assignments.candidate("edge") is None
    reconnected = SimEnvoy(restarted, "canary-1", canary=True)
    assert reconnected.version == V1.version
    assert canary.version == V2.version  # the old stream's view; it is gone with the old server


async def test_manual_promotion(tmp_path) -> None:
    p = await Plane(
        tmp_path, policies={"edge": replace(POLICY, min_fresh=0, auto_promote=False)}
    ).load()
    await Plane(tmp_path, policies={}).controller.publish("edge", V1, message="", actor="a")
    await p.controller.load()
    SimEnvoy(p, "canary-1", canary=True)
    p.clock.now += 1
    await p.publish(V2)
    with pytest.raises(RolloutError, match="has not passed its canaries yet"):
        await p.controller.promote("edge", actor="bob", reason="")
    await p.advance(1)
    await p.advance(6)
    assert p.controller.rollout("edge").phase is Phase.AWAITING_PROMOTION
    await p.controller.promote("edge", actor="bob", reason="looks good")
    assert p.store.pointers()["edge"][STABLE] == V2.version


async def test_rollback_during_a_rollout_aborts_it_first(plane) -> None:
    canary = SimEnvoy(plane, "canary-1", canary=True)
    web = SimEnvoy(plane, "web-1", canary=False)
    await plane.advance(1)  # last_good = V1
    await plane.publish(V2)
    outcome = await plane.controller.rollback("edge", to_version=None, actor="ops", reason="bad")
    assert outcome.aborted_rollout and outcome.version == V1.version
    assert plane.controller.rollout("edge").phase is Phase.ABORTED
    assert canary.version == web.version == V1.version
    convergence = plane.controller.convergence("edge", V1.version, outcome.started_at)
    assert (convergence.total, convergence.acked, convergence.lagging) == (2, 2, [])


async def test_rollback_when_stable_is_already_last_good_goes_to_the_one_before(tmp_path) -> None:
    p = await Plane(tmp_path, policies={}).load()
    await p.publish(V1)
    envoy = SimEnvoy(p, "web-1", canary=False)
    await p.advance(1)
    await p.publish(V2)
    await p.advance(1)
    assert p.store.pointers()["edge"] == {STABLE: V2.version, LAST_GOOD: V2.version}
    outcome = await p.controller.rollback("edge", to_version=None, actor="ops", reason="")
    assert (outcome.version, outcome.previous_version) == (V1.version, V2.version)
    assert envoy.version == V1.version


async def test_rollback_to_a_named_version_reaches_every_node(tmp_path) -> None:
    p = await Plane(tmp_path, policies={}).load()
    await p.publish(V1)
    await p.publish(V2)
    envoys = [SimEnvoy(p, f"web-{i}", canary=False) for i in range(3)]
    await p.controller.rollback("edge", to_version=V1.version, actor="ops", reason="")
    assert {e.version for e in envoys} == {V1.version}
    assert p.store.history("edge")[0].action == "rollback"


async def test_rollback_without_last_good_is_refused_and_changes_nothing(tmp_path) -> None:
    p = await Plane(tmp_path, policies={}).load()
    await p.publish(V1)  # no node ever ACKed it: no last_good
    history = p.store.history()
    with pytest.raises(RolloutError, match="no last_good version to go back to"):
        await p.controller.rollback("edge", to_version=None, actor="ops", reason="")
    assert p.store.history() == history


async def test_rollback_to_an_unknown_version_is_refused_and_changes_nothing(tmp_path) -> None:
    p = await Plane(tmp_path, policies={}).load()
    await p.publish(V1)
    history, pointers = p.store.history(), p.store.pointers()
    with pytest.raises(NotFoundError, match="not in the store"):
        await p.controller.rollback("edge", to_version="feedfeedfeedfeed", actor="ops", reason="")
    assert (p.store.history(), p.store.pointers()) == (history, pointers)


async def test_fleet_progress_counts_who_lags_as_convergence_does_and_follows_each_ack(
    tmp_path,
) -> None:
    p = await Plane(tmp_path, policies={}).load()
    await p.publish(V1)
    envoys = [SimEnvoy(p, f"web-{i}", canary=False) for i in range(3)]
    evidence = FleetEvidence(p.fleet, p.assignments)
    assert evidence.progress("edge", V1.version) == GroupProgress(3, 0, pytest.approx(p.clock()))

    # Two nodes stop answering; v2 reaches them and they hold it unACKed.
    for envoy in envoys[1:]:
        envoy.settle = lambda: None  # type: ignore[method-assign]
    await p.publish(V2)
    progress = evidence.progress("edge", V2.version)
    convergence = evidence.convergence("edge", V2.version)
    assert (progress.total, progress.lagging) == (3, 2)
    assert sorted(e.node_id for e in convergence.lagging) == ["web-1", "web-2"]

    # Each ACK moves the fleet's generation: the next look counts it (nothing stale kept).
    for lagging, envoy in ((1, envoys[1]), (0, envoys[2])):
        SimEnvoy.settle(envoy)
        assert evidence.progress("edge", V2.version).lagging == lagging
    assert evidence.convergence("edge", V2.version).lagging == []

    # A node that leaves stops counting; one that comes (on V2 at once) counts.
    envoys[0].close()
    assert evidence.progress("edge", V2.version) == GroupProgress(2, 0, pytest.approx(p.clock()))
    SimEnvoy(p, "web-3", canary=False)
    assert (evidence.progress("edge", V2.version).total, lagging) == (3, 0)
    # Looking at another version does not lose track of this one.
    assert evidence.progress("edge", V1.version).lagging == 3
    envoys[1].close()
    assert evidence.progress("edge", V2.version).total == 2


class NotYetRead:
    """Another replica's evidence: what it wrote is seen only once `refresh` reads it."""

    def __init__(self, written: list) -> None:  # type: ignore[type-arg]
        self.generation = 0
        self._written = written
        self._read: list = []  # type: ignore[type-arg]

    def nodes(self) -> list:  # type: ignore[type-arg]
        return list(self._read)

    async def refresh(self) -> None:
        self._read = list(self._written)
        self.generation += 1


async def test_a_wait_for_convergence_counts_a_node_another_replica_wrote_and_was_not_read(
    tmp_path,
) -> None:
    """Nodes here are all on v1, but another replica wrote a node that lags and this one had
    not read it yet: the wait reads again before it ends, and does not report 1/1."""
    from dataclasses import replace as changed

    from tests.unit.test_evidence import evidence

    p = await Plane(tmp_path, policies={}).load()
    await p.publish(V1)
    SimEnvoy(p, "web-0", canary=False)
    elsewhere = changed(evidence(), group="edge")  # NACKed, on another version: lagging
    evidence_here = FleetEvidence(p.fleet, p.assignments)
    evidence_here.remote = NotYetRead([elsewhere])
    controller = RolloutController(
        p.store, p.assignments, p.fleet, {}, clock=p.clock, evidence=evidence_here
    )
    found = await controller.wait_for_convergence("edge", V1.version, since=p.clock(), timeout=0.3)
    assert (found.total, found.acked) == (2, 1)
    assert [node for node, _ in found.lagging] == ["edge-1"]
