"""`xdsctl serve --store-key-file`: the store's files hold no private key, while xDS clients
and `xdsctl get` see the real one; without its key, or with another, the store will not open."""

from __future__ import annotations

import queue
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2

from controlplane import resources
from controlplane.config import snapshot_of
from controlplane.config.environments import load_config
from tests import tls_material
from tests.integration import edge_config
from tests.integration.harness import REPO, XdsControlPlane, free_port, xdsctl

ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
TIMEOUT = 10


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def raw_store_bytes(store: Path) -> bytes:
    wal = store.with_name(store.name + "-wal")
    return store.read_bytes() + (wal.read_bytes() if wal.exists() else b"")


def secret_over_ads(xds_port: int, name: str) -> secret_pb2.Secret:
    """Ask for one secret on an ADS stream, as Envoy does for SDS, and return what comes."""
    requests: queue.Queue[discovery_pb2.DiscoveryRequest | None] = queue.Queue()
    requests.put(
        discovery_pb2.DiscoveryRequest(
            type_url=resources.SECRET,
            resource_names=[name],
            node=base_pb2.Node(id="sds-reader", cluster="default"),
        )
    )
    with grpc.insecure_channel(f"127.0.0.1:{xds_port}") as channel:
        call = channel.stream_stream(
            ADS,
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
        )
        responses = call(iter(requests.get, None), timeout=TIMEOUT)
        response = next(responses)
        requests.put(None)
        responses.cancel()
    assert response.type_url == resources.SECRET and len(response.resources) == 1
    secret = secret_pb2.Secret()
    assert response.resources[0].Unpack(secret)
    return secret


def serve_refused(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`xdsctl serve` on `store`, which must exit with an error instead of serving."""
    any_port = "127.0.0.1:0"
    result = subprocess.run(
        [
            *(sys.executable, "-m", "controlplane.cli.main", "serve", "--store", str(store)),
            *("--xds-address", any_port, "--admin-address", any_port, "--http-address", any_port),
            *args,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result


def write_config(directory: Path, material: tls_material.TlsMaterial) -> Path:
    edge_config.write(
        directory,
        listener_port=free_port(),
        backends={"a": free_port()},
        routes=[edge_config.route_to("a")],
        extra_clusters=[edge_config.sds_tls_cluster("tls-upstream", "edge-cert")],
    )
    secrets = {"resources": [tls_material.secret_yaml("edge-cert", material)]}
    (directory / "secrets.yaml").write_text(yaml.safe_dump(secrets, sort_keys=False))
    return directory


def test_secrets_are_sealed_at_rest_and_served_as_they_are(tmp_path) -> None:
    material = tls_material.generate()
    config = write_config(tmp_path / "config", material)
    (tmp_path / "keys").mkdir()
    key = tmp_path / "keys" / "store.key"
    xdsctl("store-key", "create", str(key))
    assert mode(key) == 0o600
    again = xdsctl("store-key", "create", str(key), check=False)
    assert again.returncode == 1 and f"{key} already exists" in again.stderr

    (tmp_path / "plane").mkdir()
    plane = XdsControlPlane(tmp_path / "plane", "--store-key-file", str(key))
    store = plane.store
    try:
        plane.start()
        version = plane.xdsctl("publish", str(config)).stdout.strip()
        assert version == snapshot_of(load_config(config).resources).version

        got = yaml.safe_load(
            plane.xdsctl("get", version, "--type", "secret", "--show-secrets").stdout
        )
        [secret] = got["resources"]
        assert secret["tls_certificate"]["private_key"]["inline_string"] == material.key_pem
        served = secret_over_ads(plane.xds_port, "edge-cert")
        assert served.tls_certificate.private_key.inline_string == material.key_pem

        assert store.with_name("xdscp.db-wal").stat().st_size > 0
        assert tls_material.forms_found(raw_store_bytes(store), material) == []
        assert b"edge_routes" in raw_store_bytes(store)  # the rest of the config is plain
        assert {mode(p) for p in store.parent.glob("xdscp.db*")} == {0o600}
    finally:
        plane.stop()
    assert tls_material.forms_found(raw_store_bytes(store), material) == []

    without = serve_refused(store)
    assert f"{store} keeps its secrets encrypted" in without.stderr
    assert "--store-key-file" in without.stderr

    other = tmp_path / "keys" / "other.key"
    xdsctl("store-key", "create", str(other))
    wrong = serve_refused(store, "--store-key-file", str(other))
    assert f"--store-key-file {other} is not the key of {store}" in wrong.stderr

    key.chmod(0o644)
    open_key = serve_refused(store, "--store-key-file", str(key))
    assert f"store key file {key} has mode 0644" in open_key.stderr
    key.chmod(0o600)

    short = tmp_path / "keys" / "short.key"
    short.write_bytes(b"too short")
    short.chmod(0o600)
    malformed = serve_refused(store, "--store-key-file", str(short))
    assert f"store key file {short} holds 9 bytes" in malformed.stderr
    assert "32 bytes, raw or base64 (44 characters)" in malformed.stderr

    missing = serve_refused(store, "--store-key-file", str(tmp_path / "keys" / "gone.key"))
    assert "gone.key: No such file or directory" in missing.stderr

    try:
        plane.start()  # with the right key again: the same version, the same secret
        again_got = yaml.safe_load(
            plane.xdsctl("get", version, "--type", "secret", "--show-secrets").stdout
        )
        assert again_got == got
    finally:
        plane.stop()
