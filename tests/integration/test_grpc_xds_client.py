"""gRPC's built-in xDS client (proxyless, `xds:///` target) resolves a service through xdscp.

The chain gRPC asks for by name (gRFC A27): Listener `echo.test` (an api_listener holding an
HttpConnectionManager whose last HTTP filter is the router) -> RDS `echo-route` -> Cluster
`echo-cluster` (EDS over ADS) -> its ClusterLoadAssignment, pointing at a local gRPC server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from tests.integration.edge_config import ADS, HCM, ROUTER
from tests.integration.harness import REPO, XdsControlPlane, wait_for

NODE_ID = "grpc-client-1"
SERVICE = "echo.test"
ROUTE_NAME = "echo-route"
CLUSTER_NAME = "echo-cluster"
METHOD = "/xdscp.test.Echo/Echo"
TYPES = ("Cluster", "ClusterLoadAssignment", "Listener", "RouteConfiguration")
CLIENT = Path(__file__).with_name("grpc_xds_client.py")
CLIENT_TIMEOUT_S = 30


@pytest.fixture
def echo_backend() -> Iterator[int]:
    """An in-process gRPC server on 127.0.0.1: `/xdscp.test.Echo/Echo` returns b"echo:" + request."""

    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        return b"echo:" + request

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "xdscp.test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    assert port != 0, "could not bind the echo backend"
    server.start()
    yield port
    server.stop(grace=None).wait(timeout=5)


def write_grpc_config(directory: Path, backend_port: int) -> Path:
    """Listener (api_listener) -> RouteConfiguration -> EDS Cluster -> ClusterLoadAssignment."""
    directory.mkdir(parents=True, exist_ok=True)
    listener = {
        "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
        "name": SERVICE,
        "api_listener": {
            "api_listener": {
                "@type": HCM,
                # gRPC ignores it, but Envoy's rules require one, and publish enforces them.
                "stat_prefix": "echo",
                "rds": {"route_config_name": ROUTE_NAME, "config_source": ADS},
                "http_filters": [{"name": "router", "typed_config": {"@type": ROUTER}}],
            }
        },
    }
    route_config = {
        "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
        "name": ROUTE_NAME,
        "virtual_hosts": [
            {
                "name": "echo",
                "domains": ["*"],
                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": CLUSTER_NAME}}],
            }
        ],
    }
    cluster = {
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": CLUSTER_NAME,
        "type": "EDS",
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "eds_cluster_config": {"eds_config": ADS},
    }
    endpoints = {
        "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
        "cluster_name": CLUSTER_NAME,
        "endpoints": [
            {
                # gRPC drops a locality whose weight is unset (0): without it, "contains no
                # localities" and the channel stays in TRANSIENT_FAILURE. Envoy does not care.
                "locality": {"zone": "local"},
                "load_balancing_weight": 1,
                "lb_endpoints": [
                    {
                        "endpoint": {
                            "address": {
                                "socket_address": {
                                    "address": "127.0.0.1",
                                    "port_value": backend_port,
                                }
                            }
                        }
                    }
                ],
            }
        ],
    }
    for filename, items in (
        ("clusters.yaml", [cluster]),
        ("endpoints.yaml", [endpoints]),
        ("listeners.yaml", [listener]),
        ("routes.yaml", [route_config]),
    ):
        (directory / filename).write_text(yaml.safe_dump({"resources": items}, sort_keys=False))
    return directory


def write_bootstrap(path: Path, xds_port: int) -> Path:
    bootstrap: dict[str, Any] = {
        "xds_servers": [
            {
                "server_uri": f"127.0.0.1:{xds_port}",
                "channel_creds": [{"type": "insecure"}],
                "server_features": ["xds_v3"],
            }
        ],
        "node": {"id": NODE_ID, "cluster": "default"},
    }
    path.write_text(json.dumps(bootstrap))
    return path


def client_env(bootstrap: Path) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key.lower() not in ("http_proxy", "https_proxy", "grpc_proxy", "all_proxy")
        and not key.startswith("GRPC_")
    }
    env["GRPC_XDS_BOOTSTRAP"] = str(bootstrap)
    return env


def all_synced(plane: XdsControlPlane, node_id: str) -> dict[str, dict[str, Any]] | None:
    types = plane.node_types(node_id)
    if sorted(types) == sorted(TYPES) and all(t["state"] == "SYNCED" for t in types.values()):
        return types
    return None


def describe(plane: XdsControlPlane, stderr_path: Path) -> str:
    """What to show when the client fails: its stderr, xdscp's view, and any NACKs."""
    nacks = [e for e in plane.log_events() if e["event"] == "nack"]
    return (
        f"client stderr:\n{stderr_path.read_text()}\n"
        f"status: {json.dumps(plane.status(), indent=1)}\nnacks: {nacks}"
    )


def test_grpc_xds_client_resolves_through_xdscp_and_makes_an_rpc(
    control_plane: XdsControlPlane, echo_backend: int, tmp_path: Path
) -> None:
    control_plane.xdsctl("publish", str(write_grpc_config(tmp_path / "grpc", echo_backend)))
    bootstrap = write_bootstrap(tmp_path / "grpc-bootstrap.json", control_plane.xds_port)
    stdout_path, stderr_path = tmp_path / "client.out", tmp_path / "client.err"

    with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
        client = subprocess.Popen(
            [
                sys.executable,
                str(CLIENT),
                f"xds:///{SERVICE}",
                METHOD,
                "hello",
                str(CLIENT_TIMEOUT_S),
            ],
            cwd=REPO,
            env=client_env(bootstrap),
            stdin=subprocess.PIPE,
            stdout=stdout,
            stderr=stderr,
        )
    try:

        def client_ready() -> bool:
            if "READY" in stdout_path.read_text().splitlines():
                return True
            if client.poll() is not None:
                pytest.fail(
                    f"gRPC client exited {client.returncode} before its RPC succeeded\n"
                    + describe(control_plane, stderr_path)
                )
            return False

        wait_for(client_ready, timeout=CLIENT_TIMEOUT_S + 10, what="the RPC through xds:///")
        replies = [
            bytes.fromhex(line.removeprefix("REPLY "))
            for line in stdout_path.read_text().splitlines()
            if line.startswith("REPLY ")
        ]
        assert replies == [b"echo:hello"]

        # Still connected: xdscp sees the node and every type of the chain ACKed.
        types = wait_for(
            lambda: all_synced(control_plane, NODE_ID),
            timeout=10,
            what=f"{NODE_ID} SYNCED on {', '.join(TYPES)}",
        )
        assert not any(t.get("nack_error") for t in types.values()), types
        node = next(n for n in control_plane.status() if n["node_id"] == NODE_ID)
        assert node["group"] == "default"
        assert "gRPC" in node["user_agent"]
        assert [e for e in control_plane.log_events() if e["event"] == "nack"] == []

        assert client.stdin is not None
        client.stdin.close()
        assert client.wait(timeout=15) == 0, describe(control_plane, stderr_path)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(timeout=5)
