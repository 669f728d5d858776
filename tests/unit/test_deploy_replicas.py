"""docker-compose.replicas.yml, checked without a Docker engine: each replica's `xdsctl serve`
would start (real parser and app.Config: PostgreSQL store, TLS, shared tokens), they differ
only in --replica-id, the database service is what their --store names, the one address in
front reaches every replica and only ready ones, the Envoys and xdsctl go through it, and
each secret reaches only its readers. Envoy validates the front's config, and the secrets
one-shot runs, in tests/integration/test_deploy_files.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from psycopg import conninfo

from controlplane.rollout.policy import load_policies
from tests.deploy_layout import (
    MAIN,
    REPLICAS,
    assert_served_safely,
    dry_run,
    serve_config,
)

FRONT = "xdscp"  # the one address: docker-compose.yml's name for xdscp itself


def replicas() -> list[str]:
    return sorted(
        name
        for name, service in REPLICAS.services.items()
        if service.get("command", [None])[0] == "serve"
    )


def store_url() -> dict[str, str]:
    """libpq's reading of the replicas' --store (one URL: checked below)."""
    [url] = {str(dry_run(REPLICAS.services[name]["command"]).store) for name in replicas()}
    return {key: str(value) for key, value in conninfo.conninfo_to_dict(url).items()}


def port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def front_config() -> dict[str, Any]:
    return yaml.safe_load(REPLICAS.host_path(FRONT, "/etc/envoy/envoy.yaml").read_text())


def test_there_are_two_replicas_and_one_front() -> None:
    assert replicas() == ["xdscp-1", "xdscp-2"]
    assert REPLICAS.data["name"] != "xdscp"  # its own project: no volume shared with MAIN
    assert REPLICAS.services[FRONT]["image"] == MAIN.services["envoy-web"]["image"]


@pytest.mark.parametrize("replica", ["xdscp-1", "xdscp-2"])
def test_replica_serve_would_start_on_postgresql_with_tls(replica: str) -> None:
    argv = REPLICAS.services[replica]["command"]
    policy = REPLICAS.host_path(replica, str(dry_run(argv).rollout_policy))
    assert "edge" in load_policies(policy)
    config = serve_config(argv, policy)
    assert_served_safely(config)
    assert config.database is not None
    assert config.database.password is None  # it comes from PGPASSFILE, never from the URL
    assert str(config.state_dir) == "/var/lib/xdscp"  # the image's home of uid 10001
    for token_file in (config.admin_token_file, config.admin_read_token_file):
        assert token_file is not None
        assert REPLICAS.mount_of(replica, str(token_file))[0] == "admin-tokens"


def test_replicas_differ_only_in_replica_id() -> None:
    def without_id(argv: list[str]) -> list[str]:
        return [a for a in argv if not a.startswith("--replica-id=")]

    commands = [REPLICAS.services[name]["command"] for name in replicas()]
    ids = [dry_run(argv).replica_id for argv in commands]
    assert ids == replicas(), "each replica names itself as its service is named"
    assert all(without_id(c) == without_id(commands[0]) for c in commands)
    # The same image, files and secrets (a YAML merge of one block), each its own /metrics.
    for key in ("build", "environment", "volumes", "healthcheck", "depends_on"):
        assert len({repr(REPLICAS.services[n][key]) for n in replicas()}) == 1, key
    published = [REPLICAS.services[n]["ports"] for n in replicas()]
    assert len({str(p) for p in published}) == len(published)


def test_database_is_the_postgres_service_and_ready_first() -> None:
    url = store_url()
    postgres = REPLICAS.services[url["host"]]
    assert postgres["image"] == "postgres:16"
    env = postgres["environment"]
    assert (env["POSTGRES_USER"], env["POSTGRES_DB"]) == (url["user"], url["dbname"])
    assert url.get("port", "5432") == "5432"
    assert "password" not in url
    test = postgres["healthcheck"]["test"]
    assert test[:2] == ["CMD", "pg_isready"] and f"--dbname={url['dbname']}" in test
    assert ("pgdata", "/var/lib/postgresql/data") in REPLICAS.mounts("postgres")
    password_file = env["POSTGRES_PASSWORD_FILE"]
    assert REPLICAS.mount_of("postgres", password_file)[0] == "db-password"
    for name in replicas():
        depends = REPLICAS.services[name]["depends_on"]
        assert depends[url["host"]] == {"condition": "service_healthy"}
        assert depends["secrets"] == depends["certgen"]
        assert depends["certgen"] == {"condition": "service_completed_successfully"}


def test_secrets_one_shot_writes_the_password_libpq_looks_up() -> None:
    """Its pgpass entry is for exactly the --store's host, port, database and user, at the
    path PGPASSFILE names, on a volume only the replicas and the one-shot mount."""
    url = store_url()
    secrets = REPLICAS.services["secrets"]
    [entry] = secrets["command"]
    assert entry == f"{url['host']}:{url.get('port', '5432')}:{url['dbname']}:{url['user']}"
    for name in replicas():
        pgpass = REPLICAS.services[name]["environment"]["PGPASSFILE"]
        source, target = REPLICAS.mount_of(name, pgpass)
        assert Path(pgpass).relative_to(target) == Path("pgpass")
        assert REPLICAS.volume_dir(Path("/"), source) == Path("/secrets/pgpass")

    readers = {
        "admin-tokens": {"secrets", "publish", *replicas()},
        "db-password": {"secrets", "postgres"},
        "xdscp-pgpass": {"secrets", *replicas()},
        "pki": {"certgen"},
    }
    for volume, wanted in readers.items():
        users = {n for n in REPLICAS.services if volume in dict(REPLICAS.mounts(n))}
        assert users == wanted, volume
        for name in users - {"secrets", "certgen", "postgres"}:
            [spec] = [v for v in REPLICAS.services[name]["volumes"] if v.startswith(volume + ":")]
            assert spec.endswith(":ro"), f"{name}: {spec}"


def test_certgen_is_docker_compose_ymls() -> None:
    """The same certificates, so the Envoy bootstraps and their checks are MAIN's."""
    assert REPLICAS.services["certgen"] == MAIN.services["certgen"]
    for envoy in ("envoy-canary", "envoy-web"):
        assert REPLICAS.mounts(envoy) == MAIN.mounts(envoy)


def endpoints(cluster: dict[str, Any]) -> set[tuple[str, int, int]]:
    """(host, port, health check port) of each endpoint."""
    return {
        (
            e["endpoint"]["address"]["socket_address"]["address"],
            e["endpoint"]["address"]["socket_address"]["port_value"],
            e["endpoint"]["health_check_config"]["port_value"],
        )
        for locality in cluster["load_assignment"]["endpoints"]
        for e in locality["lb_endpoints"]
    }


def test_front_sends_xds_and_admin_to_every_ready_replica() -> None:
    """A TCP proxy per port (TLS passes through to the replica), to every replica's own
    port, skipping a replica whose /readyz fails: the check the replica's healthcheck makes."""
    config = front_config()
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    args = {name: dry_run(REPLICAS.services[name]["command"]) for name in replicas()}
    [xds_port] = {port(a.xds_address) for a in args.values()}
    [admin_port] = {port(a.admin_address) for a in args.values()}
    [http_port] = {port(a.http_address) for a in args.values()}
    for name in replicas():
        assert f"127.0.0.1:{http_port}/readyz" in " ".join(
            REPLICAS.services[name]["healthcheck"]["test"]
        )

    proxied = {}
    for listener in config["static_resources"]["listeners"]:
        [chain] = listener["filter_chains"]
        [proxy] = chain["filters"]
        assert proxy["name"] == "envoy.filters.network.tcp_proxy"
        assert "transport_socket" not in chain  # no TLS ends here
        proxied[listener["address"]["socket_address"]["port_value"]] = proxy["typed_config"]
    assert set(proxied) == {xds_port, admin_port}
    for listen_port, proxy in proxied.items():
        cluster = clusters[proxy["cluster"]]
        assert "transport_socket" not in cluster
        assert endpoints(cluster) == {(name, listen_port, http_port) for name in replicas()}
        [check] = cluster["health_checks"]
        assert check["http_health_check"]["path"] == "/readyz"


def test_envoys_and_xdsctl_use_the_one_address() -> None:
    front_ports = {
        listener["address"]["socket_address"]["port_value"]
        for listener in front_config()["static_resources"]["listeners"]
    }
    envoys = [
        name
        for name in REPLICAS.services
        if name != FRONT and "/etc/envoy/envoy.yaml" in {t for _, t in REPLICAS.mounts(name)}
    ]
    assert envoys, "no Envoy points at the front"
    for name in envoys:
        bootstrap = yaml.safe_load(REPLICAS.host_path(name, "/etc/envoy/envoy.yaml").read_text())
        [cluster] = bootstrap["static_resources"]["clusters"]
        [endpoint] = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        address = endpoint["endpoint"]["address"]["socket_address"]
        assert address["address"] == FRONT and address["port_value"] in front_ports
        assert REPLICAS.services[name]["depends_on"][FRONT] == {"condition": "service_started"}

    publish = dry_run(REPLICAS.services["publish"]["command"])
    assert (
        publish.server
        == f"{FRONT}:{port(dry_run(REPLICAS.services['xdscp-1']['command']).admin_address)}"
    )
    assert REPLICAS.mount_of("publish", str(publish.token_file))[0] == "admin-tokens"
    assert REPLICAS.services["publish"]["environment"] == MAIN.services["publish"]["environment"]
    for name in replicas():  # `exec xdscp-N xdsctl ...` reaches that replica, write role
        env = REPLICAS.services[name]["environment"]
        serve = dry_run(REPLICAS.services[name]["command"])
        assert env["XDSCTL_SERVER"] == f"127.0.0.1:{port(serve.admin_address)}"
        assert env["XDSCTL_TOKEN_FILE"] == str(serve.admin_token_file)
