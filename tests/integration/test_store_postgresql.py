"""The PostgreSQL store against a real PostgreSQL: the store contract every backend keeps
(the tests of tests/unit/test_store.py, run here on PostgreSQL), sealed secrets and the key
check, versioned migrations, the one-server lock, and a lost connection."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from controlplane import resources
from controlplane.snapshot import Snapshot
from controlplane.store import STABLE, StoreError
from controlplane.store.pg_url import DatabaseUrl
from controlplane.store.postgres import SCHEMA_VERSION, PostgresStore, migrate
from controlplane.store.sealing import Sealer
from tests import factories, tls_material
from tests.unit.test_store import (  # noqa: F401  (collected here: the contract, on PostgreSQL)
    test_failed_publish_leaves_store_untouched,
    test_history_records_parent_and_republishing_is_a_no_op,
    test_pointer_to_an_unknown_version_is_refused_and_nothing_changes,
    test_pointers_are_per_group,
    test_publish_is_durable_across_reopen,
    test_transition_moves_pointers_and_rollout_record_atomically,
    test_unknown_version_is_none,
)
from tests.unit.test_store_sealing import key_file, private_key_of, sealer, snapshot_with_secret


@pytest.fixture
def open_store(database_url: str) -> Iterator[Callable[..., PostgresStore]]:
    """Opens (or reopens) this test's store: a fresh database."""
    opened: list[PostgresStore] = []

    def open_store(sealer: Sealer | None = None) -> PostgresStore:
        opened.append(PostgresStore(DatabaseUrl.parse(database_url), sealer=sealer))
        return opened[-1]

    yield open_store
    for store in opened:
        store.close()


@pytest.fixture
def integrity_error() -> type[Exception]:
    return psycopg.IntegrityError


@pytest.fixture
def store(open_store: Callable[..., PostgresStore]) -> PostgresStore:
    return open_store()


@pytest.fixture(scope="module")
def material() -> tls_material.TlsMaterial:
    return tls_material.generate()


def query(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as db:
        cursor = db.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


def all_stored_bytes(url: str) -> bytes:
    """Every value of every row of the store's tables, as bytes."""
    tables = [
        t for (t,) in query(url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    ]
    found = b""
    for table in tables:
        for row in query(url, f'SELECT * FROM "{table}"'):
            for value in row:
                found += (
                    bytes(value) if isinstance(value, (bytes, memoryview)) else str(value).encode()
                )
    return found


# Secrets sealed at rest, and the key check


def test_keyed_store_holds_no_form_of_the_private_key_and_reads_it_back(
    open_store, database_url, tmp_path, material
) -> None:
    snapshot = snapshot_with_secret(material)
    store = open_store(sealer(key_file(tmp_path / "store.key")))
    store.publish("edge", snapshot, message="", actor="a")

    stored = all_stored_bytes(database_url)
    assert tls_material.forms_found(stored, material) == []
    assert b"edge-cert" in stored  # names and the rest of the config stay plain
    store.close()
    reopened = open_store(sealer(tmp_path / "store.key"))
    loaded = reopened.get(snapshot.version)
    assert loaded is not None and private_key_of(loaded) == material.key_pem


def test_without_a_key_the_private_key_is_in_the_database(open_store, database_url, material):
    """The control for the test above: the search does find a key that is there."""
    open_store().publish("edge", snapshot_with_secret(material), message="", actor="a")
    assert "the PEM text" in tls_material.forms_found(all_stored_bytes(database_url), material)


def test_the_version_is_the_same_with_a_key_or_without(postgres_server, tmp_path, material) -> None:
    snapshot = snapshot_with_secret(material)
    plain = PostgresStore(DatabaseUrl.parse(postgres_server.create_database()))
    keyed = PostgresStore(
        DatabaseUrl.parse(postgres_server.create_database()),
        sealer=sealer(key_file(tmp_path / "store.key")),
    )
    try:
        assert plain.publish("edge", snapshot, message="", actor="a").entry.version == (
            keyed.publish("edge", snapshot, message="", actor="a").entry.version
        )
        assert keyed.publish("edge", snapshot, message="", actor="a").changed is False
        plain_copy, keyed_copy = plain.get(snapshot.version), keyed.get(snapshot.version)
        assert plain_copy is not None and keyed_copy is not None
        assert [(r.type_url, r.name, r.body) for r in keyed_copy.all_resources()] == [
            (r.type_url, r.name, r.body) for r in plain_copy.all_resources()
        ]
    finally:
        plain.close()
        keyed.close()


def test_a_secret_kept_by_many_snapshots_is_stored_once(
    open_store, database_url, tmp_path, material
) -> None:
    store = open_store(sealer(key_file(tmp_path / "store.key")))
    first = snapshot_with_secret(material)
    second = Snapshot.from_serialized(
        [
            *((r.type_url, r.name, r.body) for r in first.all_resources()),
            (resources.CLUSTER, "extra", resources.serialize(factories.static_cluster("extra"))),
        ]
    )
    store.publish("edge", first, message="", actor="a")
    store.publish("edge", second, message="", actor="a")
    assert query(database_url, "SELECT COUNT(*) FROM blobs WHERE sealed") == [(1,)]


def test_a_keyed_store_refuses_to_open_without_its_key_or_with_another(
    open_store, database_url, tmp_path, material
) -> None:
    name = DatabaseUrl.parse(database_url).describe()
    store = open_store(sealer(key_file(tmp_path / "store.key")))
    store.publish("edge", snapshot_with_secret(material), message="", actor="a")
    store.close()
    with pytest.raises(
        StoreError, match=f"database {name} keeps its secrets encrypted: .* --store-key-file FILE"
    ):
        open_store()
    other = key_file(tmp_path / "other.key")
    with pytest.raises(
        StoreError, match=f"--store-key-file {other} is not the key of database {name}"
    ):
        open_store(sealer(other))


def test_a_sealed_value_copied_into_another_row_does_not_open(
    open_store, database_url, tmp_path, material
) -> None:
    keys = sealer(key_file(tmp_path / "store.key"))
    one, two = snapshot_with_secret(material, "one"), snapshot_with_secret(material, "two")
    store = open_store(keys)
    store.publish("edge", one, message="", actor="a")
    store.publish("edge", two, message="", actor="a")
    blob_of = dict(
        query(
            database_url,
            "SELECT name, blob_hash FROM snapshot_resources WHERE type_url = %s",
            (resources.SECRET,),
        )
    )
    query(
        database_url,
        "UPDATE blobs SET body = (SELECT body FROM blobs WHERE hash = %s) WHERE hash = %s",
        (blob_of["one"], blob_of["two"]),
    )
    assert store.get(one.version) is not None
    with pytest.raises(StoreError, match=f"sealed blob {blob_of['two']} does not open"):
        store.get(two.version)


# Versioned migrations


def test_a_new_database_records_its_schema_version(open_store, database_url) -> None:
    open_store().close()
    open_store().close()  # a second start applies nothing again
    assert [v for (v,) in query(database_url, "SELECT version FROM schema_migrations")] == list(
        range(1, SCHEMA_VERSION + 1)
    )


def test_a_database_of_a_newer_schema_is_refused(open_store, database_url) -> None:
    open_store().close()
    query(database_url, "INSERT INTO schema_migrations (version, applied_at) VALUES (99, 0)")
    with pytest.raises(
        StoreError, match=f"schema version 99 is newer than this xdscp's \\({SCHEMA_VERSION}\\)"
    ):
        open_store()


def test_migrations_started_at_once_run_once(database_url) -> None:
    """Two servers starting together on a new database: the migration lock makes one wait
    for the other, which then finds nothing to do (without it, both CREATE TABLE)."""
    barrier = threading.Barrier(2, timeout=30)
    errors: list[BaseException] = []

    def start() -> None:
        try:
            with psycopg.connect(database_url, autocommit=True, connect_timeout=10) as db:
                barrier.wait()
                with db.transaction():
                    migrate(db, "test")
        except BaseException as error:  # reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert query(database_url, "SELECT COUNT(*) FROM schema_migrations") == [(SCHEMA_VERSION,)]


# One server per database, and a lost connection


def test_only_the_leader_writes_another_store_is_refused_naming_the_leader_not_the_password(
    open_store, database_url, postgres_server
) -> None:
    leader = open_store()
    leader.publish("edge", factories.edge_snapshot(), message="", actor="a")
    follower = open_store()  # opens: replicas share the database
    assert follower.lead() is False
    with pytest.raises(StoreError) as refused:
        follower.publish("edge", factories.edge_snapshot(prefix="/v2"), message="", actor="b")
    name = DatabaseUrl.parse(database_url).describe()
    assert f"database {name}: another replica is the rollout leader (xdscp serve pid" in str(
        refused.value
    )
    assert postgres_server.password not in str(refused.value)
    leader.close()  # its lock goes with its connection: the next to ask leads
    assert follower.lead() is True
    follower.publish("edge", factories.edge_snapshot(prefix="/v2"), message="", actor="b")


def test_a_lost_connection_fails_one_call_and_the_next_reconnects_and_leads_again(
    store, database_url
) -> None:
    v1 = factories.edge_snapshot()
    store.publish("edge", v1, message="", actor="a")
    query(
        database_url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name LIKE 'xdscp serve%%' AND datname = current_database()",
    )
    name = DatabaseUrl.parse(database_url).describe()
    with pytest.raises(
        StoreError, match=f"database {name}: publish failed, the database is unavailable"
    ):
        store.publish("edge", factories.edge_snapshot(prefix="/v2"), message="", actor="a")
    assert store.pointer("edge", STABLE) == v1.version  # reconnected
    assert store.lead() is True  # the lock was free: it holds it again
    other = PostgresStore(DatabaseUrl.parse(database_url))
    try:
        assert other.lead() is False
    finally:
        other.close()


def test_a_publish_is_durable_before_it_returns_a_crash_right_after_keeps_it(
    own_postgres, tmp_path, material
) -> None:
    """fsync is on: PostgreSQL killed without a checkpoint right after `publish` returned
    recovers the snapshot, its history and the pointer move from its WAL."""
    url = DatabaseUrl.parse(own_postgres.create_database())
    store = PostgresStore(url, sealer=sealer(key_file(tmp_path / "store.key")))
    snapshot = snapshot_with_secret(material)
    store.publish("edge", snapshot, message="just before the crash", actor="a")
    own_postgres.stop(mode="immediate")
    store.close()
    own_postgres.start()
    reopened = PostgresStore(url, sealer=sealer(tmp_path / "store.key"))
    try:
        assert reopened.pointer("edge", STABLE) == snapshot.version
        assert [e.message for e in reopened.history("edge")] == ["just before the crash"]
        loaded = reopened.get(snapshot.version)
        assert loaded is not None and private_key_of(loaded) == material.key_pem
    finally:
        reopened.close()


def test_a_database_the_user_may_not_create_tables_in_is_refused_with_the_reason(
    postgres_server, database_url
) -> None:
    reader = f"reader_{secrets.token_hex(4)}"  # roles belong to the whole server
    query(database_url, f"CREATE ROLE {reader} LOGIN PASSWORD 'r3ader'")
    query(database_url, "REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    url = database_url.replace(f"xdscp_test:{postgres_server.password}", f"{reader}:r3ader")
    name = DatabaseUrl.parse(url).describe()
    with pytest.raises(StoreError, match=f"database {name}: cannot open the store: .*permission"):
        PostgresStore(DatabaseUrl.parse(url))
