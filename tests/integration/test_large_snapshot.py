"""Operators are never locked out by a large snapshot: with 40,000 clusters on stable (more
than gRPC's default 4 MiB message, and more than one page), `xdsctl publish` (with its
preview), `get` and `diff` still work, and the preview and diff are exactly the diff of the
whole snapshots."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2

from controlplane import resources
from controlplane.admin import limits
from controlplane.admin.v1 import admin_pb2, admin_pb2_grpc
from controlplane.config import snapshot_of
from controlplane.config.environments import load_config
from controlplane.diff import diff_snapshots, render_diff
from controlplane.snapshot import Snapshot
from tests import factories
from tests.integration.harness import REPO, XdsControlPlane

EXAMPLES = REPO / "examples" / "config"
CLUSTERS = 40_000
GRPC_DEFAULT_LIMIT = 4 << 20


def large_snapshot() -> Snapshot:
    """STATIC clusters, the cheapest kind: no endpoints or other resources to go with them."""
    clusters = (
        factories.static_cluster(f"static-cluster-of-a-large-snapshot-{i:05d}", 8000 + i % 1000)
        for i in range(CLUSTERS)
    )
    return Snapshot.from_serialized(
        (resources.CLUSTER, c.name, resources.serialize(c)) for c in clusters
    )


def publish_directly(plane: XdsControlPlane, snapshot: Snapshot) -> str:
    """The request `xdsctl publish` sends, without parsing 40,000 clusters of YAML first."""
    request = admin_pb2.PublishRequest(
        resources=[any_pb2.Any(type_url=r.type_url, value=r.body) for r in snapshot.all_resources()]
    )
    token = plane.token_file.read_text().strip()
    with grpc.insecure_channel(plane.admin_address, options=limits.GRPC_OPTIONS) as channel:
        response = admin_pb2_grpc.AdminStub(channel).Publish(
            request, timeout=120, metadata=(("authorization", f"Bearer {token}"),)
        )
    return response.version


def test_publish_get_and_diff_over_a_stable_of_40000_clusters(control_plane) -> None:
    large = large_snapshot()
    assert large.size_bytes > GRPC_DEFAULT_LIMIT
    assert sum(len(r.wire_entry) for r in large.all_resources()) > limits.PAGE_BYTES  # 2 pages
    assert publish_directly(control_plane, large) == large.version

    examples = snapshot_of(load_config(EXAMPLES).resources)
    expected = render_diff(diff_snapshots(large, examples))
    assert expected.endswith(f"\n14 added, {CLUSTERS} removed, 0 changed\n")

    published = control_plane.xdsctl("publish", str(EXAMPLES))
    assert published.stdout.strip() == examples.version
    assert published.stderr.startswith(
        f"--- group default stable (version {large.version})\n"
        f"+++ version {examples.version}\n" + expected
    )
    assert f"published {examples.version} to group default" in published.stderr

    diffed = control_plane.xdsctl("diff", large.version, examples.version)
    assert diffed.stdout == (
        f"--- version {large.version}\n+++ version {examples.version}\n" + expected
    )

    printed = control_plane.xdsctl("get", large.version).stdout
    assert printed.startswith(f"# xdsctl get {large.version}\nresources:\n")
    assert printed.count(f"- '@type': {resources.CLUSTER}\n") == CLUSTERS
    assert "  name: static-cluster-of-a-large-snapshot-39999\n" in printed
