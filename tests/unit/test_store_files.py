"""The store's files are owner-only: made so, and tightened when found otherwise."""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from controlplane.store.sqlite import SQLiteStore
from tests import factories


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def permissive_umask() -> Iterator[None]:
    """umask 0: any mode narrower than 0666/0777 below is ours, not the umask's."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_new_store_directories_are_0700_and_its_files_0600_with_wal_in_use(tmp_path) -> None:
    path = tmp_path / "made" / "by" / "xdscp" / "xdscp.db"
    store = SQLiteStore(path)
    store.publish("edge", factories.edge_snapshot(), message="", actor="a")

    for directory in (tmp_path / "made", tmp_path / "made/by", tmp_path / "made/by/xdscp"):
        assert mode(directory) == 0o700, directory
    wal, shm = path.with_name("xdscp.db-wal"), path.with_name("xdscp.db-shm")
    assert wal.stat().st_size > 0  # the publish is in the WAL, not yet checkpointed
    assert {p.name: mode(p) for p in (path, wal, shm)} == {
        "xdscp.db": 0o600,
        "xdscp.db-wal": 0o600,
        "xdscp.db-shm": 0o600,
    }
    store.close()
    assert mode(path) == 0o600


def test_an_existing_directory_keeps_its_mode(tmp_path) -> None:
    tmp_path.chmod(0o755)
    SQLiteStore(tmp_path / "xdscp.db").close()
    assert mode(tmp_path) == 0o755
    assert mode(tmp_path / "xdscp.db") == 0o600


def test_a_rollback_journal_gets_the_database_files_mode(tmp_path) -> None:
    """SQLite makes -journal files itself; it gives them the database file's mode."""
    path = tmp_path / "xdscp.db"
    SQLiteStore(path).close()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=PERSIST")  # keep the journal after the write
    db.execute("INSERT INTO rollouts (grp, record, updated_at) VALUES ('g', '{}', 0)")
    db.close()
    assert mode(path.with_name("xdscp.db-journal")) == 0o600


def test_store_files_open_to_others_are_tightened_with_a_warning(tmp_path) -> None:
    path = tmp_path / "xdscp.db"
    store = SQLiteStore(path)
    store.publish("edge", factories.edge_snapshot(), message="", actor="a")
    store.close()
    wal = path.with_name("xdscp.db-wal")
    wal.write_bytes(b"")  # as a crashed server would leave it: beside the database
    path.chmod(0o644)
    wal.chmod(0o664)

    with capture_logs() as logs:
        store = SQLiteStore(path)
    assert store.pointer("edge") is not None
    assert mode(path) == 0o600
    assert mode(wal) == 0o600
    warnings = {(e["file"], e["old_mode"]) for e in logs if e["log_level"] == "warning"}
    assert warnings == {(str(path), "0644"), (str(wal), "0664")}
    store.close()


def test_owner_only_files_are_left_alone_and_not_logged(tmp_path) -> None:
    path = tmp_path / "xdscp.db"
    SQLiteStore(path).close()
    path.chmod(0o700)  # no group or other bits: nothing to tighten
    with capture_logs() as logs:
        SQLiteStore(path).close()
    assert mode(path) == 0o700
    assert logs == []
