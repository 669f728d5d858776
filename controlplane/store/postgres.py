"""PostgreSQL SnapshotStore (`xdsctl serve --store postgresql://...`), with psycopg 3.

The same tables and invariants as the SQLite store (sqlite.py): blobs by content hash,
sealed Secrets with a key check, history, pointers and rollout records; each publish or
transition is one transaction, committed with synchronous_commit on before it returns.

- One connection, used under a lock (the callers run these calls off the event loop). Several
  replicas share the database; the one whose connection holds the session-level leader lock
  is the rollout leader, and only it may publish or move pointers (`lead`, the fence of every
  write). If the connection drops (the database restarts), the call fails with a
  StoreError, the lead is lost with it, and the next call reconnects.
- The schema is versioned by the `schema_migrations` table; `_MIGRATIONS` are applied in
  order, in one transaction, under a transaction-level advisory lock, when the store opens.
  A database with a newer schema than this code knows is refused.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
import structlog

from controlplane.resources import SECRET
from controlplane.snapshot import Snapshot
from controlplane.store import KEEP, STABLE, HistoryEntry, PublishResult, StoreError, _Keep
from controlplane.store.pg_url import DatabaseUrl
from controlplane.store.sealing import Sealer, StoreSealing

log = structlog.get_logger("store")

# Advisory lock keys (pg_advisory_lock(bigint)): "xdscp" + a role, as ASCII.
LEADER_LOCK_KEY = 0x7864736370_01  # held by the rollout leader's store connection
MIGRATION_LOCK_KEY = 0x7864736370_02  # held while the schema is migrated
# libpq options, unless the URL sets them: a connection attempt waits at most 10 s, and a
# connection to a server that stopped answering is found dead within about 30 s.
CONNECTION_DEFAULTS = {
    "connect_timeout": "10",
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "30000",  # ms: unacknowledged data
}
_T = TypeVar("_T")

# Version N is _MIGRATIONS[N - 1]; append, never edit one that has shipped.
_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE blobs (
        hash TEXT PRIMARY KEY,
        body BYTEA NOT NULL,
        sealed BOOLEAN NOT NULL DEFAULT FALSE
    );
    CREATE TABLE snapshots (
        version TEXT PRIMARY KEY,
        created_at DOUBLE PRECISION NOT NULL,
        size_bytes BIGINT NOT NULL
    );
    CREATE TABLE snapshot_resources (
        version TEXT NOT NULL REFERENCES snapshots(version),
        type_url TEXT NOT NULL,
        name TEXT NOT NULL,
        blob_hash TEXT NOT NULL REFERENCES blobs(hash),
        PRIMARY KEY (version, type_url, name)
    );
    CREATE TABLE history (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        grp TEXT NOT NULL,
        action TEXT NOT NULL,
        version TEXT NOT NULL REFERENCES snapshots(version),
        parent_version TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        actor TEXT NOT NULL,
        message TEXT NOT NULL
    );
    CREATE INDEX history_by_group ON history (grp, id);
    CREATE TABLE rollouts (
        grp TEXT PRIMARY KEY,
        record TEXT NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE pointers (
        grp TEXT NOT NULL,
        name TEXT NOT NULL,
        version TEXT NOT NULL REFERENCES snapshots(version),
        PRIMARY KEY (grp, name)
    );
    CREATE TABLE store_key (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        check_value BYTEA NOT NULL
    );
    """,
    # 2: replicas. Their heartbeats, the state of the nodes each serves (fleet evidence),
    # admin commands followers hand to the leader, and notifications of every change.
    """
    CREATE TABLE replicas (
        id TEXT PRIMARY KEY,
        started_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
        heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
        evidence_generation BIGINT NOT NULL DEFAULT 0
    );
    CREATE TABLE nodes (
        replica TEXT NOT NULL REFERENCES replicas(id) ON DELETE CASCADE,
        stream_id BIGINT NOT NULL,
        record TEXT NOT NULL,
        PRIMARY KEY (replica, stream_id)
    );
    CREATE TABLE commands (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        replica TEXT NOT NULL,
        request TEXT NOT NULL,
        deadline TIMESTAMPTZ NOT NULL,
        claimed_by TEXT,
        outcome TEXT,
        done_at TIMESTAMPTZ
    );
    CREATE FUNCTION xdscp_notify_state() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN PERFORM pg_notify('xdscp_state', TG_TABLE_NAME); RETURN NULL; END $$;
    CREATE TRIGGER pointers_changed AFTER INSERT OR UPDATE OR DELETE ON pointers
        FOR EACH STATEMENT EXECUTE FUNCTION xdscp_notify_state();
    CREATE TRIGGER rollouts_changed AFTER INSERT OR UPDATE OR DELETE ON rollouts
        FOR EACH STATEMENT EXECUTE FUNCTION xdscp_notify_state();
    CREATE FUNCTION xdscp_notify_command() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'INSERT' THEN PERFORM pg_notify('xdscp_commands', NEW.id::text);
        ELSIF NEW.done_at IS NOT NULL THEN PERFORM pg_notify('xdscp_command_done', NEW.id::text);
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER commands_changed AFTER INSERT OR UPDATE ON commands
        FOR EACH ROW EXECUTE FUNCTION xdscp_notify_command();
    """,
)
SCHEMA_VERSION = len(_MIGRATIONS)


class PostgresStore:
    def __init__(self, url: DatabaseUrl, *, sealer: Sealer | None = None) -> None:
        """Connect, take the server lock, migrate, check the key. StoreError (naming the
        database, never the password) if any of it fails."""
        self.url = url
        self.name = f"database {url.describe()}"
        self._sealer = sealer
        self._sealing = StoreSealing(sealer, self.name)
        self._lock = threading.Lock()
        self._db: psycopg.Connection[Any] | None = None
        self._leading = False
        with self._lock:
            db = self._connection("open")
            try:
                with self._errors("open"), db.transaction():
                    migrate(db, self.name)
                    row = db.execute("SELECT check_value FROM store_key").fetchone()
                    if check := self._sealing.check_key(bytes(row[0]) if row else None):
                        db.execute(
                            "INSERT INTO store_key (id, check_value) VALUES (1, %s)", (check,)
                        )
                self._report_plain_secrets(db)
            except psycopg.Error as error:  # e.g. no right to create the tables
                self._drop()
                raise StoreError(
                    f"{self.name}: cannot open the store: {self._reason(error)}"
                ) from None
            except BaseException:
                self._drop()
                raise

    def publish(self, group: str, snapshot: Snapshot, *, message: str, actor: str) -> PublishResult:
        def publish(db: psycopg.Connection[Any]) -> PublishResult:
            self._fence(db)
            if _pointer(db, group, STABLE) == snapshot.version:
                return PublishResult(self._latest_entry(db, group), changed=False)
            entry = self._transition(
                db,
                group,
                action="publish",
                version=snapshot.version,
                actor=actor,
                message=message,
                snapshot=snapshot,
                pointers={STABLE: snapshot.version},
                rollout=KEEP,
            )
            return PublishResult(entry, changed=True)

        return self.run("publish", publish, write=True)

    def transition(
        self,
        group: str,
        *,
        action: str,
        version: str,
        actor: str,
        message: str,
        snapshot: Snapshot | None = None,
        pointers: Mapping[str, str | None] | None = None,
        rollout: Mapping[str, Any] | _Keep | None = KEEP,
    ) -> HistoryEntry:
        def transition(db: psycopg.Connection[Any]) -> HistoryEntry:
            self._fence(db)
            return self._transition(
                db,
                group,
                action=action,
                version=version,
                actor=actor,
                message=message,
                snapshot=snapshot,
                pointers=pointers or {},
                rollout=rollout,
            )

        return self.run(action, transition, write=True)

    def save_rollout(self, group: str, record: Mapping[str, Any]) -> None:
        """Replace `group`'s rollout record (the gate's evidence so far), nothing else."""

        def save(db: psycopg.Connection[Any]) -> None:
            self._fence(db)
            _save_rollout(db, group, record)

        self.run("save a rollout", save, write=True)

    def put(self, snapshot: Snapshot) -> None:
        """Store `snapshot` without pointing anything at it (any replica may: it is
        addressed by its content)."""
        self.run("store a snapshot", lambda db: self._put(db, snapshot), write=True)

    def rollouts(self) -> dict[str, dict[str, Any]]:
        rows = self.run(
            "read rollouts",
            lambda db: db.execute("SELECT grp, record FROM rollouts ORDER BY grp").fetchall(),
        )
        return {group: json.loads(record) for group, record in rows}

    def get(self, version: str) -> Snapshot | None:
        def read(db: psycopg.Connection[Any]) -> tuple[list[Any], bool]:
            rows = db.execute(
                "SELECT r.type_url, r.name, b.hash, b.body, b.sealed FROM snapshot_resources r "
                "JOIN blobs b ON b.hash = r.blob_hash WHERE r.version = %s",
                (version,),
            ).fetchall()
            known = db.execute("SELECT 1 FROM snapshots WHERE version = %s", (version,)).fetchone()
            return rows, known is not None

        rows, known = self.run("read a snapshot", read)
        if not known:
            return None
        snapshot = Snapshot.from_serialized(
            (t, n, self._sealing.plaintext(h, bytes(b), sealed)) for t, n, h, b, sealed in rows
        )
        if snapshot.version != version:
            raise StoreError(f"{self.name}: snapshot {version} reads back as {snapshot.version}")
        return snapshot

    def pointer(self, group: str, name: str = STABLE) -> str | None:
        return self.run("read a pointer", lambda db: _pointer(db, group, name))

    def pointers(self) -> dict[str, dict[str, str]]:
        rows = self.run(
            "read pointers",
            lambda db: db.execute(
                "SELECT grp, name, version FROM pointers ORDER BY grp, name"
            ).fetchall(),
        )
        result: dict[str, dict[str, str]] = {}
        for group, name, version in rows:
            result.setdefault(group, {})[name] = version
        return result

    def history(self, group: str | None = None, limit: int = 100) -> list[HistoryEntry]:
        query = "SELECT * FROM history"
        params: tuple[object, ...] = ()
        if group is not None:
            query += " WHERE grp = %s"
            params = (group,)
        rows = self.run(
            "read history",
            lambda db: db.execute(
                query + " ORDER BY id DESC LIMIT %s", (*params, limit)
            ).fetchall(),
        )
        return [HistoryEntry(*row) for row in rows]

    def close(self) -> None:
        """Closing the connection also releases the leader lock."""
        with self._lock:
            self._drop()

    def run(
        self, what: str, work: Callable[[psycopg.Connection[Any]], _T], *, write: bool = False
    ) -> _T:
        """`work` in one transaction on the (re)connected connection, under the lock."""
        with self._lock:
            db = self._connection(what)
            with self._errors(what, write=write), db.transaction():
                return work(db)

    @contextmanager
    def _errors(self, what: str, *, write: bool = False) -> Iterator[None]:
        """A lost connection becomes a StoreError naming the database; the next call
        reconnects. Errors of the SQL itself (a constraint) pass through as they are."""
        try:
            yield
        except psycopg.OperationalError as error:
            self._drop()
            outcome = (
                " (if it failed while committing, it may have been committed: see `xdsctl snapshots`)"
                if write
                else ""
            )
            raise StoreError(
                f"{self.name}: {what} failed, the database is unavailable{outcome}: "
                f"{self._reason(error)}"
            ) from None

    def _reason(self, error: BaseException) -> str:
        lines = [line for line in str(error).splitlines() if line.strip()]
        return self.url.hide(lines[0].strip() if lines else type(error).__name__)

    def _connection(self, what: str) -> psycopg.Connection[Any]:
        if self._db is not None and not self._db.closed and not self._db.broken:
            return self._db
        self._drop()
        try:
            db = psycopg.connect(
                self.url.url,
                autocommit=True,  # each call is an explicit transaction (db.transaction())
                application_name=f"xdscp serve pid {os.getpid()}",
                **{k: v for k, v in CONNECTION_DEFAULTS.items() if k not in self.url.options},
            )
        except psycopg.Error as error:
            raise StoreError(
                f"{self.name}: {what} failed, the database is unavailable: {self._reason(error)}"
            ) from None
        try:
            # Durable before a publish returns, whatever the server's default is.
            db.execute("SET synchronous_commit TO on")
        except psycopg.Error as error:
            db.close()
            raise StoreError(
                f"{self.name}: {what} failed, the database is unavailable: {self._reason(error)}"
            ) from None
        self._db = db
        self._leading = False  # a session lock does not outlive its connection
        return db

    def lead(self) -> bool:
        """Take the leader lock if it is free; whether this store's connection holds it.
        StoreError if the database cannot be reached (the lead is lost with the connection)."""
        return self.run("take the lead", self._take_lead)

    def _take_lead(self, db: psycopg.Connection[Any]) -> bool:
        if not self._leading:
            row = db.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK_KEY,)).fetchone()
            self._leading = bool(row and row[0])
        else:
            db.execute("SELECT 1")  # the connection, and so the lock, is still there
        return self._leading

    def _fence(self, db: psycopg.Connection[Any]) -> None:
        """Only the leader writes pointers and rollouts: a replica that lost the lead (or
        never had it) is refused, naming who holds it."""
        if not self._take_lead(db):
            raise StoreError(
                f"{self.name}: another replica is the rollout leader{self._lock_holder(db)}: "
                "only it may publish or move pointers"
            )

    @staticmethod
    def _lock_holder(db: psycopg.Connection[Any]) -> str:
        """' (xdscp serve pid N, from ADDRESS)', as far as pg_stat_activity tells."""
        row = db.execute(
            "SELECT a.application_name, host(a.client_addr) FROM pg_locks l "
            "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' "
            "AND l.granted AND l.database = (SELECT oid FROM pg_database "
            "WHERE datname = current_database()) "
            "AND ((l.classid::bigint << 32) | l.objid::bigint) = %s LIMIT 1",
            (LEADER_LOCK_KEY,),
        ).fetchone()
        if row is None:
            return ""
        name, address = (str(value)[:100] if value else "" for value in row)
        where = f", from {address}" if address else ""
        return f" ({name or 'unnamed client'}{where})"

    def _drop(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()

    def _report_plain_secrets(self, db: psycopg.Connection[Any]) -> None:
        if self._sealer is None:
            return
        (plain,) = db.execute(
            "SELECT COUNT(DISTINCT b.hash) FROM snapshot_resources r "
            "JOIN blobs b ON b.hash = r.blob_hash WHERE r.type_url = %s AND NOT b.sealed",
            (SECRET,),
        ).fetchone() or (0,)
        if plain:
            log.warning(
                "store holds secrets written before it had a key; they stay unencrypted",
                store=self.name,
                plaintext_secrets=plain,
            )

    def _latest_entry(self, db: psycopg.Connection[Any], group: str) -> HistoryEntry:
        row = db.execute(
            "SELECT * FROM history WHERE grp = %s ORDER BY id DESC LIMIT 1", (group,)
        ).fetchone()
        assert row is not None
        return HistoryEntry(*row)

    def _transition(
        self,
        db: psycopg.Connection[Any],
        group: str,
        *,
        action: str,
        version: str,
        actor: str,
        message: str,
        snapshot: Snapshot | None,
        pointers: Mapping[str, str | None],
        rollout: Mapping[str, Any] | _Keep | None,
    ) -> HistoryEntry:
        if snapshot is not None:
            self._put(db, snapshot)
        parent = _pointer(db, group, STABLE)
        for name, target in pointers.items():
            if target is None:
                db.execute("DELETE FROM pointers WHERE grp = %s AND name = %s", (group, name))
            else:
                db.execute(
                    "INSERT INTO pointers (grp, name, version) VALUES (%s, %s, %s) "
                    "ON CONFLICT (grp, name) DO UPDATE SET version = excluded.version",
                    (group, name, target),
                )
        if rollout is None:
            db.execute("DELETE FROM rollouts WHERE grp = %s", (group,))
        elif not isinstance(rollout, _Keep):
            _save_rollout(db, group, rollout)
        return self._append_history(db, group, action, version, parent, actor, message)

    def _put(self, db: psycopg.Connection[Any], snapshot: Snapshot) -> None:
        exists = db.execute(
            "SELECT 1 FROM snapshots WHERE version = %s", (snapshot.version,)
        ).fetchone()
        if exists:
            return
        db.execute(
            "INSERT INTO snapshots (version, created_at, size_bytes) VALUES (%s, %s, %s)",
            (snapshot.version, time.time(), snapshot.size_bytes),
        )
        blobs: list[tuple[str, bytes, bool]] = []
        rows: list[tuple[str, str, str, str]] = []
        for resource in snapshot.all_resources():
            blob_hash, stored, sealed = self._sealing.blob(resource)
            blobs.append((blob_hash, stored, sealed))
            rows.append((snapshot.version, resource.type_url, resource.name, blob_hash))
        with db.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO blobs (hash, body, sealed) VALUES (%s, %s, %s) "
                "ON CONFLICT (hash) DO NOTHING",
                blobs,
            )
            cursor.executemany(
                "INSERT INTO snapshot_resources (version, type_url, name, blob_hash) "
                "VALUES (%s, %s, %s, %s)",
                rows,
            )

    def _append_history(
        self,
        db: psycopg.Connection[Any],
        group: str,
        action: str,
        version: str,
        parent: str | None,
        actor: str,
        message: str,
    ) -> HistoryEntry:
        created_at = time.time()
        row = db.execute(
            "INSERT INTO history (grp, action, version, parent_version, created_at, actor, "
            "message) VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id",
            (group, action, version, parent, created_at, actor, message),
        ).fetchone()
        assert row is not None
        return HistoryEntry(row[0], group, action, version, parent, created_at, actor, message)


def _save_rollout(db: psycopg.Connection[Any], group: str, record: Mapping[str, Any]) -> None:
    db.execute(
        "INSERT INTO rollouts (grp, record, updated_at) VALUES (%s, %s, %s) "
        "ON CONFLICT (grp) DO UPDATE SET record = excluded.record, "
        "updated_at = excluded.updated_at",
        (group, json.dumps(dict(record), sort_keys=True), time.time()),
    )


def _pointer(db: psycopg.Connection[Any], group: str, name: str) -> str | None:
    row = db.execute(
        "SELECT version FROM pointers WHERE grp = %s AND name = %s", (group, name)
    ).fetchone()
    return row[0] if row else None


def migrate(db: psycopg.Connection[Any], name: str) -> None:
    """Bring the schema to SCHEMA_VERSION; call inside a transaction (it takes the
    migration lock until that transaction ends). `name`: the database, for messages."""
    db.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
    db.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        "version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
    )
    row = db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()
    found = row[0] if row else 0
    if found > SCHEMA_VERSION:
        raise StoreError(
            f"{name}: schema version {found} is newer than this xdscp's "
            f"({SCHEMA_VERSION}); run a newer xdscp"
        )
    for version in range(found + 1, SCHEMA_VERSION + 1):
        db.execute(_MIGRATIONS[version - 1])
        db.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (%s, %s)",
            (version, time.time()),
        )
        log.info("store schema migrated", store=name, schema_version=version)
