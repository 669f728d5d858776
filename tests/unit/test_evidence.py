"""Fleet evidence as replicas write it to the shared database and read it back."""

from __future__ import annotations

import pytest

from controlplane.resources import CLUSTER
from controlplane.xds.evidence import NodeEvidence, from_json, to_json
from controlplane.xds.fleet import NodeStatus, SyncState, TypeStatus


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
