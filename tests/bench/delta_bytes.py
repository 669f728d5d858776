"""Bytes on the wire when 1 of N clusters changes: delta versus state of the world.

    python -m tests.bench.delta_bytes [--clusters 1000]

Drives one SotwStream and one DeltaStream (the server's own protocol core, no sockets) like
an Envoy subscribed to every cluster, publishes a snapshot where one cluster changed, and
prints the bytes each protocol sends for that update. Bytes are exact, not timings.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from controlplane.resources import CLUSTER
from controlplane.snapshot import Snapshot
from controlplane.xds.delta import DeltaStream
from controlplane.xds.stream import Send, SotwStream, XdsStream
from tests import factories

NODE = base_pb2.Node(id="bench-1", cluster="bench")


@dataclass(frozen=True)
class Result:
    clusters: int
    sotw_initial: int
    sotw_update: int
    delta_initial: int
    delta_update: int


def clusters(count: int, changed_timeout: int = 1) -> Snapshot:
    items = []
    for i in range(count):
        cluster = factories.cluster(f"cluster-{i:04d}")
        if i == 0:
            cluster.connect_timeout.FromSeconds(changed_timeout)
        items.append((CLUSTER, cluster))
        items.append(
            (factories.resources.ENDPOINT, factories.endpoints(f"cluster-{i:04d}", 8000 + i))
        )
    return Snapshot.from_messages(items)


def _ack(stream: XdsStream, sent: Send) -> None:
    if isinstance(stream, SotwStream):
        reply = discovery_pb2.DiscoveryRequest(
            type_url=sent.type_url, version_info=sent.version, response_nonce=sent.nonce
        )
    else:
        reply = discovery_pb2.DeltaDiscoveryRequest(
            type_url=sent.type_url, response_nonce=sent.nonce
        )
    assert stream.receive(reply)[2] == []


def measure(count: int) -> Result:
    before, after = clusters(count), clusters(count, changed_timeout=2)
    sizes: dict[str, tuple[int, int]] = {}
    for stream, first in (
        (
            SotwStream(1, lambda node: before),
            discovery_pb2.DiscoveryRequest(type_url=CLUSTER, node=NODE),
        ),
        (
            DeltaStream(2, lambda node: before),
            discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER, node=NODE),
        ),
    ):
        [initial] = stream.receive(first)[2]
        _ack(stream, initial)
        [update] = stream.on_snapshot(after)
        _ack(stream, update)
        sizes[stream.protocol] = (len(initial.payload), len(update.payload))
    return Result(count, *sizes["sotw"], *sizes["delta"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clusters", type=int, default=1000)
    result = measure(parser.parse_args().clusters)
    print(f"clusters: {result.clusters}, one changed")
    print(
        f"state of the world: initial {result.sotw_initial:>9,} B   update {result.sotw_update:>9,} B"
    )
    print(
        f"delta:              initial {result.delta_initial:>9,} B   update {result.delta_update:>9,} B"
    )
    print(
        f"update bytes, delta / state of the world: {result.delta_update / result.sotw_update:.4f}"
    )


if __name__ == "__main__":
    main()
