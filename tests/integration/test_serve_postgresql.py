"""`xdsctl serve --store postgresql://...` with real Envoys and a real PostgreSQL: a publish
reaches Envoy; after a restart of xdscp Envoy is sent nothing it already holds; one server
per database; a restart of PostgreSQL while serving loses nothing committed; the password
never shows."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.store.pg_url import DatabaseUrl, redact
from tests.integration import edge_config
from tests.integration.harness import REPO, XdsControlPlane, http_get, wait_for
from tests.integration.test_canary_rollout import (  # noqa: F401 (run here on PostgreSQL)
    Fleet,
    test_a_good_candidate_is_promoted_to_all_and_rollback_restores_the_previous_one,
)
from tests.integration.test_envoy_sotw import all_synced, publish_edge, serving, start_edge


@pytest.fixture
def pg_plane(tmp_path: Path, database_url: str) -> Iterator[XdsControlPlane]:
    plane = XdsControlPlane(tmp_path, database_url=database_url).start()
    yield plane
    plane.stop()


@pytest.fixture
def fleet(tmp_path: Path, start_envoy, database_url: str) -> Iterator[Fleet]:  # type: ignore[no-untyped-def]
    """test_canary_rollout's gated fleet, with its store in PostgreSQL: the canary rollout,
    its promotion (stage, promote and last_good transitions) and a rollback, imported above."""
    fleet = Fleet(tmp_path, start_envoy, database_url=database_url)
    yield fleet
    fleet.plane.stop()


def serve(store: str, *args: str) -> subprocess.CompletedProcess[str]:
    any_port = "127.0.0.1:0"
    return subprocess.run(
        [
            *(sys.executable, "-m", "controlplane.cli.main", "serve", "--store", store),
            *("--xds-address", any_port, "--admin-address", any_port, "--http-address", any_port),
            *args,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_publish_on_postgresql_reaches_envoy_and_a_restart_sends_it_nothing_new(
    pg_plane, upstream, start_envoy, tmp_path, database_url, postgres_server
) -> None:
    envoy, _, _, url = start_edge(pg_plane, upstream, start_envoy, tmp_path)
    held = {k: v for k, v in envoy.stats().items() if k.endswith(".version_text")}
    history_before = json.loads(pg_plane.xdsctl("snapshots", "--json").stdout)

    assert pg_plane.stop() == 0
    wait_for(lambda: envoy.stats()["control_plane.connected_state"] == "0", what="xdscp gone")
    pg_plane.start()
    wait_for(lambda: envoy.stats()["control_plane.connected_state"] == "1", what="reconnect")
    wait_for(lambda: all_synced(pg_plane, "edge-1"), what="SYNCED after restart")

    assert {k: v for k, v in envoy.stats().items() if k.endswith(".version_text")} == held
    assert json.loads(pg_plane.xdsctl("snapshots", "--json").stdout) == history_before
    events = pg_plane.log_events()
    # As with SQLite: clusters and listeners are not re-sent; named types are (see
    # test_envoy_sotw.test_after_an_xdscp_restart_envoy_holds_the_same_version).
    pushed = {e["type_url"].rsplit(".", 1)[1] for e in events if e["event"] == "push"}
    assert pushed <= {"ClusterLoadAssignment", "RouteConfiguration"}
    assert serving(url, "backend=a path=/hello")
    # The log names the store without its password.
    serving_event = next(e for e in events if e["event"] == "serving")
    assert serving_event["store"] == redact(database_url)
    assert ":***@" in serving_event["store"]
    assert postgres_server.password not in pg_plane.log_path.read_text()


def test_a_bad_database_url_is_refused_naming_store_without_the_password(tmp_path) -> None:
    result = serve("postgresql://alice:hunter2secret@127.0.0.1:notaport/x")
    assert result.returncode == 1, result.stderr
    assert "xdsctl: --store postgresql://alice:***@127.0.0.1:notaport/x is not a valid" in (
        result.stderr
    )
    assert "hunter2secret" not in result.stderr + result.stdout
    other = serve("mysql://alice:hunter2secret@db/x")
    assert other.returncode == 1
    assert "--store mysql://alice:***@db/x: only postgresql:// and postgres://" in other.stderr
    assert "hunter2secret" not in other.stderr + other.stdout


def test_serve_with_the_database_down_exits_with_a_clear_error(tmp_path, own_postgres) -> None:
    url = own_postgres.create_database()
    own_postgres.stop()
    result = serve(url, "--state-dir", str(tmp_path))
    own_postgres.start()  # for the fixture's stop
    assert result.returncode == 1, result.stderr
    name = DatabaseUrl.parse(url).describe()
    assert f"xdsctl: database {name}: open failed, the database is unavailable" in result.stderr
    assert own_postgres.password not in result.stderr
    assert "Traceback" not in result.stderr


def test_a_postgresql_restart_while_serving_keeps_envoy_served_and_loses_nothing_committed(
    own_postgres, upstream, start_envoy, tmp_path
) -> None:
    url = own_postgres.create_database()
    plane = XdsControlPlane(tmp_path, database_url=url).start()
    try:
        envoy, port, backends, hello = start_edge(plane, upstream, start_envoy, tmp_path)
        own_postgres.stop()

        # Envoy keeps its config; an Envoy that starts now is served from memory.
        assert serving(hello, "backend=a path=/hello")
        assert envoy.stats()["control_plane.connected_state"] == "1"
        late = start_envoy("edge-2", "edge", plane.xds_port)
        wait_for(lambda: all_synced(plane, "edge-2"), what="edge-2 served while the DB is down")
        assert late.process.poll() is None
        # A publish fails, saying why, and changes nothing.
        edge_config.write(
            tmp_path / "v2", listener_port=port, backends=backends,
            routes=[edge_config.route_to("b")],
        )  # fmt: skip
        failed = plane.xdsctl("publish", str(tmp_path / "v2"), "--group", "edge", check=False)
        assert failed.returncode != 0
        name = DatabaseUrl.parse(url).describe()
        assert f"database {name}: " in failed.stderr
        assert "the database is unavailable" in failed.stderr
        assert own_postgres.password not in failed.stderr
        listed = plane.xdsctl("snapshots", check=False)
        assert listed.returncode != 0 and "the database is unavailable" in listed.stderr
        status, metrics = http_get(f"http://127.0.0.1:{plane.http_port}/metrics")
        assert status == 200 and "xdscp_nodes_out_of_sync" in metrics
        assert serving(hello, "backend=a path=/hello")

        own_postgres.start()
        published = publish_edge(
            plane, tmp_path / "v2", port, backends=backends, routes=[edge_config.route_to("b")]
        )
        wait_for(lambda: serving(hello, "backend=b path=/hello"), what="v2 after the DB is back")

        def history_with_v2_last_good() -> dict[str, Any] | None:
            # The gate records last_good once the fleet ACKed v2: read the history after it.
            found = json.loads(plane.xdsctl("snapshots", "--json").stdout)
            pointers = found["groups"]["edge"]["pointers"]
            return found if pointers.get("last_good") == published else None

        history = wait_for(history_with_v2_last_good, what="v2 recorded as last good")
        assert published in json.dumps(history)
    finally:
        assert plane.stop() == 0

    # Nothing committed was lost: a new server on the database serves v2, with v1 before it.
    plane.start()
    try:
        assert json.loads(plane.xdsctl("snapshots", "--json").stdout) == history
        wait_for(lambda: serving(hello, "backend=b path=/hello"), what="v2 after the restart")
    finally:
        plane.stop()
