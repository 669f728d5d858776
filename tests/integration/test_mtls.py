"""Trust on the xDS port, with real clients: a real Envoy over mTLS, clients refused during
the handshake or for claiming what their certificate does not grant, secrets only to their
owners, canaries that must prove it, and certificate files swapped under running streams."""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2

from controlplane import certgen
from controlplane.resources import SECRET
from tests.integration import edge_config
from tests.integration.ads_client import AckingNode
from tests.integration.harness import (
    ENVOY_BINARY,
    Envoy,
    XdsControlPlane,
    free_port,
    http_get,
    wait_for,
    xdsctl,
)
from tests.integration.pki import TRUST_DOMAIN, Pki

ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
ANSWER_WAIT_S = 3.0  # how long a client listens for what it should not get


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
def plane(tmp_path: Path, pki: Pki) -> Iterator[XdsControlPlane]:
    plane = XdsControlPlane(
        tmp_path, *pki.serve_args(admin_mtls=True), xdsctl_args=pki.xdsctl_args()
    ).start()
    yield plane
    plane.stop()


def metric(plane: XdsControlPlane, name: str, **labels: str) -> float:
    _, text = http_get(f"http://127.0.0.1:{plane.http_port}/metrics", timeout=5)
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.compile(rf"^{name}(?:\{{{re.escape(wanted)}\}})? (\S+)$", re.M)
    match = pattern.search(text)
    return float(match.group(1)) if match else 0.0


def logged(plane: XdsControlPlane, event: str, **fields: str) -> list[dict[str, Any]]:
    return [
        e
        for e in plane.log_events()
        if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
    ]


def sotw_secrets(
    plane: XdsControlPlane,
    credentials: grpc.ChannelCredentials,
    node: base_pb2.Node,
    names: list[str],
) -> set[str]:
    """Ask for secrets by name over state-of-the-world ADS; the names of those received."""
    request = discovery_pb2.DiscoveryRequest(type_url=SECRET, node=node, resource_names=names)
    got: set[str] = set()
    for response in _stream(plane, credentials, "StreamAggregatedResources", request):
        for packed in discovery_pb2.DiscoveryResponse.FromString(response).resources:
            got.add(_secret_name(packed.value))
    return got


def delta_secrets(
    plane: XdsControlPlane,
    credentials: grpc.ChannelCredentials,
    node: base_pb2.Node,
    names: list[str],
) -> set[str]:
    request = discovery_pb2.DeltaDiscoveryRequest(
        type_url=SECRET, node=node, resource_names_subscribe=names
    )
    got: set[str] = set()
    for response in _stream(plane, credentials, "DeltaAggregatedResources", request):
        for resource in discovery_pb2.DeltaDiscoveryResponse.FromString(response).resources:
            got.add(resource.name)
    return got


def _secret_name(body: bytes) -> str:
    from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

    return secret_pb2.Secret.FromString(body).name


def _stream(
    plane: XdsControlPlane, credentials: grpc.ChannelCredentials, method: str, request: Any
) -> Iterator[bytes]:
    """The responses to one request, until the server ends the stream or ANSWER_WAIT_S pass."""
    with grpc.secure_channel(f"127.0.0.1:{plane.xds_port}", credentials) as channel:
        call = channel.stream_stream(
            ADS + method, request_serializer=type(request).SerializeToString
        )
        try:
            yield from call(iter([request]), timeout=ANSWER_WAIT_S)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:  # type: ignore[attr-defined]
                raise


def node(node_id: str, group: str, **metadata: str) -> base_pb2.Node:
    n = base_pb2.Node(id=node_id, cluster=group)
    n.metadata.CopyFrom(
        struct_pb2.Struct(fields={k: struct_pb2.Value(string_value=v) for k, v in metadata.items()})
    )
    return n


def start_envoy(
    tmp_path: Path, pki: Pki, plane: XdsControlPlane, node_id: str, group: str, **bootstrap: Any
) -> Envoy:
    cert, key = pki.node(group, node_id)
    return Envoy(
        tmp_path,
        node_id,
        group,
        plane.xds_port,
        xds_transport_socket=pki.envoy_transport_socket(cert, key),
        **bootstrap,
    ).start()


def test_a_real_envoy_over_mtls_gets_its_config_and_serves_traffic(
    tmp_path, pki, plane, upstream
) -> None:
    backend = upstream("a")
    port = free_port()
    directory = edge_config.write(
        tmp_path / "v1",
        listener_port=port,
        backends={"a": backend.port},
        routes=[edge_config.route_to("a")],
        eds_initial_fetch_timeout="0s",
    )
    plane.xdsctl("publish", str(directory), "--group", "edge")
    envoy = start_envoy(tmp_path, pki, plane, "edge-1", "edge", cds_initial_fetch_timeout="0s")
    try:
        url = f"http://127.0.0.1:{port}/hello"
        wait_for(
            lambda: http_get(url, timeout=2)[1].startswith("backend=a"),
            what="traffic through the Envoy that reached xdscp over mTLS",
        )
        assert envoy.stats()["cluster.xds.ssl.handshake"] == "1"
        # The admin port asks xdsctl for its client certificate too.
        types = plane.node_types("edge-1")
        assert types and all(t["state"] == "SYNCED" for t in types.values())
        without_client_cert = xdsctl(
            "status",
            *("--server", plane.admin_address, "--tls-ca", str(pki.ca_path)),
            *("--token-file", str(plane.token_file)),  # a token, but no client certificate
            check=False,
        )
        assert without_client_cert.returncode == 1
        assert "cannot reach xdscp" in without_client_cert.stderr
    finally:
        envoy.stop()


@pytest.mark.parametrize(
    ("client", "reason"),
    [("no certificate", "no_client_certificate"), ("another CA", "untrusted_certificate")],
)
def test_a_client_without_a_certificate_from_the_ca_is_refused_at_the_handshake(
    pki, plane, client, reason
) -> None:
    cert = key = None
    if client == "another CA":
        cert, key = pki.issue(
            "impostor",
            certgen.node_uri(TRUST_DOMAIN, "edge", "edge-1"),
            ca=certgen.new_ca("another CA"),
        )
    with pytest.raises(grpc.RpcError) as refused:
        sotw_secrets(plane, pki.credentials(cert, key), node("edge-1", "edge"), ["edge_cert"])
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    wait_for(
        lambda: logged(plane, "tls handshake refused", reason=reason),
        timeout=10,
        what=f"the log line for {reason}",
    )
    assert metric(plane, "xdscp_tls_handshake_failures_total", reason=reason) >= 1


@pytest.mark.parametrize(
    ("san", "claim", "reason"),
    [
        ("spiffe://xdscp.test/group/edge/node/edge-1", ("edge-2", "edge"), "claim_mismatch"),
        ("spiffe://xdscp.test/group/edge/node/edge-1", ("edge-1", "payments"), "claim_mismatch"),
        ("spiffe://xdscp.test/group/edge/node/edge-1", ("edge-1", ""), "claim_mismatch"),
        ("spiffe://elsewhere.test/group/edge/node/edge-1", ("edge-1", "edge"), "no_identity"),
    ],
)
def test_a_claim_the_certificate_does_not_grant_is_refused(pki, plane, san, claim, reason) -> None:
    cert, key = pki.issue("claimant", san)
    with pytest.raises(grpc.RpcError) as refused:
        sotw_secrets(plane, pki.credentials(cert, key), node(*claim), ["edge_cert"])
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert san in refused.value.details()
    lines = logged(plane, "identity refused", reason=reason)
    assert [(e["node_id"], e["group"]) for e in lines] == [(claim[0], claim[1] or "default")]
    assert metric(plane, "xdscp_identity_refusals_total", reason=reason) == 1


def _tls_config(directory: Path, pki: Pki, group: str, secrets: dict[str, bool]) -> Path:
    """A cluster using an upstream TLS certificate from SDS for each secret marked True;
    every secret in `secrets` is published, used or not."""
    directory.mkdir(parents=True)
    material = certgen.issue(pki.ca, f"{group} upstream client")
    clusters, resources = [], []
    for name, used in secrets.items():
        resources.append(
            {
                "@type": SECRET_TYPE,
                "name": name,
                "tls_certificate": {
                    "certificate_chain": {"inline_string": material.cert_pem.decode()},
                    "private_key": {"inline_string": material.key_pem.decode()},
                },
            }
        )
        if used:
            cluster = edge_config.sds_tls_cluster(f"{group}-{name}-upstream", name)
            clusters.append(cluster)
    (directory / "clusters.yaml").write_text(yaml.safe_dump({"resources": clusters}))
    (directory / "secrets.yaml").write_text(yaml.safe_dump({"resources": resources}))
    return directory


@pytest.mark.parametrize("protocol", ["sotw", "delta"])
def test_a_node_gets_only_the_secrets_its_own_group_uses(tmp_path, pki, plane, protocol) -> None:
    for group, secrets in (
        ("edge", {"edge_cert": True, "edge_spare_key": False}),
        ("payments", {"payments_cert": True}),
        ("default", {"default_cert": True}),
    ):
        directory = _tls_config(tmp_path / group, pki, group, secrets)
        plane.xdsctl("publish", str(directory), "--group", group)
    ask = sotw_secrets if protocol == "sotw" else delta_secrets
    every = ["edge_cert", "edge_spare_key", "payments_cert", "default_cert"]

    edge = pki.credentials(*pki.node("edge", "edge-1"))
    assert ask(plane, edge, node("edge-1", "edge"), every) == {"edge_cert"}
    payments = pki.credentials(*pki.node("payments", "pay-1"))
    assert ask(plane, payments, node("pay-1", "payments"), every) == {"payments_cert"}
    # A group with no config of its own is served default's config, but not its keys.
    lonely = pki.credentials(*pki.node("lonely", "lonely-1"))
    assert ask(plane, lonely, node("lonely-1", "lonely"), every) == set()
    default = pki.credentials(*pki.node("default", "d-1"))
    assert ask(plane, default, node("d-1", "default"), every) == {"default_cert"}
    # Each refusal is explained once in the log, naming what was not served.
    unserved = logged(plane, "secrets not served")
    assert {(e["node_id"], tuple(e["names"])) for e in unserved} == {
        ("edge-1", ("default_cert", "edge_spare_key", "payments_cert")),
        ("pay-1", ("default_cert", "edge_cert", "edge_spare_key")),
        ("lonely-1", tuple(sorted(every))),
        ("d-1", ("edge_cert", "edge_spare_key", "payments_cert")),
    }


def test_canaries_must_prove_it_before_their_acks_count(tmp_path, pki) -> None:
    """The attack from the issue: fake clients that say `canary: "true"` got a candidate
    promoted. Now metadata counts only from a certificate with the canary role."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        yaml.safe_dump(
            {
                "groups": {
                    "edge": {
                        "canary": {"metadata": {"canary": "true"}},
                        "min_existing": 2,
                        "bake_seconds": 0.5,
                        "ack_timeout_seconds": 10,
                        "deadline_seconds": 60,
                    }
                }
            }
        )
    )
    plane = XdsControlPlane(
        tmp_path, *pki.serve_args(), "--rollout-policy", str(policy), xdsctl_args=pki.xdsctl_args()
    ).start()
    clients: list[AckingNode] = []
    try:
        for i in (1, 2):
            credentials = pki.credentials(*pki.node("edge", f"fake-{i}"))
            clients.append(
                AckingNode(plane.xds_port, f"fake-{i}", "edge", {"canary": "true"}, credentials)
            )
        wait_for(lambda: len(plane.status()) == 2, what="both fakes connected")
        _publish_clusters(tmp_path / "v0", plane, "z")  # a group's first publish: to stable
        wait_for(lambda: all(CLUSTER_TYPE in c.acked for c in clients), what="v0 ACKed")
        on_stable = [c.acked[CLUSTER_TYPE] for c in clients]
        first = _publish_clusters(tmp_path / "v1", plane, "a")
        wait_for(lambda: _rollout(plane).get("phase") == "canary", what="v1 staged")
        # Past the bake several times over, with both fakes ACKing whatever they get: nothing
        # they said made them canaries, so the gate still waits for two.
        watched_until = time.monotonic() + 3
        while time.monotonic() < watched_until:
            rollout = _rollout(plane)
            assert rollout["phase"] == "canary", rollout
            time.sleep(0.2)
        assert [c.acked[CLUSTER_TYPE] for c in clients] == on_stable  # never the candidate
        assert plane.xdsctl("rollout", "abort", "--group", "edge").returncode == 0

        for i in (1, 2):
            credentials = pki.credentials(*pki.node("edge", f"canary-{i}", canary=True))
            clients.append(
                AckingNode(plane.xds_port, f"canary-{i}", "edge", {"canary": "true"}, credentials)
            )
        wait_for(lambda: len(plane.status()) == 4, what="both proven canaries connected")
        second = _publish_clusters(tmp_path / "v2", plane, "b")
        assert second != first
        wait_for(
            lambda: _rollout(plane).get("phase") == "promoted",
            timeout=30,
            what="promotion on the ACKs of two proven canaries",
        )
    finally:
        for client in clients:
            client.close()
        plane.stop()


CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"


def _publish_clusters(directory: Path, plane: XdsControlPlane, name: str) -> str:
    edge_config.write_clusters(directory, [edge_config.static_cluster(name)])
    return plane.xdsctl("publish", str(directory), "--group", "edge").stdout.strip()


def _rollout(plane: XdsControlPlane) -> dict[str, Any]:
    listed = json.loads(plane.xdsctl("rollout", "status", "--json").stdout)
    return next((r for r in listed.get("rollouts", []) if r["group"] == "edge"), {})


def _served_certificate(port: int, pki: Pki) -> x509.Certificate:
    """The certificate a new connection to the port is shown, checked against the CA."""
    context = ssl.create_default_context(cafile=str(pki.ca_path))
    context.load_cert_chain(pki.directory / "admin-client.pem", pki.directory / "admin-client.key")
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_swapped_certificate_files_serve_new_connections_while_streams_keep_running(
    tmp_path, pki, plane
) -> None:
    before = _served_certificate(plane.xds_port, pki)
    _publish_clusters(tmp_path / "v1", plane, "a")
    envoy = start_envoy(tmp_path, pki, plane, "edge-1", "edge", cds_initial_fetch_timeout="0s")
    try:
        wait_for(lambda: "a" in envoy.cluster_names(), what="v1 on the Envoy")

        renewed = certgen.issue(
            pki.ca, "localhost", dns_names=["localhost"], ip_addresses=["127.0.0.1"]
        )
        for data, name in ((renewed.key_pem, "server.key"), (renewed.cert_pem, "server.pem")):
            staged = pki.directory / f".{name}.new"
            staged.write_bytes(data)
            os.replace(staged, pki.directory / name)  # as cert-manager and SPIRE swap files

        after = _served_certificate(plane.xds_port, pki)
        assert after.serial_number != before.serial_number
        assert after.public_bytes(Encoding.PEM) == renewed.cert_pem
        assert _served_certificate(plane.admin_port, pki).serial_number == after.serial_number
        # The Envoy's stream, opened on the old certificate, carries the next publish.
        _publish_clusters(tmp_path / "v2", plane, "b")
        wait_for(lambda: "b" in envoy.cluster_names(), what="v2 on the same stream")
        assert envoy.stats()["cluster.xds.upstream_cx_total"] == "1"
        assert metric(plane, "xdscp_tls_reloads_total", port="xds", result="loaded") == 2
        assert metric(
            plane, "xdscp_tls_certificate_expiry_timestamp_seconds", port="xds"
        ) == pytest.approx(renewed_not_after(renewed), abs=1)
    finally:
        envoy.stop()


def renewed_not_after(issued: certgen.Issued) -> float:
    return x509.load_pem_x509_certificate(issued.cert_pem).not_valid_after_utc.timestamp()


def test_with_tls_on_xds_the_fresh_probe_reaches_xdscp_over_its_unix_socket(tmp_path, pki) -> None:
    """The probe's Envoy has no client certificate: with TLS on xDS it must still connect,
    count as the fresh canary, and let a good candidate through."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        yaml.safe_dump(
            {
                "groups": {
                    "edge": {
                        "canary": {"node_id": "no-such-node"},
                        "min_existing": 0,
                        "min_fresh": 1,
                        "bake_seconds": 0.5,
                        "deadline_seconds": 60,
                        "fresh_probe": {
                            "envoy_binary": str(ENVOY_BINARY),
                            "ready_timeout_seconds": 20,
                            "isolate_network": False,
                        },
                    }
                }
            }
        )
    )
    plane = XdsControlPlane(
        tmp_path, *pki.serve_args(), "--rollout-policy", str(policy), xdsctl_args=pki.xdsctl_args()
    ).start()
    try:
        _publish_clusters(tmp_path / "v0", plane, "z")  # a group's first publish: to stable
        _publish_clusters(tmp_path / "v1", plane, "a")
        rollout = wait_for(
            lambda: (r := _rollout(plane)).get("phase") in ("promoted", "aborted") and r,
            timeout=45,
            what="the probe's verdict",
        )
        assert rollout["phase"] == "promoted", rollout
        assert (tmp_path / "xds.sock").stat().st_mode & 0o777 == 0o600
    finally:
        plane.stop()
