"""HTTP/2 keepalive on Envoy's xDS connection.

deploy/envoy/bootstrap-ads.yaml has Envoy ping xdscp on its xDS connection. A gRPC server
with default settings answers frequent pings with GOAWAY `too_many_pings`: Envoy logs
`closed ... 14, Too many pings` and reconnects, every few seconds. xdscp must accept pings
down to one a second, so a state-of-the-world Envoy and a delta Envoy pinging every second
each keep their one connection.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration import edge_config
from tests.integration.harness import Envoy, XdsControlPlane, wait_for

OBSERVE_SECONDS = 30.0
PROTOCOLS = {"keepalive-sotw": "GRPC", "keepalive-delta": "DELTA_GRPC"}


def keepalive_interval(envoy: Envoy) -> str | None:
    """The interval of the keepalive Envoy runs its xds cluster with (from its config_dump)."""
    for cluster in envoy.config_dump("static_clusters"):
        if cluster["cluster"]["name"] == "xds":
            options = cluster["cluster"]["typed_extension_protocol_options"]
            http = next(iter(options.values()))["explicit_http_config"]
            return http["http2_protocol_options"].get("connection_keepalive", {}).get("interval")
    return None


def stream_ids(plane: XdsControlPlane) -> dict[str, int]:
    return {n["node_id"]: int(n["stream_id"]) for n in plane.status() if n["node_id"] in PROTOCOLS}


def test_envoy_pinging_every_second_keeps_one_xds_connection(
    control_plane: XdsControlPlane, start_envoy: Callable[..., Envoy], tmp_path: Path
) -> None:
    directory = edge_config.write_clusters(tmp_path / "v1", [edge_config.static_cluster("a")])
    control_plane.xdsctl("publish", str(directory), "--group", "edge")
    envoys = [
        start_envoy(
            node_id, "edge", control_plane.xds_port, api_type=api, xds_keepalive_interval="1s"
        )
        for node_id, api in PROTOCOLS.items()
    ]
    for envoy in envoys:
        assert keepalive_interval(envoy) == "1s", envoy.node_id
    streams = wait_for(
        lambda: len(ids := stream_ids(control_plane)) == len(PROTOCOLS) and ids,
        timeout=10,
        what="both Envoys connected to xdscp",
    )

    deadline = time.monotonic() + OBSERVE_SECONDS
    while time.monotonic() < deadline:
        for envoy in envoys:
            connections = envoy.stats()["cluster.xds.upstream_cx_total"]
            if connections != "1":
                pytest.fail(
                    f"{envoy.node_id} opened {connections} xDS connections within "
                    f"{OBSERVE_SECONDS:g}s; its log ends:\n{envoy.log_path.read_text()[-2000:]}"
                )
        time.sleep(1)

    for envoy in envoys:
        assert envoy.stats()["control_plane.connected_state"] == "1", envoy.node_id
        assert "Too many pings" not in envoy.log_path.read_text(), envoy.node_id
    assert stream_ids(control_plane) == streams  # the same streams, never reopened
