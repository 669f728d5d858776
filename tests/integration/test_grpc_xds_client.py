"""gRPC's built-in xDS client (proxyless, `xds:///` target) resolves a service through xdscp.

The chain gRPC asks for by name (gRFC A27): Listener `echo.test` (an api_listener holding an
HttpConnectionManager whose last HTTP filter is the router) -> RDS `echo-route` -> Cluster
`echo-cluster` (EDS over ADS) -> its ClusterLoadAssignment, pointing at a local gRPC server.

Over mTLS, the client's bootstrap names its certificate, key and CA as `tls` channel creds
(gRFC A65), and xdscp's trust domain decides which node id that certificate may claim.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.edge_config import ADS, HCM, ROUTER
from tests.integration.harness import REPO, XdsControlPlane, http_get, wait_for
from tests.integration.pki import Pki

NODE_ID = "grpc-client-1"
SERVICE = "echo.test"
ROUTE_NAME = "echo-route"
CLUSTER_NAME = "echo-cluster"
SECOND_CLUSTER = "echo-cluster-2"
METHOD = "/xdscp.test.Echo/Echo"
TYPES = ("Cluster", "ClusterLoadAssignment", "Listener", "RouteConfiguration")
CLIENT = Path(__file__).with_name("grpc_xds_client.py")
CLIENT_TIMEOUT_S = 30


def start_echo_server(prefix: bytes) -> tuple[grpc.Server, int]:
    """An in-process gRPC server on 127.0.0.1: `/xdscp.test.Echo/Echo` returns prefix + request."""

    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        return prefix + request

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
    return server, port


@pytest.fixture
def echo_backend() -> Iterator[int]:
    """An echo server answering b"echo:" + request; yields its port."""
    server, port = start_echo_server(b"echo:")
    yield port
    server.stop(grace=None).wait(timeout=5)


@pytest.fixture
def echo_backends() -> Iterator[Callable[[bytes], int]]:
    """Starts echo servers answering `prefix` + request; each call returns one's port."""
    servers: list[grpc.Server] = []

    def start(prefix: bytes) -> int:
        server, port = start_echo_server(prefix)
        servers.append(server)
        return port

    yield start
    for server in servers:
        server.stop(grace=None).wait(timeout=5)


def write_grpc_config(
    directory: Path,
    backend_port: int,
    *,
    more_clusters: dict[str, int] | None = None,
    route_to: str = CLUSTER_NAME,
) -> Path:
    """Listener (api_listener) -> RouteConfiguration -> EDS Cluster -> ClusterLoadAssignment.

    The Cluster is `echo-cluster` at `backend_port`, plus one per `more_clusters` entry
    (name -> backend port); the route sends everything to `route_to`.
    """
    directory.mkdir(parents=True, exist_ok=True)
    backends = {CLUSTER_NAME: backend_port, **(more_clusters or {})}
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
                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": route_to}}],
            }
        ],
    }
    clusters = [
        {
            "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            "name": name,
            "type": "EDS",
            "connect_timeout": "1s",
            "lb_policy": "ROUND_ROBIN",
            "eds_cluster_config": {"eds_config": ADS},
        }
        for name in backends
    ]
    endpoints = [
        {
            "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
            "cluster_name": name,
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
                                        "port_value": port,
                                    }
                                }
                            }
                        }
                    ],
                }
            ],
        }
        for name, port in backends.items()
    ]
    for filename, items in (
        ("clusters.yaml", clusters),
        ("endpoints.yaml", endpoints),
        ("listeners.yaml", [listener]),
        ("routes.yaml", [route_config]),
    ):
        (directory / filename).write_text(yaml.safe_dump({"resources": items}, sort_keys=False))
    return directory


def write_bootstrap(
    path: Path, xds_port: int, channel_creds: list[dict[str, Any]] | None = None
) -> Path:
    """gRPC's bootstrap (gRFC A27): xdscp as its one xDS server, reached with `channel_creds`
    (plaintext when None)."""
    bootstrap: dict[str, Any] = {
        "xds_servers": [
            {
                "server_uri": f"127.0.0.1:{xds_port}",
                "channel_creds": channel_creds or [{"type": "insecure"}],
                "server_features": ["xds_v3"],
            }
        ],
        "node": {"id": NODE_ID, "cluster": "default"},
    }
    path.write_text(json.dumps(bootstrap))
    return path


def tls_channel_creds(ca: Path, cert: Path, key: Path) -> list[dict[str, Any]]:
    """mTLS to the xDS server, as gRFC A65 spells it: channel creds of type `tls`, whose config
    is that of the file-watcher certificate provider (gRFC A29). gRPC C-core (grpcio) reads it
    in TlsChannelCredsFactory (src/core/credentials/transport/channel_creds_registry_init.cc),
    which watches the three files with a FileWatcherCertificateProvider and checks the
    server's certificate against the host of `server_uri` (127.0.0.1 is an IP SAN of it)."""
    config = {
        "ca_certificate_file": str(ca),
        "certificate_file": str(cert),
        "private_key_file": str(key),
        "refresh_interval": "60s",  # a google.protobuf.Duration in JSON; default 10 minutes
    }
    return [{"type": "tls", "config": config}]


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


class GrpcClient:
    """grpc_xds_client.py in its own process, resolving `xds:///echo.test` through `plane`;
    `call` makes one more RPC on the same channel. `channel_creds` go to its bootstrap;
    `timeout_s` bounds its wait for a ready channel and each RPC."""

    def __init__(
        self,
        plane: XdsControlPlane,
        tmp_path: Path,
        message: str = "hello",
        *,
        channel_creds: list[dict[str, Any]] | None = None,
        timeout_s: float = CLIENT_TIMEOUT_S,
    ) -> None:
        self.plane = plane
        self.timeout_s = timeout_s
        bootstrap = write_bootstrap(tmp_path / "grpc-bootstrap.json", plane.xds_port, channel_creds)
        self.stdout_path, self.stderr_path = tmp_path / "client.out", tmp_path / "client.err"
        with self.stdout_path.open("wb") as stdout, self.stderr_path.open("wb") as stderr:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    str(CLIENT),
                    f"xds:///{SERVICE}",
                    METHOD,
                    message,
                    str(timeout_s),
                ],
                cwd=REPO,
                env=client_env(bootstrap),
                stdin=subprocess.PIPE,
                stdout=stdout,
                stderr=stderr,
                text=True,
            )

    def lines(self) -> list[str]:
        return self.stdout_path.read_text().splitlines()

    def replies(self) -> list[bytes]:
        return [
            bytes.fromhex(line.removeprefix("REPLY "))
            for line in self.lines()
            if line.startswith("REPLY ")
        ]

    def _running(self, doing: str) -> None:
        if self.process.poll() is not None:
            pytest.fail(
                f"gRPC client exited {self.process.returncode} {doing}\n"
                + describe(self.plane, self.stderr_path)
            )

    def wait_ready(self) -> None:
        def ready() -> bool:
            if "READY" in self.lines():
                return True
            self._running("before its RPC succeeded")
            return False

        wait_for(ready, timeout=self.timeout_s + 10, what="the RPC through xds:///")

    def call(self, message: str, timeout: float = 10) -> str:
        """One more RPC: its answer line, `REPLY <hex>` or `ERROR ...`."""
        assert self.process.stdin is not None
        answered = len([line for line in self.lines() if line.startswith(("REPLY", "ERROR"))])
        self.process.stdin.write(message + "\n")
        self.process.stdin.flush()

        def answer() -> str | None:
            self._running(f"while calling with {message!r}")
            answers = [line for line in self.lines() if line.startswith(("REPLY", "ERROR"))]
            return answers[answered] if len(answers) > answered else None

        return wait_for(answer, timeout=timeout, what=f"the answer to RPC {message!r}")

    def close(self) -> int:
        assert self.process.stdin is not None
        self.process.stdin.close()
        return self.process.wait(timeout=15)

    def wait_exit(self) -> int:
        """Its exit code, once it gives up on its own (within its timeout)."""
        wait_for(
            lambda: self.process.poll() is not None,
            timeout=self.timeout_s + 10,
            what="the gRPC client to give up",
        )
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=5)


def test_grpc_xds_client_resolves_through_xdscp_and_makes_an_rpc(
    control_plane: XdsControlPlane, echo_backend: int, tmp_path: Path
) -> None:
    control_plane.xdsctl("publish", str(write_grpc_config(tmp_path / "grpc", echo_backend)))
    client = GrpcClient(control_plane, tmp_path)
    try:
        client.wait_ready()
        assert client.replies() == [b"echo:hello"]

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

        assert client.close() == 0, describe(control_plane, client.stderr_path)
    finally:
        client.kill()


def subscription_sizes(plane: XdsControlPlane, type_name: str, since: int) -> list[int]:
    """How many names the client's subscription to a type held after each change xdscp logged
    (debug "subscription update" events), from its `since`-th log event on."""
    return [
        event["names"]
        for event in plane.log_events()[since:]
        if event["event"] == "subscription update"
        and event.get("node_id") == NODE_ID
        and event["type_url"].endswith("." + type_name)
    ]


def test_grpc_xds_client_drops_a_cluster_it_no_longer_routes_to_and_keeps_working(
    control_plane: XdsControlPlane, echo_backends: Callable[[bytes], int], tmp_path: Path
) -> None:
    """gRPC subscribes to clusters by name, only to those its routes use. A route change
    makes it subscribe to the new cluster and drop the old one, with no change to either
    cluster: xdscp must answer the subscription change itself."""
    one, two = echo_backends(b"one:"), echo_backends(b"two:")
    both = {SECOND_CLUSTER: two}  # every version holds echo-cluster (-> one) and this one
    control_plane.xdsctl(
        "publish", str(write_grpc_config(tmp_path / "v1", one, more_clusters=both))
    )
    client = GrpcClient(control_plane, tmp_path)
    try:
        client.wait_ready()
        assert client.replies() == [b"one:hello"]
        before = wait_for(
            lambda: all_synced(control_plane, NODE_ID), timeout=10, what="SYNCED on v1"
        )
        node = next(n for n in control_plane.status() if n["node_id"] == NODE_ID)
        changed_at = len(control_plane.log_events())

        # Only the route changes: both clusters and their endpoints stay as they were.
        v2 = write_grpc_config(tmp_path / "v2", one, more_clusters=both, route_to=SECOND_CLUSTER)
        control_plane.xdsctl("publish", str(v2))
        wait_for(
            lambda: client.call("switch") == f"REPLY {b'two:switch'.hex()}",
            timeout=10,
            what=f"RPCs routed to {SECOND_CLUSTER}",
            explain=lambda: describe(control_plane, client.stderr_path),
        )

        def resent_and_synced() -> dict[str, dict[str, Any]] | None:
            types = all_synced(control_plane, NODE_ID)
            if types is None or any(
                types[name]["sent_at"] <= before[name]["sent_at"]
                for name in ("Cluster", "ClusterLoadAssignment")
            ):
                return None
            return types

        # xdscp's status: clusters and endpoints were sent again for the new subscription,
        # though their versions did not change, and the client ACKed them on the same stream.
        after = wait_for(
            resent_and_synced,
            timeout=10,
            what="Cluster and ClusterLoadAssignment re-sent and SYNCED",
            explain=lambda: describe(control_plane, client.stderr_path),
        )
        for name in ("Cluster", "ClusterLoadAssignment"):
            assert after[name]["expected_version"] == before[name]["expected_version"], name
            # The subscription changed, and ended holding one name: the cluster routed to.
            sizes = wait_for(
                lambda n=name: (
                    (s := subscription_sizes(control_plane, n, changed_at)) and s[-1] == 1 and s
                ),
                timeout=10,
                what=f"the client's {name} subscription narrowed to one name",
                explain=lambda n=name: str(subscription_sizes(control_plane, n, changed_at)),
            )
            assert max(sizes) <= 2, sizes
        assert (
            after["RouteConfiguration"]["acked_version"]
            != before["RouteConfiguration"]["acked_version"]
        )
        now = next(n for n in control_plane.status() if n["node_id"] == NODE_ID)
        assert now["stream_id"] == node["stream_id"]  # no reconnect
        assert [e for e in control_plane.log_events() if e["event"] == "nack"] == []

        # The client keeps working on the cluster it kept.
        for message in ("after-1", "after-2", "after-3"):
            assert client.call(message) == f"REPLY {f'two:{message}'.encode().hex()}"
        assert client.close() == 0, describe(control_plane, client.stderr_path)
    finally:
        client.kill()


@pytest.fixture
def mtls_plane(tmp_path: Path) -> Iterator[tuple[XdsControlPlane, Pki]]:
    """xdscp with TLS on both ports and mTLS with node identity on xDS; and its PKI."""
    pki = Pki(tmp_path / "pki")
    plane = XdsControlPlane(tmp_path, *pki.serve_args(), xdsctl_args=pki.xdsctl_args())
    try:
        plane.start()
        yield plane, pki
    finally:
        plane.stop()


def identity_refusals(plane: XdsControlPlane, reason: str) -> float:
    """xdscp_identity_refusals_total{reason=...} from /metrics (0 before the first one)."""
    status, body = http_get(f"http://127.0.0.1:{plane.http_port}/metrics")
    assert status == 200, body
    return sum(
        sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
        if sample.name == "xdscp_identity_refusals_total" and sample.labels == {"reason": reason}
    )


def test_grpc_xds_client_reaches_xdscp_over_mtls_with_its_node_certificate(
    mtls_plane: tuple[XdsControlPlane, Pki], echo_backend: int, tmp_path: Path
) -> None:
    plane, pki = mtls_plane
    serving = next(e for e in plane.log_events() if e["event"] == "serving")
    assert serving["mtls"] == ["xds"]  # no client gets an xDS stream without a certificate
    plane.xdsctl("publish", str(write_grpc_config(tmp_path / "grpc", echo_backend)))
    cert, key = pki.node("default", NODE_ID)  # grants what the bootstrap's node claims
    client = GrpcClient(plane, tmp_path, channel_creds=tls_channel_creds(pki.ca_path, cert, key))
    try:
        client.wait_ready()
        assert client.replies() == [b"echo:hello"]

        types = wait_for(
            lambda: all_synced(plane, NODE_ID),
            timeout=10,
            what=f"{NODE_ID} SYNCED on {', '.join(TYPES)}",
            explain=lambda: describe(plane, client.stderr_path),
        )
        assert not any(t.get("nack_error") for t in types.values()), types
        node = next(n for n in plane.status() if n["node_id"] == NODE_ID)
        assert node["group"] == "default"
        assert "gRPC" in node["user_agent"]
        assert [e for e in plane.log_events() if e["event"] == "identity refused"] == []
        assert identity_refusals(plane, "claim_mismatch") == 0

        assert client.close() == 0, describe(plane, client.stderr_path)
    finally:
        client.kill()


def test_grpc_xds_client_with_a_certificate_for_another_node_is_refused(
    mtls_plane: tuple[XdsControlPlane, Pki], echo_backend: int, tmp_path: Path
) -> None:
    """The same client and bootstrap (node grpc-client-1), with a certificate from the same CA
    that grants node `other-node`: the TLS handshake succeeds, the stream is refused."""
    plane, pki = mtls_plane
    plane.xdsctl("publish", str(write_grpc_config(tmp_path / "grpc", echo_backend)))
    cert, key = pki.node("default", "other-node")
    client = GrpcClient(
        plane,
        tmp_path,
        channel_creds=tls_channel_creds(pki.ca_path, cert, key),
        timeout_s=3,  # it cannot get ready: waiting longer only slows the test
    )
    try:
        refused = wait_for(
            lambda: [e for e in plane.log_events() if e["event"] == "identity refused"],
            timeout=10,
            what="xdscp to refuse the client's claim",
            explain=lambda: describe(plane, client.stderr_path),
        )
        assert refused[0]["reason"] == "claim_mismatch", refused
        # The event has no node_id field (no node is admitted); its error names the claim.
        claim = f"node {NODE_ID!r} of group 'default' is not what the client certificate grants"
        assert claim in refused[0]["error"], refused
        assert "spiffe://xdscp.test/group/default/node/other-node" in refused[0]["error"]
        assert identity_refusals(plane, "claim_mismatch") >= 1
        assert identity_refusals(plane, "no_identity") == 0

        # The client got no config: its channel never became ready, and a call that does not
        # wait for it fails with the resolver's error, which carries xdscp's refusal.
        assert client.wait_exit() == 2, describe(plane, client.stderr_path)
        assert client.replies() == []
        [error] = [line for line in client.lines() if line.startswith("ERROR ")]
        assert error.startswith("ERROR StatusCode.UNAVAILABLE "), error
        assert "PERMISSION_DENIED" in error and claim in error, error
        assert all(n["node_id"] != NODE_ID for n in plane.status())
    finally:
        client.kill()
