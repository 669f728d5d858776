"""The first-sync rule on the stream core: a fresh Envoy stuck in initialization shows on its
own stream. Driven like Envoy drives a stream, with a fake clock; no sockets, no sleeping."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2

from controlplane.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE
from controlplane.snapshot import Snapshot
from controlplane.xds.assignments import Assignments
from controlplane.xds.fleet import Fleet
from controlplane.xds.stream import Send, SotwStream
from tests import factories
from tests.unit.test_stream import request

ENVOY = base_pb2.Node(id="edge-1", cluster="edge", user_agent_name="envoy")
TIMEOUT = 30.0
START = 1000.0


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


class FreshEnvoy:
    """An Envoy starting from nothing on ADS: CDS first, LDS only once clusters are ready."""

    def __init__(self, snapshot: Snapshot, node: base_pb2.Node = ENVOY) -> None:
        assignments = Assignments()
        assignments.set_stable("edge", snapshot)
        self.clock = Clock()
        self.stream = SotwStream(
            1,
            assignments.resolve,
            clock=self.clock,
            monotonic=self.clock,
            first_sync_timeout=TIMEOUT,
        )
        self.node = node
        self.pending: dict[str, Send] = {}

    def ask(self, type_url: str, *, version: str = "", names: tuple[str, ...] = ()) -> None:
        req = request(type_url, version=version, names=names)
        if self.stream.node is None:
            req.node.CopyFrom(self.node)
        self._take(self.stream.receive(req)[2])

    def ack(self, type_url: str, names: tuple[str, ...] = ()) -> None:
        sent = self.pending.pop(type_url)
        req = request(type_url, version=sent.version, nonce=sent.nonce, names=names)
        self._take(self.stream.receive(req)[2])

    def wait(self, seconds: float) -> None:
        """Let time pass, ticking the stream at each deadline it asks for, as the shell does."""
        until = self.clock.now + seconds
        while (deadline := self.stream.next_deadline()) is not None and deadline <= until:
            self.clock.now = deadline
            self._take(self.stream.on_tick())
        self.clock.now = until

    def clusters_ready(self) -> None:
        """Ask for and ACK CDS and its endpoints, as an Envoy whose clusters initialize."""
        self.ask(CLUSTER)
        self.ask(ENDPOINT, names=("api", "web"))
        self.ack(ENDPOINT, names=("api", "web"))
        self.ack(CLUSTER)

    def _take(self, sends: list[Send]) -> None:
        self.pending.update({send.type_url: send for send in sends})


def test_a_fresh_envoy_that_acks_clusters_but_never_asks_for_listeners_is_stuck() -> None:
    envoy = FreshEnvoy(factories.edge_snapshot())
    envoy.clusters_ready()
    assert envoy.stream.next_deadline() == START + TIMEOUT
    envoy.wait(TIMEOUT - 1)
    assert not envoy.stream.stuck  # still within its time

    envoy.wait(1)
    assert envoy.stream.stuck
    assert envoy.stream.stuck_since == START + TIMEOUT
    assert envoy.stream.first_sync_missing() == ("never asked for LDS",)
    assert envoy.stream.next_deadline() is None  # nothing more to time

    [node] = fleet_of(envoy).status()
    assert (node.stuck, node.stuck_since, node.missing) == (
        True,
        START + TIMEOUT,
        ("never asked for LDS",),
    )


def test_a_fresh_envoy_that_asks_for_listeners_and_never_acks_them_is_stuck() -> None:
    envoy = FreshEnvoy(factories.edge_snapshot())
    envoy.clusters_ready()
    envoy.ask(LISTENER)
    envoy.wait(TIMEOUT)
    assert envoy.stream.stuck
    assert envoy.stream.first_sync_missing() == ("LDS sent, not ACKed",)


def test_a_fresh_envoy_whose_clusters_never_warm_misses_cds_and_lds() -> None:
    envoy = FreshEnvoy(factories.edge_snapshot())
    envoy.ask(CLUSTER)  # never ACKed: a cluster never finishes initializing
    envoy.wait(TIMEOUT)
    assert envoy.stream.first_sync_missing() == ("CDS sent, not ACKed", "never asked for LDS")


def test_a_fresh_envoy_that_finishes_in_time_is_never_stuck() -> None:
    envoy = FreshEnvoy(factories.edge_snapshot())
    envoy.clusters_ready()
    envoy.ask(LISTENER)
    envoy.ask(ROUTE, names=("routes",))
    envoy.ack(ROUTE, names=("routes",))
    envoy.ack(LISTENER)
    assert envoy.stream.first_synced_at == START
    assert envoy.stream.next_deadline() is None
    envoy.wait(TIMEOUT * 10)
    assert not envoy.stream.stuck
    assert not fleet_of(envoy).status()[0].stuck


def test_a_stuck_envoy_that_finishes_later_is_no_longer_stuck() -> None:
    """After a rollback removes what held it, Envoy initializes and asks for listeners."""
    envoy = FreshEnvoy(factories.edge_snapshot())
    envoy.clusters_ready()
    envoy.wait(TIMEOUT)
    assert envoy.stream.stuck
    envoy.wait(5)
    envoy.ask(LISTENER)
    envoy.ack(LISTENER)
    assert not envoy.stream.stuck
    assert envoy.stream.first_synced_at == START + TIMEOUT + 5
    assert envoy.stream.first_sync_missing() == ()


def test_an_envoy_reconnecting_with_config_is_not_stuck() -> None:
    snapshot = factories.edge_snapshot()
    envoy = FreshEnvoy(snapshot)
    envoy.ask(CLUSTER, version=snapshot.of_type(CLUSTER).version)  # it holds clusters
    envoy.ask(LISTENER, version=snapshot.of_type(LISTENER).version)
    assert envoy.stream.first_synced_at == START
    envoy.wait(TIMEOUT * 2)
    assert not envoy.stream.started_empty
    assert not envoy.stream.stuck


def test_an_envoy_reconnecting_with_a_cluster_still_warming_is_not_stuck() -> None:
    """It holds old clusters and listeners and serves; its CDS ACK waits for the warming."""
    envoy = FreshEnvoy(factories.edge_snapshot())
    envoy.ask(CLUSTER, version="older")
    envoy.ask(LISTENER, version="older")
    envoy.wait(10)  # listeners wait for the CDS ACK, for at most the warming timeout
    envoy.ack(LISTENER)
    envoy.wait(TIMEOUT - 10)
    assert envoy.stream.first_sync_missing() == ("CDS sent, not ACKed",)
    assert not envoy.stream.stuck
    assert envoy.stream.next_deadline() is None  # judged once: not timed again


def test_an_envoy_reconnecting_still_stuck_in_initialization_is_stuck() -> None:
    """xdscp restarted while the Envoy was stuck: it reports the clusters it ACKed, and
    still never asks for listeners."""
    snapshot = factories.edge_snapshot()
    envoy = FreshEnvoy(snapshot)
    envoy.ask(CLUSTER, version=snapshot.of_type(CLUSTER).version)
    envoy.wait(TIMEOUT)
    assert not envoy.stream.started_empty
    assert envoy.stream.stuck
    assert envoy.stream.first_sync_missing() == ("never asked for LDS",)


def test_a_node_of_a_group_without_config_is_timed_from_its_first_snapshot() -> None:
    assignments = Assignments()
    clock = Clock()
    stream = SotwStream(
        1, assignments.resolve, clock=clock, monotonic=clock, first_sync_timeout=TIMEOUT
    )
    req = request(CLUSTER)
    req.node.CopyFrom(ENVOY)
    assert stream.receive(req)[2] == []  # nothing to send: no config for group edge
    clock.now += TIMEOUT
    assert stream.on_tick() == []
    assert not stream.stuck
    assert stream.next_deadline() is None  # no deadline in the past: the shell would spin

    clock.now += 100
    assignments.set_stable("edge", factories.edge_snapshot())
    stream.on_snapshot(assignments.resolve(stream.node))  # type: ignore[arg-type]
    assert stream.next_deadline() == clock.now + TIMEOUT
    clock.now += TIMEOUT
    stream.on_tick()
    assert stream.stuck
    assert stream.first_sync_missing() == ("CDS sent, not ACKed", "never asked for LDS")


def test_a_client_that_is_not_envoy_is_held_only_to_the_types_it_asks_for() -> None:
    """gRPC's xDS client asks for a listener by name first, never for every cluster."""
    grpc_client = base_pb2.Node(id="grpc-1", cluster="edge", user_agent_name="gRPC C-core")
    envoy = FreshEnvoy(factories.edge_snapshot(), node=grpc_client)
    envoy.ask(LISTENER, names=("http",))
    envoy.ack(LISTENER, names=("http",))
    assert envoy.stream.first_synced_at == START
    envoy.wait(TIMEOUT)
    assert not envoy.stream.stuck


def fleet_of(envoy: FreshEnvoy) -> Fleet:
    class Control:
        def wake(self) -> None:
            pass

        def close(self) -> None:
            pass

    fleet = Fleet()
    fleet.add(envoy.stream, Control())
    return fleet
