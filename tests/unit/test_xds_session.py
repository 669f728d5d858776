"""The xDS shell (controlplane/xds/server.py) with a real gRPC client in this process: what a
stream holds while its client reads nothing. Envoy behaviour is proven elsewhere
(tests/integration); this is the shell's own bookkeeping."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from controlplane.observability.metrics import Metrics
from controlplane.resources import CLUSTER, ENDPOINT
from controlplane.snapshot import Snapshot
from controlplane.xds.assignments import Assignments
from controlplane.xds.fleet import Fleet
from controlplane.xds.server import XdsServer
from tests import factories

WAIT_SECONDS = 10.0
PUBLISHES = 20
CLUSTERS = 400  # ~25 KB of CDS per response: a client that reads none fills its window


def big_config(variant: int) -> Snapshot:
    items = []
    for i in range(CLUSTERS):
        name = f"cluster-{i:04d}-{'x' * 20}"
        cluster = factories.cluster(name)
        cluster.connect_timeout.FromSeconds(1 + variant)
        items += [(CLUSTER, cluster), (ENDPOINT, factories.endpoints(name))]
    return Snapshot.from_messages(items)


async def until(condition: object, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
    while not condition():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def test_a_client_that_reads_nothing_holds_one_events_responses_however_often_woken() -> None:
    async def scenario() -> None:
        assignments, fleet = Assignments(), Fleet()
        assignments.subscribe(fleet.wake_all)
        assignments.set_stable("default", big_config(0))
        server = grpc.aio.server(
            options=[("grpc.http2.lookahead_bytes", 1024)],  # small windows: writes stall
        )
        server.add_generic_rpc_handlers(XdsServer(assignments, fleet, Metrics()).handlers())
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{port}",
            options=[("grpc.http2.bdp_probe", 0), ("grpc.max_receive_message_length", 1 << 24)],
        )
        try:
            requests: asyncio.Queue[discovery_pb2.DiscoveryRequest] = asyncio.Queue()

            async def send() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
                while True:
                    yield await requests.get()

            call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(
                send()
            )
            node = base_pb2.Node(id="slow-reader", cluster="default")
            await requests.put(discovery_pb2.DiscoveryRequest(node=node, type_url=CLUSTER))
            await until(lambda: len(fleet) == 1, "the stream to join the fleet")
            [(_, session)] = fleet._streams.values()
            for publish in range(1, PUBLISHES + 1):
                assignments.set_stable("default", big_config(publish))
                await asyncio.sleep(0.02)
                queued = len(session.outbox)  # type: ignore[attr-defined]
                assert queued <= 1, f"{queued} responses queued after {publish} publishes"
            await until(lambda: session.writer is not None, "a write blocked on the client")  # type: ignore[attr-defined]
            # The client reads now: it gets the first response and then only the latest
            # config, not one response per publish.
            versions = []
            async for response in call:
                versions.append(response.version_info)
                await requests.put(
                    discovery_pb2.DiscoveryRequest(
                        type_url=CLUSTER,
                        version_info=response.version_info,
                        response_nonce=response.nonce,
                    )
                )
                if response.version_info == assignments.stable("default").of_type(CLUSTER).version:
                    break
            assert 2 <= len(versions) <= 3, versions
            call.cancel()
        finally:
            await channel.close()
            await server.stop(0)

    asyncio.run(asyncio.wait_for(scenario(), 4 * WAIT_SECONDS))
