"""The benchmark's simulated Envoy (tests/bench/fleet.py) sends what a real Envoy sends.

For each scenario of tests/integration/scripted_ads.py and each protocol, a real Envoy 1.40
and then one simulated Envoy (a one-node SimulatedFleet: the benchmark's own code, in its own
worker process) talk to a fresh scripted ADS server, and the requests each one sent,
normalized (scripted_ads.normalize: type, INIT/ACK/NACK/REQ or subscription change, names,
whether the nonce is the latest), must be equal, in the same order, from the first request
of the stream to the end of the scenario. That covers the ordering that matters: the CDS
ACK (or NACK) held until the EDS clusters the update added or changed got their
ClusterLoadAssignment, and sent before the EDS ACK of the response that ended the warming.

The real Envoy's sequences are recorded live on every run, never stored.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.bench.fleet import CDS, SimulatedFleet
from tests.integration.harness import Envoy, free_port
from tests.integration.scripted_ads import (
    SCENARIOS,
    Event,
    ScriptedAds,
    cluster,
    initial_resources,
    normalize,
    trace,
)

API_TYPES = {"sotw": "GRPC", "delta": "DELTA_GRPC"}
SYNC_TIMEOUT = 30.0  # until the client has ACKed every type of the initial resources
QUIET_SECONDS = 0.3  # nothing more sent or received: the sequence is complete
Client = Callable[[ScriptedAds], AbstractContextManager[object]]


@dataclass
class Recorded:
    startup: list[str]  # normalized requests until the client ACKed every initial type
    scenario: list[str]  # normalized requests from then on
    events: list[Event]
    seconds: float  # wall time of the scenario (after the startup)


def record(scenario: str, client: Client) -> Recorded:
    """Serve `scenario` to the client, from a fresh server; return what it sent."""
    chosen = SCENARIOS[scenario]
    with ScriptedAds(chosen.initial(free_port(), free_port())) as server, client(server):
        server.wait(server.synced, SYNC_TIMEOUT, "the client to ACK every initial type")
        server.quiet(QUIET_SECONDS)
        mark = len(server.snapshot())
        started = time.monotonic()
        chosen.drive(server)
        server.quiet(QUIET_SECONDS)
        seconds = time.monotonic() - started
        events = server.snapshot()
    return Recorded(normalize(events[:mark]), normalize(events[mark:]), events, seconds)


def real_envoy(tmp_path: Path, protocol: str) -> Client:
    @contextmanager
    def run(server: ScriptedAds) -> Iterator[object]:
        envoy = Envoy(
            tmp_path, f"trace-{protocol}", "edge", server.port, api_type=API_TYPES[protocol]
        )
        try:
            yield envoy.start()
        finally:
            envoy.stop()

    return run


def simulated_envoy(protocol: str) -> Client:
    @contextmanager
    def run(server: ScriptedAds) -> Iterator[object]:
        with SimulatedFleet(
            server.target, 1, group="edge", workers=1, channels_per_worker=1, protocol=protocol
        ) as fleet:
            fleet.connect()
            yield fleet

    return run


def side_by_side(envoy: Recorded, simulated: Recorded) -> str:
    return "\n".join(
        [
            "real Envoy:",
            *trace(envoy.events),
            "simulated Envoy:",
            *trace(simulated.events),
        ]
    )


@pytest.mark.envoy
@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("protocol", API_TYPES)
def test_simulated_envoy_sends_what_envoy_sends(
    tmp_path: Path, protocol: str, scenario: str
) -> None:
    envoy = record(scenario, real_envoy(tmp_path, protocol))
    simulated = record(scenario, simulated_envoy(protocol))
    print(f"{protocol} {scenario}: envoy {envoy.seconds:.2f}s, simulated {simulated.seconds:.2f}s")
    print("\n".join(["startup:", *envoy.startup, "scenario:", *envoy.scenario]))
    assert (simulated.startup, simulated.scenario) == (envoy.startup, envoy.scenario), side_by_side(
        envoy, simulated
    )


# -- the simulator's partial NACK, beyond what the normalized sequence shows -----------------


@pytest.mark.parametrize("protocol", API_TYPES)
def test_simulated_partial_nack_applies_the_valid_clusters(protocol: str) -> None:
    """A CDS update with a cluster named invalid-*: the simulated Envoy applies the others
    (subscribes b's endpoints), NACKs naming the invalid one once b is warm, keeps holding
    the version it had, and ACKs the next update that drops the invalid cluster."""
    with (
        ScriptedAds(initial_resources(free_port(), free_port())) as server,
        SimulatedFleet(
            server.target, 1, workers=1, channels_per_worker=1, protocol=protocol
        ) as fleet,
    ):
        fleet.connect()
        server.wait(server.synced, SYNC_TIMEOUT, "the simulated Envoy to sync")
        fleet.watch("v1", {CDS: "1"})
        server.push(CDS, {"a": cluster("a"), "b": cluster("b"), "invalid-c": cluster("invalid-c")})
        server.wait(lambda: server.answered(CDS), 10, "the CDS NACK")
        assert server.answered(CDS, ok=False)
        nack = next(
            e.message for e in reversed(server.snapshot()) if e.incoming and e.type_url == CDS
        )
        assert "invalid-c" in nack.error_detail.message
        assert "Error adding/updating cluster(s) invalid-c" in nack.error_detail.message
        if protocol == "sotw":
            assert nack.version_info == "1"  # the last version accepted
        assert fleet.query("v1").current == 1  # still holds (has ACKed) version 1

        server.push(CDS, {"a": cluster("a"), "b": cluster("b")})
        server.wait(lambda: server.answered(CDS, ok=True), 10, "the CDS ACK")
        fleet.watch("v3", {CDS: "3"})
        result = fleet.wait_until_all("v3", timeout=10)
        assert result.ok and result.count.stream_errors == 0, result.count
    # b was applied by the NACKed update (its endpoints asked for before the NACK), and
    # dropping invalid-c changed nothing else: the next update is ACKed at once.
    steps = normalize(server.snapshot())[-4:]
    if protocol == "sotw":
        expected = [
            "EDS REQ latest [a,b] v=1",
            "CDS NACK latest [] v=1",
            "EDS ACK latest [a,b] v=1",
            "CDS ACK latest [] v=3",
        ]
    else:
        expected = ["EDS +b", "CDS NACK latest", "EDS ACK latest", "CDS ACK latest"]
    assert steps == expected
