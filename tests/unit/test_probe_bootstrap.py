"""The fresh probe's generated Envoy bootstrap: a pure function, checked without sockets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from envoy.config.core.v3 import address_pb2

from controlplane import resources
from controlplane.rollout.probe import (
    CHECK_NAME,
    LOG_TAIL_BYTES,
    LOG_TAIL_LINES,
    PROBE_METADATA,
    XDS_CLUSTER,
    HttpCheck,
    ProbeConfig,
    ProbeSetupError,
    XdsEndpoint,
    _Paths,
    check_target,
    envoy_command,
    new_node_id,
    probe_bootstrap,
    run_probe,
)
from controlplane.snapshot import Snapshot
from tests import factories

WORKDIR = Path("/tmp/xdscp-probe-test")
XDS = XdsEndpoint(tcp=("127.0.0.1", 18000), unix_socket=Path("/run/xdscp/xds.sock"))


def candidate(listener_address: str = "127.0.0.1", port: int = 10080) -> Snapshot:
    listener = factories.listener("edge_http", "routes", port)
    listener.address.socket_address.address = listener_address
    return Snapshot.from_messages(
        [
            (resources.CLUSTER, factories.cluster("web")),
            (resources.ENDPOINT, factories.endpoints("web")),
            (resources.LISTENER, listener),
            (resources.ROUTE, factories.routes("routes", "web")),
        ]
    )


def bootstrap(config: ProbeConfig, snapshot: Snapshot | None = None, **kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "node_id": "xdscp-probe-edge-0123abcd",
        "group": "edge",
        "metadata": PROBE_METADATA,
        "candidate": snapshot or candidate(),
        "xds": XDS,
        "workdir": WORKDIR,
    }
    return probe_bootstrap(config, **{**args, **kw})


def endpoint_address(cluster: dict[str, Any]) -> dict[str, Any]:
    (locality,) = cluster["load_assignment"]["endpoints"]
    (lb_endpoint,) = locality["lb_endpoints"]
    return lb_endpoint["endpoint"]["address"]


def static_cluster(config: dict[str, Any], name: str) -> dict[str, Any]:
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == name]
    return cluster


def test_node_identity_and_metadata() -> None:
    config = bootstrap(ProbeConfig(Path("/bin/envoy")), metadata={"xdscp.probe": "true", "k": "v"})
    assert config["node"] == {
        "id": "xdscp-probe-edge-0123abcd",
        "cluster": "edge",
        "metadata": {"xdscp.probe": "true", "k": "v"},
    }


def test_node_ids_are_unique_and_name_the_group() -> None:
    ids = {new_node_id("edge") for _ in range(50)}
    assert len(ids) == 50
    assert all(
        i.startswith("xdscp-probe-edge-") and len(i) == len("xdscp-probe-edge-") + 8 for i in ids
    )


def test_admin_is_on_a_pipe_in_the_workdir() -> None:
    config = bootstrap(ProbeConfig(Path("/bin/envoy")))
    assert config["admin"] == {"address": {"pipe": {"path": str(WORKDIR / "admin.sock")}}}


def test_ads_for_clusters_and_listeners() -> None:
    dynamic = bootstrap(ProbeConfig(Path("/bin/envoy")))["dynamic_resources"]
    ads = dynamic["ads_config"]
    assert ads["api_type"] == "GRPC"
    assert ads["set_node_on_first_message_only"] is True
    (service,) = ads["grpc_services"]
    assert service["envoy_grpc"]["cluster_name"] == XDS_CLUSTER
    assert "retry_back_off" in service["envoy_grpc"]["retry_policy"]
    assert dynamic["cds_config"]["ads"] == {} and dynamic["lds_config"]["ads"] == {}


def test_xds_over_tcp_when_not_isolated() -> None:
    config = bootstrap(ProbeConfig(Path("/bin/envoy")))
    xds = static_cluster(config, XDS_CLUSTER)
    assert endpoint_address(xds) == {
        "socket_address": {"address": "127.0.0.1", "port_value": 18000}
    }
    assert "http2_protocol_options" in str(xds["typed_extension_protocol_options"])
    assert "listeners" not in config["static_resources"]  # no check, no check listener


def test_xds_over_the_unix_socket_when_isolated() -> None:
    config = bootstrap(ProbeConfig(Path("/bin/envoy"), isolate_network=True))
    assert endpoint_address(static_cluster(config, XDS_CLUSTER)) == {
        "pipe": {"path": "/run/xdscp/xds.sock"}
    }


def test_xds_over_the_unix_socket_when_there_is_no_tcp() -> None:
    config = bootstrap(
        ProbeConfig(Path("/bin/envoy")), xds=XdsEndpoint(unix_socket=Path("/run/xdscp/xds.sock"))
    )
    assert endpoint_address(static_cluster(config, XDS_CLUSTER)) == {
        "pipe": {"path": "/run/xdscp/xds.sock"}
    }


def test_isolated_without_a_unix_socket_is_an_error() -> None:
    with pytest.raises(ProbeSetupError, match="Unix socket"):
        bootstrap(
            ProbeConfig(Path("/bin/envoy"), isolate_network=True),
            xds=XdsEndpoint(tcp=("127.0.0.1", 18000)),
        )


def test_a_socket_path_too_long_for_sun_path_is_an_error() -> None:
    with pytest.raises(ProbeSetupError, match="longer than 107"):
        bootstrap(ProbeConfig(Path("/bin/envoy")), workdir=Path("/tmp/" + "x" * 120))


def test_check_listener_on_a_pipe_proxies_to_the_candidate_listener() -> None:
    check = HttpCheck(listener="edge_http", path="/healthz", host="example.com")
    config = bootstrap(ProbeConfig(Path("/bin/envoy"), check=check), candidate(port=10080))
    (listener,) = config["static_resources"]["listeners"]
    assert listener["name"] == CHECK_NAME
    assert listener["address"] == {"pipe": {"path": str(WORKDIR / "check.sock")}}
    (chain,) = listener["filter_chains"]
    (proxy,) = chain["filters"]
    assert proxy["typed_config"]["@type"].endswith("tcp_proxy.v3.TcpProxy")
    assert proxy["typed_config"]["cluster"] == CHECK_NAME
    assert endpoint_address(static_cluster(config, CHECK_NAME)) == {
        "socket_address": {"address": "127.0.0.1", "port_value": 10080}
    }


@pytest.mark.parametrize(
    ("listens_on", "reached_at"),
    [("0.0.0.0", "127.0.0.1"), ("::", "::1"), ("127.0.0.2", "127.0.0.2"), ("::1", "::1")],
)
def test_check_target_maps_wildcards_to_loopback(listens_on: str, reached_at: str) -> None:
    assert check_target(candidate(listens_on, 8443), "edge_http") == (reached_at, 8443)


def test_check_on_a_missing_listener_is_an_error() -> None:
    config = ProbeConfig(Path("/bin/envoy"), check=HttpCheck(listener="nope"))
    with pytest.raises(ProbeSetupError, match="'nope' is not in the candidate"):
        bootstrap(config)


def test_check_on_a_listener_without_a_socket_address_is_an_error() -> None:
    listener = factories.listener("on_pipe", "routes")
    listener.address.CopyFrom(address_pb2.Address(pipe=address_pb2.Pipe(path="/tmp/l.sock")))
    snapshot = Snapshot.from_messages(
        [
            (resources.CLUSTER, factories.cluster("web")),
            (resources.ENDPOINT, factories.endpoints("web")),
            (resources.LISTENER, listener),
            (resources.ROUTE, factories.routes("routes", "web")),
        ]
    )
    config = ProbeConfig(Path("/bin/envoy"), check=HttpCheck(listener="on_pipe"))
    with pytest.raises(ProbeSetupError, match="no socket address"):
        bootstrap(config, snapshot)


def test_envoy_command_plain_and_isolated() -> None:
    plain = envoy_command(ProbeConfig(Path("/bin/envoy")), _Paths(WORKDIR))
    assert plain[:3] == ["/bin/envoy", "-c", str(WORKDIR / "bootstrap.json")]
    for flag in ("--use-dynamic-base-id", "--concurrency", "--drain-time-s"):
        assert flag in plain
    isolated = envoy_command(ProbeConfig(Path("/bin/envoy"), isolate_network=True), _Paths(WORKDIR))
    assert isolated[:3] == ["unshare", "--net", "--"]
    assert isolated[-len(plain) :] == plain


async def test_missing_listener_for_the_check_fails_the_probe_without_starting_envoy(
    tmp_path: Path,
) -> None:
    fake_envoy = tmp_path / "envoy"
    fake_envoy.write_text("#!/bin/sh\nexit 99\n")
    fake_envoy.chmod(0o755)
    config = ProbeConfig(fake_envoy, check=HttpCheck(listener="nope"))
    result = await run_probe(
        config, group="edge", candidate=candidate(), xds=XDS, is_synced=lambda _: True
    )
    assert not result.ok
    assert result.reason == "check listener 'nope' is not in the candidate"
    assert result.pid is None
    assert result.workdir is not None and not result.workdir.exists()


async def test_isolation_without_unshare_is_a_clear_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_envoy = tmp_path / "envoy"
    fake_envoy.write_text("#!/bin/sh\nexit 99\n")
    fake_envoy.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))  # neither unshare nor ip
    result = await run_probe(
        ProbeConfig(fake_envoy, isolate_network=True),
        group="edge",
        candidate=candidate(),
        xds=XDS,
        is_synced=lambda _: True,
    )
    assert not result.ok
    assert "isolate_network needs unshare and ip on PATH" in result.reason


async def test_missing_envoy_binary_is_a_clear_failure(tmp_path: Path) -> None:
    result = await run_probe(
        ProbeConfig(tmp_path / "no-envoy"),
        group="edge",
        candidate=candidate(),
        xds=XDS,
        is_synced=lambda _: True,
    )
    assert not result.ok and "missing or not executable" in result.reason


async def test_an_envoy_that_exits_fails_the_probe_at_once_with_its_log(tmp_path: Path) -> None:
    fake_envoy = tmp_path / "envoy"
    fake_envoy.write_text("#!/bin/sh\necho 'error initializing configuration: bad' >&2\nexit 1\n")
    fake_envoy.chmod(0o755)
    result = await run_probe(
        ProbeConfig(fake_envoy, ready_timeout_seconds=20),
        group="edge",
        candidate=candidate(),
        xds=XDS,
        is_synced=lambda _: True,
    )
    assert not result.ok
    assert result.reason == "envoy exited with 1: error initializing configuration: bad"
    assert result.log_tail == "error initializing configuration: bad"
    assert result.report() == (
        "envoy exited with 1: error initializing configuration: bad\n"
        "envoy log (last lines):\nerror initializing configuration: bad"
    )
    assert result.seconds < 5
    assert result.workdir is not None and not result.workdir.exists()


async def test_a_failed_probe_reports_a_bounded_tail_of_a_long_envoy_log(tmp_path: Path) -> None:
    fake_envoy = tmp_path / "envoy"
    long_line = "x" * (2 * LOG_TAIL_BYTES)
    fake_envoy.write_text(
        f'#!/bin/sh\nfor i in $(seq 1 500); do echo "line $i"; done\necho {long_line}\n'
        "echo 'last words' >&2\nexit 2\n"
    )
    fake_envoy.chmod(0o755)
    result = await run_probe(
        ProbeConfig(fake_envoy, ready_timeout_seconds=20),
        group="edge",
        candidate=candidate(),
        xds=XDS,
        is_synced=lambda _: True,
    )
    assert result.reason == "envoy exited with 2: last words"
    assert len(result.log_tail.encode()) <= LOG_TAIL_BYTES
    assert result.log_tail.endswith("x\nlast words")
    report = result.report()
    assert report.startswith("envoy exited with 2: last words\nenvoy log (last lines):\n")
    assert len(report.encode()) < 2 * LOG_TAIL_BYTES


async def test_the_tail_is_the_last_lines_of_the_log(tmp_path: Path) -> None:
    fake_envoy = tmp_path / "envoy"
    fake_envoy.write_text('#!/bin/sh\nfor i in $(seq 1 100); do echo "line $i"; done\nexit 1\n')
    fake_envoy.chmod(0o755)
    result = await run_probe(
        ProbeConfig(fake_envoy, ready_timeout_seconds=20),
        group="edge",
        candidate=candidate(),
        xds=XDS,
        is_synced=lambda _: True,
    )
    expected = [f"line {i}" for i in range(101 - LOG_TAIL_LINES, 101)]
    assert result.log_tail.splitlines() == expected


def test_the_probe_takes_only_absolute_paths() -> None:
    with pytest.raises(ValueError, match="envoy_binary must be an absolute path, not envoy"):
        ProbeConfig(Path("envoy"))
    with pytest.raises(ValueError, match=r"unix_socket must be an absolute path, not \.xdscp/x"):
        XdsEndpoint(unix_socket=Path(".xdscp/xds.sock"))


def test_serve_config_makes_the_store_and_the_socket_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from controlplane.app import Config

    monkeypatch.chdir(tmp_path)
    config = Config(store_path=Path(".xdscp/xdscp.db"), xds_socket=Path("run/xds.sock"))
    assert config.store_path == tmp_path / ".xdscp/xdscp.db"
    assert config.xds_socket == tmp_path / "run/xds.sock"
    assert config.unix_socket == tmp_path / "run/xds.sock"
    assert config.token_path == tmp_path / ".xdscp/admin-token"
