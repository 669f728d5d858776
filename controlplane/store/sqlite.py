"""SQLite SnapshotStore: the embedded default, in WAL mode.

Resource bodies are stored once by content hash, so a long history of small changes does not
copy the whole config each time. Reads verify that the bytes still hash to the version.

Its files are owner-only (see files.py). Given a key (see sealing.py), it seals the bodies of
Secret resources and keeps everything else plain; a store once opened with a key opens only
with that key. Secrets stored before the key was first given stay readable, unencrypted.
The schema version is SQLite's user_version; older stores are upgraded at open.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog

from controlplane.resources import SECRET
from controlplane.snapshot import Snapshot
from controlplane.store import KEEP, STABLE, HistoryEntry, PublishResult, StoreError, _Keep, files
from controlplane.store.sealing import Sealer, StoreSealing

log = structlog.get_logger("store")

_SCHEMA_VERSION = 3
# A plain blob is kept under the sha256 of its body; a sealed one (sealed = 1) under the
# HMAC of its plaintext, as nonce + ciphertext + tag (see sealing.py).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    hash TEXT PRIMARY KEY,
    body BLOB NOT NULL,
    sealed INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS snapshots (
    version TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    size_bytes INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshot_resources (
    version TEXT NOT NULL REFERENCES snapshots(version),
    type_url TEXT NOT NULL,
    name TEXT NOT NULL,
    blob_hash TEXT NOT NULL REFERENCES blobs(hash),
    PRIMARY KEY (version, type_url, name)
);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    grp TEXT NOT NULL,
    action TEXT NOT NULL,
    version TEXT NOT NULL REFERENCES snapshots(version),
    parent_version TEXT,
    created_at REAL NOT NULL,
    actor TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS history_by_group ON history (grp, id);
CREATE TABLE IF NOT EXISTS rollouts (
    grp TEXT PRIMARY KEY,
    record TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS pointers (
    grp TEXT NOT NULL,
    name TEXT NOT NULL,
    version TEXT NOT NULL REFERENCES snapshots(version),
    PRIMARY KEY (grp, name)
);
CREATE TABLE IF NOT EXISTS store_key (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    check_value BLOB NOT NULL
);
"""
# What brings a store of schema version N to N + 1, before _SCHEMA adds any new tables.
_UPGRADES = {
    1: "",  # 2 adds the rollouts table
    2: "ALTER TABLE blobs ADD COLUMN sealed INTEGER NOT NULL DEFAULT 0",  # 3 adds store_key
}


class SQLiteStore:
    def __init__(self, path: str | Path, *, sealer: Sealer | None = None) -> None:
        """`sealer`: seal secrets with this key (`serve --store-key-file`)."""
        self.path = Path(path)
        self._sealer = sealer
        self._sealing = StoreSealing(sealer, str(self.path))
        files.prepare(self.path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=5000")
            with self._transaction():
                self._upgrade_schema()
                row = self._db.execute("SELECT check_value FROM store_key").fetchone()
                if check := self._sealing.check_key(bytes(row[0]) if row else None):
                    self._db.execute(
                        "INSERT INTO store_key (id, check_value) VALUES (1, ?)", (check,)
                    )
            self._report_plain_secrets()
        except BaseException:
            self._db.close()
            raise

    def publish(self, group: str, snapshot: Snapshot, *, message: str, actor: str) -> PublishResult:
        with self._lock, self._transaction():
            if self._pointer(group, STABLE) == snapshot.version:
                return PublishResult(self._latest_entry(group), changed=False)
            entry = self._transition(
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
        with self._lock, self._transaction():
            return self._transition(
                group,
                action=action,
                version=version,
                actor=actor,
                message=message,
                snapshot=snapshot,
                pointers=pointers or {},
                rollout=rollout,
            )

    def save_rollout(self, group: str, record: Mapping[str, Any]) -> None:
        with self._lock, self._transaction():
            self._save_rollout(group, record)

    def _save_rollout(self, group: str, record: Mapping[str, Any]) -> None:
        self._db.execute(
            "INSERT INTO rollouts (grp, record, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (grp) DO UPDATE SET record = excluded.record, "
            "updated_at = excluded.updated_at",
            (group, json.dumps(dict(record), sort_keys=True), time.time()),
        )

    def rollouts(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT grp, record FROM rollouts ORDER BY grp").fetchall()
        return {group: json.loads(record) for group, record in rows}

    def get(self, version: str) -> Snapshot | None:
        with self._lock:
            rows = self._db.execute(
                "SELECT r.type_url, r.name, b.hash, b.body, b.sealed FROM snapshot_resources r "
                "JOIN blobs b ON b.hash = r.blob_hash WHERE r.version = ?",
                (version,),
            ).fetchall()
            known = self._db.execute(
                "SELECT 1 FROM snapshots WHERE version = ?", (version,)
            ).fetchone()
        if known is None:
            return None
        snapshot = Snapshot.from_serialized(
            (t, n, self._sealing.plaintext(h, bytes(b), sealed)) for t, n, h, b, sealed in rows
        )
        if snapshot.version != version:
            raise StoreError(f"{self.path}: snapshot {version} reads back as {snapshot.version}")
        return snapshot

    def pointer(self, group: str, name: str = STABLE) -> str | None:
        with self._lock:
            return self._pointer(group, name)

    def pointers(self) -> dict[str, dict[str, str]]:
        with self._lock:
            rows = self._db.execute("SELECT grp, name, version FROM pointers ORDER BY grp, name")
            result: dict[str, dict[str, str]] = {}
            for group, name, version in rows:
                result.setdefault(group, {})[name] = version
            return result

    def history(self, group: str | None = None, limit: int = 100) -> list[HistoryEntry]:
        query = "SELECT * FROM history"
        params: tuple[object, ...] = ()
        if group is not None:
            query += " WHERE grp = ?"
            params = (group,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY id DESC LIMIT ?", (*params, limit))
            return [HistoryEntry(*row) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def _upgrade_schema(self) -> None:
        found = self._db.execute("PRAGMA user_version").fetchone()[0]
        if found > _SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: schema version {found} is newer than this xdscp's "
                f"({_SCHEMA_VERSION}); run a newer xdscp"
            )
        for old in range(found or _SCHEMA_VERSION, _SCHEMA_VERSION):  # 0: a new store
            if _UPGRADES[old]:
                self._db.execute(_UPGRADES[old])
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                self._db.execute(statement)
        self._db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")

    def _report_plain_secrets(self) -> None:
        if self._sealer is None:
            return
        (plain,) = self._db.execute(
            "SELECT COUNT(DISTINCT b.hash) FROM snapshot_resources r "
            "JOIN blobs b ON b.hash = r.blob_hash WHERE r.type_url = ? AND b.sealed = 0",
            (SECRET,),
        ).fetchone()
        if plain:
            log.warning(
                "store holds secrets written before it had a key; they stay unencrypted",
                store=str(self.path),
                plaintext_secrets=plain,
            )

    def _pointer(self, group: str, name: str) -> str | None:
        row = self._db.execute(
            "SELECT version FROM pointers WHERE grp = ? AND name = ?", (group, name)
        ).fetchone()
        return row[0] if row else None

    def _latest_entry(self, group: str) -> HistoryEntry:
        row = self._db.execute(
            "SELECT * FROM history WHERE grp = ? ORDER BY id DESC LIMIT 1", (group,)
        ).fetchone()
        return HistoryEntry(*row)

    def _transition(
        self,
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
            self._put(snapshot)
        parent = self._pointer(group, STABLE)
        for name, target in pointers.items():
            if target is None:
                self._db.execute("DELETE FROM pointers WHERE grp = ? AND name = ?", (group, name))
            else:
                self._db.execute(
                    "INSERT INTO pointers (grp, name, version) VALUES (?, ?, ?) "
                    "ON CONFLICT (grp, name) DO UPDATE SET version = excluded.version",
                    (group, name, target),
                )
        if rollout is None:
            self._db.execute("DELETE FROM rollouts WHERE grp = ?", (group,))
        elif not isinstance(rollout, _Keep):
            self._save_rollout(group, rollout)
        return self._append_history(group, action, version, parent, actor, message)

    def _put(self, snapshot: Snapshot) -> None:
        exists = self._db.execute(
            "SELECT 1 FROM snapshots WHERE version = ?", (snapshot.version,)
        ).fetchone()
        if exists:
            return
        self._db.execute(
            "INSERT INTO snapshots (version, created_at, size_bytes) VALUES (?, ?, ?)",
            (snapshot.version, time.time(), snapshot.size_bytes),
        )
        for resource in snapshot.all_resources():
            blob_hash, stored, sealed = self._sealing.blob(resource)
            self._db.execute(
                "INSERT OR IGNORE INTO blobs (hash, body, sealed) VALUES (?, ?, ?)",
                (blob_hash, stored, sealed),
            )
            self._db.execute(
                "INSERT INTO snapshot_resources (version, type_url, name, blob_hash) "
                "VALUES (?, ?, ?, ?)",
                (snapshot.version, resource.type_url, resource.name, blob_hash),
            )

    def _append_history(
        self, group: str, action: str, version: str, parent: str | None, actor: str, message: str
    ) -> HistoryEntry:
        created_at = time.time()
        cursor = self._db.execute(
            "INSERT INTO history (grp, action, version, parent_version, created_at, actor, message)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (group, action, version, parent, created_at, actor, message),
        )
        assert cursor.lastrowid is not None
        return HistoryEntry(
            cursor.lastrowid, group, action, version, parent, created_at, actor, message
        )


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")
