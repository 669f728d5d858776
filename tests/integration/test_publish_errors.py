"""Bad input is refused with file, line and field, and leaves the store exactly as it was."""

from __future__ import annotations

import socket
import sqlite3
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2

from controlplane import resources
from controlplane.admin.v1 import admin_pb2, admin_pb2_grpc
from tests import factories
from tests.integration import edge_config
from tests.integration.harness import REPO, XdsControlPlane, free_port


def store_contents(path: Path) -> dict[str, list[tuple]]:  # type: ignore[type-arg]
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return {
            table: db.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
            for table in ("snapshots", "snapshot_resources", "history", "pointers", "blobs")
        }


@pytest.fixture
def published(control_plane: XdsControlPlane, tmp_path: Path) -> XdsControlPlane:
    good = edge_config.write(
        tmp_path / "good",
        listener_port=free_port(),
        backends={"a": 1},
        routes=[edge_config.route_to("a")],
    )
    control_plane.xdsctl("publish", str(good), "--group", "edge")
    return control_plane


def broken_copy(tmp_path: Path, filename: str, text: str) -> Path:
    directory = edge_config.write(
        tmp_path / "broken",
        listener_port=free_port(),
        backends={"a": 1},
        routes=[edge_config.route_to("a")],
    )
    (directory / filename).write_text(text)
    return directory


CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
# gRPC gives up on a connection that never completes its handshake after 20 s.
SILENT_SERVER_BOUND_SECONDS = 10

CASES = {
    "malformed yaml": (
        "clusters.yaml",
        f'resources:\n- "@type": {CLUSTER}\n  name: a\n  type: [EDS\n',
        ["clusters.yaml:5"],
    ),
    "unknown field": (
        "clusters.yaml",
        f'resources:\n- "@type": {CLUSTER}\n  name: a\n  type: EDS\n  conect_timeout: 1s\n'
        "  eds_cluster_config: {eds_config: {ads: {}}}\n",
        [
            "clusters.yaml:5: Cluster: ",
            'unknown field "conect_timeout" (did you mean "connect_timeout"?)',
        ],
    ),
    "unknown @type": (
        "clusters.yaml",
        'resources:\n- "@type": type.googleapis.com/envoy.config.cluster.v3.Clustr\n  name: a\n',
        ["clusters.yaml:2", "envoy.config.cluster.v3.Clustr"],
    ),
    "field rule": (
        "clusters.yaml",
        f'resources:\n- "@type": {CLUSTER}\n  name: a\n  type: EDS\n  connect_timeout: 0s\n'
        "  eds_cluster_config: {eds_config: {ads: {}}}\n",
        [
            "clusters.yaml:5: Cluster.connect_timeout: must be greater than 0s",
            "[validate: duration.gt]",
            "1 error(s); nothing published",
        ],
    ),
    "dangling reference": (
        "endpoints.yaml",
        "resources: []\n",
        ["clusters.yaml:", 'cluster "a" references endpoint "a"', "nothing published"],
    ),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_input_is_refused_and_the_store_is_untouched(published, tmp_path, case) -> None:
    filename, text, expected = CASES[case]
    before = store_contents(published.store)
    history_before = published.xdsctl("snapshots", "--json").stdout

    result = published.xdsctl(
        "publish", str(broken_copy(tmp_path, filename, text)), "--group", "edge", check=False
    )

    assert result.returncode == 1
    assert result.stdout == ""  # no version printed
    for fragment in expected:
        assert fragment in result.stderr, result.stderr
    assert store_contents(published.store) == before
    assert published.xdsctl("snapshots", "--json").stdout == history_before


def test_a_dangling_symlink_fails_publish_and_validate_and_the_store_is_untouched(
    published, tmp_path
) -> None:
    """A listeners.yaml that leads nowhere is refused, not read as "no listeners"."""
    from tests.integration.harness import xdsctl

    directory = edge_config.write(
        tmp_path / "broken",
        listener_port=free_port(),
        backends={"a": 1},
        routes=[edge_config.route_to("a")],
    )
    listeners = directory / "listeners.yaml"
    listeners.unlink()
    listeners.symlink_to("listeners-v2.yaml")
    refusal = f"{listeners}: dangling symlink (to listeners-v2.yaml, which is missing)"
    before = store_contents(published.store)
    history_before = published.xdsctl("snapshots", "--json").stdout

    result = published.xdsctl("publish", str(directory), "--group", "edge", check=False)
    assert result.returncode == 1
    assert result.stdout == ""
    assert f"error: {refusal}\n" in result.stderr
    assert f"{directory}: 1 error(s); nothing published" in result.stderr
    assert store_contents(published.store) == before
    assert published.xdsctl("snapshots", "--json").stdout == history_before

    validated = xdsctl("validate", str(directory), check=False)
    assert validated.returncode == 1
    assert validated.stdout.splitlines()[0] == f"error: {refusal}"


def test_server_refuses_a_dangling_snapshot_sent_past_the_cli(published) -> None:
    before = store_contents(published.store)
    request = admin_pb2.PublishRequest(
        group="edge",
        resources=[
            any_pb2.Any(
                type_url=resources.CLUSTER, value=factories.cluster("orphan").SerializeToString()
            )
        ],
    )
    with (
        grpc.insecure_channel(published.admin_address) as channel,
        pytest.raises(grpc.RpcError) as caught,
    ):
        admin_pb2_grpc.AdminStub(channel).Publish(request, timeout=10, metadata=auth(published))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert 'cluster "orphan" references endpoint "orphan"' in caught.value.details()
    assert store_contents(published.store) == before


def auth(plane: XdsControlPlane) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {plane.token_file.read_text().strip()}"),)


@pytest.mark.parametrize("token", [None, "wrong-token"], ids=["missing", "wrong"])
def test_publish_without_the_admin_token_is_refused_and_changes_nothing(
    published, tmp_path, token
) -> None:
    from tests.integration.harness import xdsctl

    before = store_contents(published.store)
    config = edge_config.write(
        tmp_path / "c2",
        listener_port=free_port(),
        backends={"b": 1},
        routes=[edge_config.route_to("b")],
    )
    args = ["publish", str(config), "--group", "edge", "--server", published.admin_address]
    if token is not None:
        (tmp_path / "token").write_text(token)
        args += ["--token-file", str(tmp_path / "token")]
    result = xdsctl(*args, check=False)
    assert result.returncode == 1
    refusal = "missing" if token is None else "not accepted"
    assert f"unauthenticated: admin token {refusal}: set XDSCTL_TOKEN" in result.stderr
    if token is None:  # and xdsctl says where it looked for one
        assert "xdsctl found no admin token; it tried --token-file (not given)" in result.stderr
        assert f"{REPO / '.xdscp/admin-read-token'} (no such file)" in result.stderr
    assert store_contents(published.store) == before
    # Reading needs a token too.
    args = ["snapshots", "--server", published.admin_address]
    if token is not None:
        args += ["--token-file", str(tmp_path / "token")]
    assert "unauthenticated" in xdsctl(*args, check=False).stderr


def test_unreachable_server_is_a_clear_error(tmp_path) -> None:
    from tests.integration.harness import xdsctl

    config = edge_config.write(
        tmp_path / "c",
        listener_port=free_port(),
        backends={"a": 1},
        routes=[edge_config.route_to("a")],
    )
    result = xdsctl("publish", str(config), "--server", f"127.0.0.1:{free_port()}", check=False)
    assert result.returncode == 1
    assert "cannot reach xdscp at" in result.stderr


def test_an_invalid_config_is_located_in_its_files_even_when_no_server_answers(
    tmp_path: Path,
) -> None:
    """The server checks field rules and lint on every publish; xdsctl checks them itself to
    locate what was refused, and also when the server cannot be asked."""
    from tests.integration.harness import xdsctl

    config = edge_config.write(
        tmp_path / "c",
        listener_port=free_port(),
        backends={"a": 1},
        routes=[edge_config.route_to("zzz", "/z"), edge_config.route_to("a")],
    )
    result = xdsctl("publish", str(config), "--server", f"127.0.0.1:{free_port()}", check=False)
    assert result.returncode == 1
    assert 'sends traffic to cluster "zzz", which is not in the config' in result.stderr
    assert "1 lint error(s), as `xdsctl validate` shows; nothing published" in result.stderr
    assert "cannot reach" not in result.stderr


def test_an_invalid_config_is_refused_at_once_when_the_server_never_answers(
    tmp_path: Path,
) -> None:
    """xdsctl reads the group's stable while it parses the files; a refusal of the files must
    not wait for that read. The server here accepts connections and never answers."""
    from tests.integration.harness import xdsctl

    config = broken_copy(tmp_path, "clusters.yaml", "resources: [")
    with socket.create_server(("127.0.0.1", 0)) as silent:
        started = time.monotonic()
        result = xdsctl(
            "publish", str(config), "--server", f"127.0.0.1:{silent.getsockname()[1]}", check=False
        )
        took = time.monotonic() - started
    assert result.returncode == 1
    assert "error(s); nothing published" in result.stderr
    assert "cannot reach" not in result.stderr
    # A bound on a hang, not a speed test: the read would wait 20 s for the connection.
    assert took < SILENT_SERVER_BOUND_SECONDS, f"the refusal waited {took:.1f} s"
