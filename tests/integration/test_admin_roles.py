"""Admin roles and secrets, end to end against `xdsctl serve`: every admin call needs a token;
the read token reads but changes nothing and never sees key material; the write token sees
it only when it asks (--show-secrets)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from controlplane.admin.v1 import admin_pb2, admin_pb2_grpc
from controlplane.redaction import REDACTED
from tests import factories
from tests.integration import edge_config
from tests.integration.harness import XdsControlPlane, free_port, http_get

SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


def write_config(directory: Path, keys: factories.KeyPair) -> Path:
    """The edge config, plus an SDS secret and a cluster with its own inline TLS key."""
    certificate = {
        "certificate_chain": {"inline_string": keys.certificate},
        "private_key": {"inline_string": keys.private_key},
    }
    tls_cluster = {
        "@type": edge_config.CLUSTER,
        "name": "mtls_upstream",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": edge_config.load_assignment("mtls_upstream", free_port()),
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": UPSTREAM_TLS,
                "common_tls_context": {"tls_certificates": [certificate]},
            },
        },
    }
    edge_config.write(
        directory,
        listener_port=free_port(),
        backends={"a": free_port()},
        routes=[edge_config.route_to("a")],
        extra_clusters=[tls_cluster],
    )
    secret = {"@type": SECRET, "name": "edge_tls", "tls_certificate": certificate}
    (directory / "secrets.yaml").write_text(yaml.safe_dump({"resources": [secret]}))
    return directory


def key_lines(keys: factories.KeyPair) -> list[str]:
    """The base64 lines of the private key: none of them may ever be printed."""
    return [line for line in keys.private_key.splitlines() if "-----" not in line]


def assert_no_key(text: str, keys: factories.KeyPair) -> None:
    assert "PRIVATE KEY" not in text
    assert not [line for line in key_lines(keys) if line in text]


def call(plane: XdsControlPlane, method: str, request: Any, token_file: Path | None) -> Any:
    metadata = ()
    if token_file is not None:
        metadata = (("authorization", f"Bearer {token_file.read_text().strip()}"),)
    with grpc.insecure_channel(plane.admin_address) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        return getattr(stub, method)(request, timeout=10, metadata=metadata)


def refused_total(plane: XdsControlPlane, reason: str) -> float:
    status, body = http_get(f"http://127.0.0.1:{plane.http_port}/metrics")
    assert status == 200
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == "xdscp_admin_refused_total" and sample.labels == {"reason": reason}:
                return sample.value
    pytest.fail(f"xdscp_admin_refused_total{{reason={reason!r}}} is not exposed")


def test_reads_need_a_token_and_the_read_token_changes_nothing(control_plane, tmp_path) -> None:
    plane = control_plane
    read = plane.read_token_file
    keys = factories.key_pair()
    version = plane.xdsctl("publish", str(write_config(tmp_path / "v1", keys))).stdout.strip()

    with pytest.raises(grpc.RpcError) as refused:
        call(plane, "GetFleetStatus", admin_pb2.GetFleetStatusRequest(), None)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    details = refused.value.details()
    assert "XDSCTL_TOKEN" in details and "--token-file" in details
    assert str(plane.token_file) in details and str(read) in details
    [line] = [e for e in plane.log_events() if e["event"] == "admin call refused"]
    assert line["reason"] == "no_token" and line["method"].endswith("/GetFleetStatus")
    assert line["level"] == "warning"
    assert refused_total(plane, "no_token") == 1
    assert refused_total(plane, "needs_write_role") == 0

    # The read token reads...
    assert plane.xdsctl("status", token_file=read).returncode == 0
    history = plane.xdsctl("snapshots", "--json", token_file=read).stdout
    assert plane.xdsctl("rollout", "status", token_file=read).returncode == 0

    # ... and cannot change anything: not through xdsctl, not through the API.
    again = edge_config.write(
        tmp_path / "v2", listener_port=free_port(), backends={"b": 1}, routes=[]
    )
    published = plane.xdsctl("publish", str(again), token_file=read, check=False)
    assert published.returncode == 1
    assert "permission_denied" in published.stderr
    assert "needs the write role" in published.stderr
    rolled_back = plane.xdsctl("rollback", "--timeout", "1", token_file=read, check=False)
    assert rolled_back.returncode == 1
    assert "permission_denied: Rollback needs the write role" in rolled_back.stderr
    for method, request in (
        ("Publish", admin_pb2.PublishRequest()),
        ("Rollback", admin_pb2.RollbackRequest(to_version=version)),
        ("Abort", admin_pb2.RolloutCommand()),
    ):
        with pytest.raises(grpc.RpcError) as denied:
            call(plane, method, request, read)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert denied.value.details().startswith(f"{method} needs the write role;")
    assert plane.xdsctl("snapshots", "--json", token_file=read).stdout == history
    assert refused_total(plane, "needs_write_role") == 5


def test_secrets_are_redacted_unless_the_write_token_asks(control_plane, tmp_path) -> None:
    plane = control_plane
    read = plane.read_token_file
    keys = factories.key_pair()
    version = plane.xdsctl("publish", str(write_config(tmp_path / "v1", keys))).stdout.strip()

    for token_file in (read, plane.token_file):
        shown = plane.xdsctl("get", version, "--type", "secret", token_file=token_file).stdout
        assert_no_key(shown, keys)
        [secret] = yaml.safe_load(shown)["resources"]
        assert secret["tls_certificate"]["private_key"] == {"inline_string": REDACTED}
        assert secret["tls_certificate"]["certificate_chain"] == {"inline_string": keys.certificate}
    everything = plane.xdsctl("get", version, token_file=read).stdout
    assert_no_key(everything, keys)
    assert everything.count(REDACTED) == 2  # the secret's key and the cluster's inline one

    with_secrets = plane.xdsctl("get", version, "--show-secrets").stdout
    [secret] = [r for r in yaml.safe_load(with_secrets)["resources"] if r["@type"] == SECRET]
    assert secret["tls_certificate"]["private_key"] == {"inline_string": keys.private_key}
    # What --show-secrets prints is the config itself: it publishes back to the same version.
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "all.yaml").write_text(with_secrets)
    assert "unchanged" in plane.xdsctl("publish", str(tmp_path / "again")).stderr

    denied = plane.xdsctl("get", version, "--show-secrets", token_file=read, check=False)
    assert denied.returncode == 1
    assert "permission_denied: GetSnapshot with include_secrets needs the write role" in (
        denied.stderr
    )
    assert str(plane.token_file) in denied.stderr
    assert denied.stdout == ""

    # A new key: the publish preview says the key changed, and never shows either key.
    new_keys = factories.key_pair()
    published = plane.xdsctl("publish", str(write_config(tmp_path / "v2", new_keys)))
    second = published.stdout.strip()
    assert "~ secret edge_tls" in published.stderr
    assert 'tls_certificate.private_key.inline_string: "[redacted ' in published.stderr
    assert_no_key(published.stderr, keys)
    assert_no_key(published.stderr, new_keys)
    diff = plane.xdsctl("diff", version, second, token_file=read).stdout
    assert "~ secret edge_tls" in diff  # its certificate changed too
    assert_no_key(diff, keys)
    assert_no_key(diff, new_keys)
    shown_diff = plane.xdsctl("diff", version, second, "--show-secrets").stdout
    assert key_lines(new_keys)[0] in shown_diff

    log = plane.log_path.read_text()
    assert_no_key(log, keys)
    assert_no_key(log, new_keys)
