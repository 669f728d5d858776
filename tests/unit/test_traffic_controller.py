"""The controller runs traffic checks during the bake: simulated Envoys, a fake clock and a
fake Prometheus client (the real one is proven in tests/integration/test_traffic_gate.py)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest

from controlplane.rollout import controller as controller_module
from controlplane.rollout.gate import Phase
from controlplane.rollout.traffic import NoData, TrafficCheck, TrafficPolicy
from tests.unit.test_rollout_controller import POLICY, V1, V2, Plane, SimEnvoy

TRAFFIC = TrafficPolicy(
    prometheus="http://prom:9090",
    checks=(TrafficCheck(name="5xx", query='ratio{node=~"{{ canaries }}"}', max=0.05),),
    interval_seconds=2,
    min_passes=2,
    on_no_data=NoData.WAIT,
)


class FakePrometheus:
    def __init__(self, value: float | None) -> None:
        self.value = value
        self.queries: list[str] = []

    def query(self, promql: str) -> float | None:
        self.queries.append(promql)
        return self.value


@pytest.fixture
def prometheus(monkeypatch: pytest.MonkeyPatch) -> FakePrometheus:
    fake = FakePrometheus(0.0)
    monkeypatch.setattr(controller_module, "PrometheusClient", lambda url, timeout: fake)
    return fake


async def traffic_plane(tmp_path) -> Plane:  # type: ignore[no-untyped-def]
    await Plane(tmp_path, policies={}).controller.publish("edge", V1, message="v1", actor="a")
    plane = await Plane(
        tmp_path, policies={"edge": replace(POLICY, min_fresh=0, traffic=TRAFFIC)}
    ).load()
    plane.controller.start()
    return plane


async def until(condition, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    """Let the controller's background tasks run until `condition()` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_promotion_waits_for_the_passes_and_the_query_names_the_canaries(
    tmp_path, prometheus
) -> None:
    plane = await traffic_plane(tmp_path)
    try:
        SimEnvoy(plane, "canary.1", canary=True)
        SimEnvoy(plane, "web-1", canary=False)
        plane.clock.now += 1  # the canary connected before staging: an existing canary
        await plane.publish(V2)
        await plane.advance(1)  # the canary ACKed: the bake starts
        rollout = plane.controller.rollout("edge")
        assert rollout is not None and rollout.evidence_complete_at is not None
        await plane.advance(6)  # baked, but no check has run yet
        assert rollout.phase is Phase.CANARY
        await until(lambda: len(prometheus.queries) == 1)
        assert prometheus.queries == ['ratio{node=~"canary[.]1"}']
        await plane.advance(1)
        assert rollout.phase is Phase.CANARY  # 1 of 2 passes
        plane.clock.now += 2
        await until(lambda: len(prometheus.queries) == 2)
        await until(lambda: rollout.traffic[0].passes == 2)
        await plane.advance(0)
        assert rollout.phase is Phase.PROMOTED
        exposition = plane.controller._metrics.exposition().decode()
        assert (
            'xdscp_traffic_check_evaluations_total{check="5xx",group="edge",result="pass"} 2.0'
            in exposition
        )
    finally:
        await plane.controller.stop()


async def test_a_failing_check_aborts_and_returns_the_canary_to_stable(
    tmp_path, prometheus
) -> None:
    prometheus.value = 0.5
    plane = await traffic_plane(tmp_path)
    try:
        canary = SimEnvoy(plane, "canary-1", canary=True)
        plane.clock.now += 1
        await plane.publish(V2)
        await plane.advance(1)
        plane.clock.now += 2
        rollout = plane.controller.rollout("edge")
        await until(lambda: rollout.traffic[0].failures == 1)
        await plane.advance(0)
        assert rollout.phase is Phase.ABORTED
        assert rollout.reason == (
            'traffic check 5xx failed: ratio{node=~"canary-1"} = 0.5, threshold max 0.05'
        )
        assert canary.version == V1.version
    finally:
        await plane.controller.stop()
