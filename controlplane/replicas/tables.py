"""The replicas' own tables in the shared database (schema: store/postgres.py, migration 2).

- `replicas`: one row a live replica, its heartbeat refreshed twice a second. A
  replica silent for EXPIRY_SECONDS is gone: its row, and with it the evidence of the nodes it
  served, is deleted by whichever replica notices first.
- `nodes`: each replica's evidence of the streams it serves, one row a stream, written in
  batches; `evidence_generation` (in `replicas`) tells readers which replicas changed.
- `commands`: admin calls a follower hands to the leader; the leader claims each one once,
  before its deadline, and writes its outcome.

Times are the database's (clock_timestamp()), so replicas' clocks need not agree.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from controlplane.store.postgres import PostgresStore

EXPIRY_SECONDS = 5.0


@dataclass(frozen=True)
class Command:
    id: int
    request: dict[str, Any]


class ReplicaTables:
    def __init__(self, store: PostgresStore, replica_id: str) -> None:
        self._store = store
        self.replica_id = replica_id

    # -- heartbeat and evidence ---------------------------------------------------------------

    def beat(
        self, upserts: Mapping[int, str], deletes: Sequence[int], *, rewrite: bool = False
    ) -> bool:
        """Heartbeat, and write this replica's changed evidence in the same transaction.
        `rewrite`: `upserts` is all of it (rows not in it go). Returns False when the row was
        missing (expired, or first beat): the caller must then send all of its evidence."""

        def beat(db: psycopg.Connection[Any]) -> bool:
            found = db.execute(
                "UPDATE replicas SET heartbeat_at = clock_timestamp(), "
                "evidence_generation = evidence_generation + %s WHERE id = %s",
                (1 if upserts or deletes or rewrite else 0, self.replica_id),
            ).rowcount
            if not found:
                db.execute("INSERT INTO replicas (id) VALUES (%s)", (self.replica_id,))
            if rewrite or not found:
                db.execute("DELETE FROM nodes WHERE replica = %s", (self.replica_id,))
            with db.cursor() as cursor:
                if deletes:
                    cursor.execute(
                        "DELETE FROM nodes WHERE replica = %s AND stream_id = ANY(%s)",
                        (self.replica_id, list(deletes)),
                    )
                if upserts:
                    cursor.executemany(
                        "INSERT INTO nodes (replica, stream_id, record) VALUES (%s, %s, %s) "
                        "ON CONFLICT (replica, stream_id) DO UPDATE SET record = excluded.record",
                        [(self.replica_id, stream, record) for stream, record in upserts.items()],
                    )
            return bool(found)

        return self._store.run("heartbeat", beat, write=True)

    def live_replicas(self) -> dict[str, int]:
        """{replica id: evidence generation} of every replica that heartbeats, after
        deleting those that stopped (and their evidence)."""

        def live(db: psycopg.Connection[Any]) -> dict[str, int]:
            db.execute(
                "DELETE FROM replicas WHERE heartbeat_at < clock_timestamp() - "
                "make_interval(secs => %s)",
                (EXPIRY_SECONDS,),
            )
            rows = db.execute("SELECT id, evidence_generation FROM replicas").fetchall()
            return {replica: generation for replica, generation in rows}

        return self._store.run("read replicas", live)

    def evidence(self, replica: str) -> list[str]:
        rows = self._store.run(
            "read fleet evidence",
            lambda db: db.execute(
                "SELECT record FROM nodes WHERE replica = %s", (replica,)
            ).fetchall(),
        )
        return [record for (record,) in rows]

    def leave(self) -> None:
        """On a clean stop: this replica's evidence goes at once, not after the expiry."""
        self._store.run(
            "leave",
            lambda db: db.execute("DELETE FROM replicas WHERE id = %s", (self.replica_id,)),
            write=True,
        )

    # -- commands ---------------------------------------------------------------------------

    def submit(self, request: Mapping[str, Any], timeout: float) -> int:
        row = self._store.run(
            "hand a command to the leader",
            lambda db: db.execute(
                "INSERT INTO commands (replica, request, deadline) VALUES (%s, %s, "
                "clock_timestamp() + make_interval(secs => %s)) RETURNING id",
                (self.replica_id, json.dumps(dict(request)), timeout),
            ).fetchone(),
            write=True,
        )
        assert row is not None
        return int(row[0])

    def claim(self) -> list[Command]:
        """Commands nobody claimed whose deadline has not passed, now this replica's; and
        done ones older than an hour deleted."""

        def claim(db: psycopg.Connection[Any]) -> list[Command]:
            db.execute(
                "DELETE FROM commands WHERE deadline < clock_timestamp() - interval '1 hour'"
            )
            rows = db.execute(
                "UPDATE commands SET claimed_by = %s WHERE id IN (SELECT id FROM commands "
                "WHERE claimed_by IS NULL AND deadline > clock_timestamp() ORDER BY id "
                "FOR UPDATE SKIP LOCKED) RETURNING id, request",
                (self.replica_id,),
            ).fetchall()
            return [Command(id, json.loads(request)) for id, request in sorted(rows)]

        return self._store.run("claim commands", claim, write=True)

    def finish(self, command: int, outcome: Mapping[str, Any]) -> None:
        self._store.run(
            "record a command's outcome",
            lambda db: db.execute(
                "UPDATE commands SET outcome = %s, done_at = clock_timestamp() WHERE id = %s",
                (json.dumps(dict(outcome)), command),
            ),
            write=True,
        )

    def outcome(self, command: int) -> dict[str, Any] | None:
        row = self._store.run(
            "read a command's outcome",
            lambda db: db.execute(
                "SELECT outcome FROM commands WHERE id = %s AND done_at IS NOT NULL", (command,)
            ).fetchone(),
        )
        return json.loads(row[0]) if row else None

    def withdraw(self, command: int) -> bool:
        """Take back a command no leader claimed; False if one did (its outcome will come)."""
        return bool(
            self._store.run(
                "withdraw a command",
                lambda db: (
                    db.execute(
                        "DELETE FROM commands WHERE id = %s AND claimed_by IS NULL", (command,)
                    ).rowcount
                ),
                write=True,
            )
        )
