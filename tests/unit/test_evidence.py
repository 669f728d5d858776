"""Fleet evidence as replicas write it to the shared database and read it back."""

from __future__ import annotations

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from controlplane.resources import CLUSTER, ENDPOINT
from controlplane.xds.assignments import Assignments
from controlplane.xds.evidence import FleetEvidence, NodeEvidence, from_json, to_json
from controlplane.xds.fleet import WATCH_SLACK, Fleet, NodeStatus, SyncState, TypeStatus
from controlplane.xds.stream import SotwStream
from tests import factories


def evidence() -> NodeEvidence:
    cluster = TypeStatus(CLUSTER, SyncState.NACKED, "v2", "v2", 1.0, "v1", 0.5, "v2", 1.1, "bad")
    status = NodeStatus(
        node_id="edge-1",
        group="edge",
        build_version="1.40.0",
        user_agent="envoy",
        protocol="delta",
        stream_id=7,
        connected_at=0.25,
        snapshot_version="s2",
        types=(cluster,),
        started_empty=True,
        stuck=True,
        stuck_since=2.0,
        missing=("CDS sent, not ACKed",),
        replica="r2",
    )
    return NodeEvidence(
        status=status,
        group="edge",
        canary=True,
        probe=False,
        synced=False,
        warming=False,
        rejection="bad",
        owed=("CLUSTER",),
        first_synced=False,
        first_sync_missing=("CDS sent, not ACKed",),
        last_ack_at=0.5,
    )


def test_evidence_reads_back_as_written() -> None:
    original = evidence()
    assert from_json(to_json(original)) == original
    assert from_json(to_json(original)).key == ("r2", 7)


@pytest.mark.parametrize(
    "text", ["", "[]", '{"status": {}}', to_json(evidence()).replace('"NACKED"', '"GONE"')]
)
def test_evidence_that_is_not_evidence_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not node evidence"):
        from_json(text)


def test_a_tally_nobody_looks_at_stays_small_however_many_streams_come_and_go() -> None:
    """A version's progress, looked at once while its push converged, is not looked at
    again; the streams that change meanwhile must not pile up in it."""
    snapshot = factories.edge_snapshot()
    assignments, fleet = Assignments(), Fleet()
    assignments.set_stable("edge", snapshot)
    evidence = FleetEvidence(fleet, assignments)

    def connect(stream_id: int) -> SotwStream:
        stream = SotwStream(stream_id, assignments.resolve)
        node = base_pb2.Node(id=f"edge-{stream_id}", cluster="edge")
        stream.receive(discovery_pb2.DiscoveryRequest(type_url=CLUSTER, node=node))
        fleet.add(stream, control=None)  # type: ignore[arg-type]
        return stream

    kept = [connect(i) for i in range(3)]
    assert evidence.progress("edge", snapshot.version).total == 3
    fleet.remove(kept[1])  # noted first, then lost among the many that follow
    for stream_id in range(100, 100 + 3 * WATCH_SLACK):  # reconnects, hour after hour
        fleet.remove(connect(stream_id))
    assert all(len(changed) <= len(fleet) + WATCH_SLACK for changed in fleet._watchers)
    fleet.remove(kept[0])
    assert evidence.progress("edge", snapshot.version).total == 1  # still counted right


def test_progress_follows_a_stream_that_comes_to_hold_its_version_without_an_ack() -> None:
    """A request that narrows the last unACKed subscription to nothing completes the sync;
    the shell tells the fleet of the event (touched) but nothing was ACKed."""
    snapshot = factories.edge_snapshot()
    assignments, fleet = Assignments(), Fleet()
    assignments.set_stable("edge", snapshot)
    evidence = FleetEvidence(fleet, assignments)
    stream = SotwStream(1, assignments.resolve)
    node = base_pb2.Node(id="edge-1", cluster="edge")
    [cds] = stream.receive(discovery_pb2.DiscoveryRequest(type_url=CLUSTER, node=node))[2]
    fleet.add(stream, control=None)  # type: ignore[arg-type]
    asked = discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=["web"])
    assert len(stream.receive(asked)[2]) == 1  # the endpoints, before the CDS ACK
    ack = discovery_pb2.DiscoveryRequest(
        type_url=CLUSTER, version_info=cds.version, response_nonce=cds.nonce
    )
    stream.receive(ack)
    fleet.touched(stream)
    fleet.progressed()
    assert evidence.progress("edge", snapshot.version).lagging == 1  # EDS not ACKed
    stale = discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, response_nonce="0.99")
    stream.receive(stale)  # stale, asking for no endpoints any more: nothing left to ACK
    fleet.touched(stream)  # (no ACK: the generation stays)
    assert stream.synced()
    assert evidence.progress("edge", snapshot.version).lagging == 0
