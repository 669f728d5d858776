"""The xDS shell (controlplane/xds/server.py) with a real gRPC client in this process: what a
stream holds, and what it still notices, while its client reads nothing. Envoy behaviour is
proven elsewhere (tests/integration); this is the shell's own bookkeeping."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from controlplane.observability.metrics import Metrics
from controlplane.resources import CLUSTER, ENDPOINT
from controlplane.snapshot import Snapshot
from controlplane.xds.assignments import Assignments
from controlplane.xds.fleet import Fleet
from controlplane.xds.server import Deadlines, XdsServer
from tests import factories

WAIT_SECONDS = 10.0


def big_config(variant: int, clusters: int = 400) -> Snapshot:
    """~60 bytes of CDS per cluster: a few hundred fill a client's window that reads none."""
    items = []
    for i in range(clusters):
        name = f"cluster-{i:04d}-{'x' * 20}"
        cluster = factories.cluster(name)
        cluster.connect_timeout.FromSeconds(1 + variant)
        items += [(CLUSTER, cluster), (ENDPOINT, factories.endpoints(name))]
    return Snapshot.from_messages(items)


async def until(condition: Callable[[], object], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@dataclass
class SlowReader:
    """One ADS stream whose client has sent a CDS request and reads nothing until asked."""

    assignments: Assignments
    session: Any  # the stream's _Session
    call: Any
    requests: asyncio.Queue[discovery_pb2.DiscoveryRequest]


@contextlib.asynccontextmanager
async def slow_reader(config: Snapshot, **server_args: Any) -> AsyncIterator[SlowReader]:
    assignments, fleet = Assignments(), Fleet()
    assignments.subscribe(fleet.wake_all)
    assignments.set_stable("default", config)
    server = grpc.aio.server(options=[("grpc.http2.lookahead_bytes", 1024)])
    server.add_generic_rpc_handlers(
        XdsServer(assignments, fleet, Metrics(), **server_args).handlers()
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{port}",  # no window growth: writes stall once the window is full
        options=[("grpc.http2.bdp_probe", 0), ("grpc.max_receive_message_length", 1 << 24)],
    )
    requests: asyncio.Queue[discovery_pb2.DiscoveryRequest] = asyncio.Queue()

    async def send() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        while True:
            yield await requests.get()

    call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(send())
    try:
        node = base_pb2.Node(id="slow-reader", cluster="default")
        await requests.put(discovery_pb2.DiscoveryRequest(node=node, type_url=CLUSTER))
        await until(lambda: len(fleet) == 1, "the stream to join the fleet")
        [(_, session)] = fleet._streams.values()
        yield SlowReader(assignments, session, call, requests)
    finally:
        call.cancel()
        await channel.close()
        await server.stop(0)


def test_a_client_that_reads_nothing_holds_one_events_responses_however_often_woken() -> None:
    async def scenario() -> None:
        async with slow_reader(big_config(0)) as client:
            for publish in range(1, 21):
                client.assignments.set_stable("default", big_config(publish))
                await asyncio.sleep(0.02)
                queued = len(client.session.outbox)
                assert queued <= 1, f"{queued} responses queued after {publish} publishes"
            await until(lambda: client.session.writer is not None, "a write blocked")
            # The client reads now: what was in flight, then only the latest config.
            latest = client.assignments.stable("default").of_type(CLUSTER).version
            versions = []
            async for response in client.call:
                versions.append(response.version_info)
                await client.requests.put(
                    discovery_pb2.DiscoveryRequest(
                        type_url=CLUSTER,
                        version_info=response.version_info,
                        response_nonce=response.nonce,
                    )
                )
                if response.version_info == latest:
                    break
            assert 2 <= len(versions) <= 3, versions

    asyncio.run(asyncio.wait_for(scenario(), 4 * WAIT_SECONDS))


def test_a_first_sync_that_runs_out_of_time_is_marked_while_a_write_is_blocked() -> None:
    """The first CDS response alone overfills the window: it is never written, and the
    node is still marked stuck when its first sync runs out of time."""

    async def scenario() -> None:
        config = big_config(0, clusters=2000)
        async with slow_reader(config, first_sync_timeout=0.5) as client:
            await until(lambda: client.session.writer is not None, "a write blocked")
            assert not client.session.stream.stuck
            await until(lambda: client.session.stream.stuck, "the node marked stuck")
            assert client.session.writer is not None  # the write never ended

    asyncio.run(asyncio.wait_for(scenario(), 4 * WAIT_SECONDS))


class TickedSession:
    """What Deadlines needs of a session: its deadline, and a tick to take."""

    def __init__(self) -> None:
        self.deadline: float | None = None
        self.ticked_at: list[float] = []

    def on_tick(self) -> None:
        self.ticked_at.append(time.monotonic())


async def test_deadlines_tick_each_session_once_never_early_and_at_most_a_slot_late() -> None:
    deadlines = Deadlines()
    now = time.monotonic()
    moved, kept, dropped, same_slot = (TickedSession() for _ in range(4))
    deadlines.move(moved, now + 0.05)
    deadlines.move(moved, now + 0.2)  # moved later: only the new deadline ticks
    deadlines.move(kept, now + 0.1)
    deadlines.move(same_slot, now + 0.1)
    deadlines.move(dropped, now + 0.1)
    deadlines.move(dropped, None)
    await until(lambda: moved.ticked_at and kept.ticked_at and same_slot.ticked_at, "the ticks")
    await asyncio.sleep(0.2)  # nothing else comes
    slot = Deadlines.SLOT_SECONDS
    assert len(moved.ticked_at) == len(kept.ticked_at) == len(same_slot.ticked_at) == 1
    assert dropped.ticked_at == [] and moved.deadline is None
    for session, due in ((moved, now + 0.2), (kept, now + 0.1), (same_slot, now + 0.1)):
        assert due <= session.ticked_at[0] < due + slot + 0.1  # (0.1: a busy machine's lag)


class FailingSession(TickedSession):
    def on_tick(self) -> None:
        super().on_tick()
        raise RuntimeError("a bug in one stream's tick")


async def test_a_tick_that_fails_is_reported_and_the_others_due_with_it_still_tick() -> None:
    deadlines, loop = Deadlines(), asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    due = time.monotonic() + 0.05
    sessions = [FailingSession(), TickedSession(), FailingSession(), TickedSession()]
    for session in sessions:
        deadlines.move(session, due)
    await until(lambda: all(s.ticked_at for s in sessions), "every session's tick")
    assert [len(s.ticked_at) for s in sessions] == [1, 1, 1, 1]
    assert all(s.deadline is None for s in sessions)
    assert [type(r["exception"]) for r in reported] == [RuntimeError, RuntimeError]
    loop.set_exception_handler(None)


def test_convergence_is_seen_when_a_nack_completes_the_sync() -> None:
    """A NACK that narrows a subscription to nothing leaves the node holding all it asks
    for: the shell must look for convergence after it, not only after ACKs."""

    async def scenario() -> None:
        config = factories.edge_snapshot()
        async with slow_reader(config) as client:
            cds = await client.call.read()
            await client.requests.put(  # as Envoy: endpoints for the new cluster, then the ACK
                discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=["web"])
            )
            eds = await client.call.read()
            await client.requests.put(
                discovery_pb2.DiscoveryRequest(
                    type_url=CLUSTER, version_info=cds.version_info, response_nonce=cds.nonce
                )
            )
            await until(lambda: client.session.stream.types[CLUSTER].acked_version, "the ACK")
            assert eds.type_url == ENDPOINT and client.session.converged_on is None
            nack = discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, response_nonce=eds.nonce)
            nack.error_detail.message = "rejected; and no endpoints wanted any more"
            await client.requests.put(nack)
            await until(lambda: client.session.converged_on == config.version, "convergence")

    asyncio.run(asyncio.wait_for(scenario(), 4 * WAIT_SECONDS))
