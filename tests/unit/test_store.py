import sqlite3

import pytest

from controlplane.store import STABLE
from controlplane.store.sqlite import SQLiteStore
from tests import factories

# The tests that take `open_store` or `store` are the contract of every backend:
# tests/integration/test_store_postgresql.py runs them against PostgreSQL too.


@pytest.fixture
def open_store(tmp_path):
    """Opens (or reopens) the one store of this test."""
    opened = []

    def open_store(sealer=None):
        opened.append(SQLiteStore(tmp_path / "xdscp.db", sealer=sealer))
        return opened[-1]

    yield open_store
    for s in opened:
        s.close()


@pytest.fixture
def integrity_error():
    return sqlite3.IntegrityError


@pytest.fixture
def store(open_store):
    return open_store()


def test_publish_is_durable_across_reopen(open_store) -> None:
    snapshot = factories.edge_snapshot()
    first = open_store()
    result = first.publish("edge", snapshot, message="first", actor="alice")
    first.close()

    reopened = open_store()
    assert result.changed
    assert reopened.pointer("edge", STABLE) == snapshot.version
    loaded = reopened.get(snapshot.version)
    assert loaded is not None and loaded.version == snapshot.version
    assert [e.message for e in reopened.history("edge")] == ["first"]
    reopened.close()


def test_uses_wal_mode(tmp_path) -> None:
    SQLiteStore(tmp_path / "xdscp.db").close()
    mode = sqlite3.connect(tmp_path / "xdscp.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_history_records_parent_and_republishing_is_a_no_op(store) -> None:
    v1, v2 = factories.edge_snapshot(), factories.edge_snapshot(prefix="/v2")
    store.publish("edge", v1, message="one", actor="a")
    second = store.publish("edge", v2, message="two", actor="b")
    again = store.publish("edge", v2, message="two again", actor="b")

    assert second.entry.parent_version == v1.version
    assert not again.changed
    history = store.history("edge")
    assert [(e.version, e.parent_version, e.message) for e in history] == [
        (v2.version, v1.version, "two"),
        (v1.version, None, "one"),
    ]


def test_pointers_are_per_group(store) -> None:
    v1, v2 = factories.edge_snapshot(), factories.edge_snapshot(prefix="/v2")
    store.publish("edge", v1, message="", actor="a")
    store.publish("default", v2, message="", actor="a")
    assert store.pointers() == {"default": {STABLE: v2.version}, "edge": {STABLE: v1.version}}
    assert store.history("default")[0].version == v2.version
    assert len(store.history()) == 2


def test_failed_publish_leaves_store_untouched(store, monkeypatch) -> None:
    v1, v2 = factories.edge_snapshot(), factories.edge_snapshot(prefix="/v2")
    store.publish("edge", v1, message="", actor="a")

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(store, "_append_history", explode)
    with pytest.raises(RuntimeError):
        store.publish("edge", v2, message="", actor="a")
    assert store.pointer("edge") == v1.version
    assert store.get(v2.version) is None
    assert len(store.history()) == 1


def test_unknown_version_is_none(store) -> None:
    assert store.get("0000000000000000") is None


def test_transition_moves_pointers_and_rollout_record_atomically(open_store) -> None:
    from controlplane.store import CANDIDATE, LAST_GOOD

    store = open_store()
    v1, v2 = factories.edge_snapshot(), factories.edge_snapshot(prefix="/v2")
    store.publish("edge", v1, message="", actor="a")
    store.transition(
        "edge",
        action="stage",
        version=v2.version,
        actor="bob",
        message="canary",
        snapshot=v2,
        pointers={CANDIDATE: v2.version, LAST_GOOD: v1.version},
        rollout={"state": "canary", "candidate": v2.version},
    )
    store.close()

    store = open_store()
    assert store.pointers()["edge"] == {
        STABLE: v1.version,
        CANDIDATE: v2.version,
        LAST_GOOD: v1.version,
    }
    assert store.rollouts() == {"edge": {"state": "canary", "candidate": v2.version}}
    entry = store.history("edge")[0]
    assert (entry.action, entry.version, entry.parent_version, entry.actor, entry.message) == (
        "stage",
        v2.version,
        v1.version,
        "bob",
        "canary",
    )
    store.transition(
        "edge",
        action="promote",
        version=v2.version,
        actor="gate",
        message="",
        pointers={STABLE: v2.version, CANDIDATE: None},
        rollout=None,
    )
    assert store.pointers()["edge"] == {STABLE: v2.version, LAST_GOOD: v1.version}
    assert store.rollouts() == {}
    store.close()


def test_pointer_to_an_unknown_version_is_refused_and_nothing_changes(
    store, integrity_error
) -> None:
    v1 = factories.edge_snapshot()
    store.publish("edge", v1, message="", actor="a")
    with pytest.raises(integrity_error):
        store.transition(
            "edge",
            action="rollback",
            version="feedfeedfeedfeed",
            actor="a",
            message="",
            pointers={STABLE: "feedfeedfeedfeed"},
        )
    assert store.pointer("edge") == v1.version
    assert len(store.history()) == 1
