"""One replica among several sharing a PostgreSQL store: its part in the whole.

- Leadership: every LEAD_SECONDS it takes the leader lock if free (store/postgres.py). The
  leader runs the rollout controller (gate, probe, guard, last_good) and carries out every
  operator command; losing the lock (or the database) stops all of that at once.
- Following: a follower serves what the leader stored. It re-reads on each notification of
  a change (LISTEN/NOTIFY, notifications.py) and every RESYNC_SECONDS, which heals a missed
  one; the leader needs neither, it made the change.
- Evidence: every EVIDENCE_SECONDS it heartbeats, writes what changed in its own streams'
  evidence in one batch, and reads the other replicas' evidence when theirs changed.
- The database going away stops none of the serving: streams keep what they have and new
  ones get the config held in memory. `database_down_since` says since when (/readyz and
  xdscp_database_up show it); every loop simply retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import structlog

from controlplane.observability.metrics import Metrics
from controlplane.replicas.commands import LeaderCommands, carry_out
from controlplane.replicas.notifications import (
    COMMAND_DONE,
    COMMANDS,
    RECONNECTED,
    STATE,
    Notifications,
)
from controlplane.replicas.tables import ReplicaTables
from controlplane.rollout.controller import RolloutController
from controlplane.rollout.stored_state import read_stored
from controlplane.store import StoreError
from controlplane.store.postgres import PostgresStore
from controlplane.xds.evidence import FleetEvidence, NodeEvidence, from_json, to_json

log = structlog.get_logger("replicas")

LEAD_SECONDS = 1.0
RESYNC_SECONDS = 2.0
EVIDENCE_SECONDS = 0.5  # also the heartbeat (tables.EXPIRY_SECONDS without one: gone)
COMMAND_POLL_SECONDS = 1.0


class SharedEvidence:
    """The other replicas' evidence, as last read (FleetEvidence.remote)."""

    def __init__(self, tables: ReplicaTables, replica_id: str) -> None:
        self.generation = 0
        self._by_replica: dict[str, tuple[int, list[NodeEvidence]]] = {}
        self._tables = tables
        self._replica_id = replica_id

    async def refresh(self) -> None:
        """Read what the other replicas wrote since the last read (StoreError if the
        database cannot be read)."""
        live = await asyncio.to_thread(self._tables.live_replicas)
        live.pop(self._replica_id, None)
        for replica in self.stale(live):
            rows = await asyncio.to_thread(self._tables.evidence, replica)
            self.replace(replica, live[replica], _parse(replica, rows))

    def nodes(self) -> list[NodeEvidence]:
        return [node for _, nodes in self._by_replica.values() for node in nodes]

    def stale(self, live: dict[str, int]) -> list[str]:
        """Replicas whose evidence changed since it was read; those gone are dropped."""
        for replica in set(self._by_replica) - set(live):
            del self._by_replica[replica]
            self.generation += 1
        return [r for r, g in live.items() if self._by_replica.get(r, (None,))[0] != g]

    def replace(self, replica: str, generation: int, nodes: list[NodeEvidence]) -> None:
        self._by_replica[replica] = (generation, nodes)
        self.generation += 1


class Replica:
    def __init__(
        self,
        replica_id: str,
        store: PostgresStore,
        controller: RolloutController,
        evidence: FleetEvidence,
        metrics: Metrics,
    ) -> None:
        self.replica_id = replica_id
        self._store = store
        self._controller = controller
        self._evidence = evidence
        self._metrics = metrics
        self._tables = ReplicaTables(store, replica_id)
        self._shared = SharedEvidence(self._tables, replica_id)
        evidence.remote = self._shared
        self.commands = LeaderCommands(controller, store, self._tables, lambda: self.leading)
        self.leading = False
        self.database_down_since: float | None = None
        self._resync = asyncio.Event()
        self._claim = asyncio.Event()
        self._written: dict[int, str] = {}  # stream id -> evidence as last written
        self._registered = False
        self._shared_generation = -1  # this replica's fleet generation, as last written
        self._notifications: Notifications | None = None
        self._state_notified = False
        self._tasks: list[asyncio.Task[None]] = []
        metrics.rollout_leader.set(0)

    async def start(self) -> None:
        """Serve the stored state (as leader or follower) before xDS answers, then run."""
        self._notifications = Notifications(
            self._store.url, asyncio.get_running_loop(), self._notified
        )
        self._notifications.start()
        await self._lead_or_follow()
        if not self.leading:
            await self._follow()
        self._tasks = [
            asyncio.create_task(self._every(LEAD_SECONDS, self._lead_or_follow, health=True)),
            asyncio.create_task(self._every(RESYNC_SECONDS, self._follow, self._resync)),
            asyncio.create_task(self._every(EVIDENCE_SECONDS, self._share_evidence, health=True)),
            asyncio.create_task(self._every(COMMAND_POLL_SECONDS, self._carry_out, self._claim)),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.leading:
            await self._controller.step_down()
        if self._notifications is not None:
            await asyncio.to_thread(self._notifications.stop)
        with contextlib.suppress(StoreError):  # then the others expire it
            await asyncio.to_thread(self._tables.leave)

    def _notified(self, channel: str, payload: str) -> None:
        if channel == STATE:
            self._state_notified = True
        if channel in (STATE, RECONNECTED):
            self._resync.set()
        elif channel == COMMANDS:
            self._claim.set()
        elif channel == COMMAND_DONE and payload.isdigit():
            self.commands.done(int(payload))

    async def _every(
        self,
        seconds: float,
        step: Callable[[], Awaitable[None]],
        wake: asyncio.Event | None = None,
        *,
        health: bool = False,
    ) -> None:
        """`step` every `seconds`, or sooner when `wake` is set. A database error marks it
        unreachable (and the next step retries); any other error is logged, never fatal.
        `health`: the step always uses the database, so its success means it is back."""
        while True:
            if wake is None:
                await asyncio.sleep(seconds)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), seconds)
                wake.clear()
            try:
                await step()
            except StoreError as error:
                self._database_lost(error)
            except Exception:
                log.exception("replica step failed", step=getattr(step, "__name__", ""))
            else:
                if health:
                    self._database_back()

    # -- leadership -------------------------------------------------------------------------

    async def _lead_or_follow(self) -> None:
        try:
            leads = await asyncio.to_thread(self._store.lead)
        except StoreError:
            await self._step_down("lost the database")
            raise
        if leads and not self.leading:
            self.leading = True
            self._metrics.rollout_leader.set(1)
            log.warning("rollout leader", replica=self.replica_id)
            try:
                await self._controller.load(resume=True)
            except StoreError:
                await self._step_down("could not take over the stored state")
                raise
            self._controller.start()
            self._claim.set()  # commands handed over while nobody led
        elif not leads and self.leading:
            await self._step_down("another replica holds the leader lock")

    async def _step_down(self, why: str) -> None:
        if not self.leading:
            return
        self.leading = False
        self._metrics.rollout_leader.set(0)
        log.warning("rollout leader lost", replica=self.replica_id, reason=why)
        await self._controller.step_down()
        self._resync.set()

    # -- following --------------------------------------------------------------------------

    async def _follow(self) -> None:
        if self.leading:
            return
        # `notified`: the change came with its notification, by the end of the read that
        # saw it (not only through the periodic re-read).
        notified, self._state_notified = self._state_notified, False
        known = self._controller.snapshots_served()
        state = await asyncio.to_thread(read_stored, self._store, known)
        notified = notified or self._state_notified
        if not self.leading:  # it may have taken the lead meanwhile
            for group, version in self._controller.follow(state).items():
                log.info("followed the leader", group=group, stable=version, notified=notified)

    # -- commands ---------------------------------------------------------------------------

    async def _carry_out(self) -> None:
        if not self.leading:
            return
        for command in await asyncio.to_thread(self._tables.claim):
            outcome = await carry_out(self._controller, command, self._store)
            await asyncio.to_thread(self._tables.finish, command.id, outcome)

    # -- evidence ---------------------------------------------------------------------------

    async def _share_evidence(self) -> None:
        """Heartbeat with this replica's changed evidence; read the others' that changed."""
        generation = self._evidence.local_generation
        if self._registered and generation == self._shared_generation:
            mine = self._written  # nothing came, went, ACKed or NACKed: a heartbeat alone
        else:
            mine = {e.status.stream_id: to_json(e) for e in self._evidence.local()}
        upserts = {s: text for s, text in mine.items() if self._written.get(s) != text}
        deletes = [s for s in self._written if s not in mine]
        if not self._registered:
            upserts = mine
        registered = await asyncio.to_thread(
            self._tables.beat, upserts, deletes, rewrite=not self._registered
        )
        self._written = mine
        self._shared_generation = generation
        self._registered = registered  # not found (expired): all of it again next time
        await self._shared.refresh()

    # -- the database's health --------------------------------------------------------------

    def _database_lost(self, error: StoreError) -> None:
        if self.database_down_since is None:
            self.database_down_since = time.time()
            self._metrics.database_up.set(0)
            self._registered = False
            log.error(
                "database unreachable: serving the config held in memory",
                replica=self.replica_id,
                error=str(error),
            )

    def _database_back(self) -> None:
        if self.database_down_since is not None:
            log.warning(
                "database reachable again",
                replica=self.replica_id,
                seconds=round(time.time() - self.database_down_since, 1),
            )
            self.database_down_since = None
            self._metrics.database_up.set(1)
            self._resync.set()  # catch up with what changed meanwhile

    def readiness(self) -> str:
        """The /readyz body: ready either way (it serves), saying what it lacks."""
        if self.database_down_since is None:
            return "ready\n"
        seconds = time.time() - self.database_down_since
        return f"ready; database unreachable for {seconds:.0f}s: serving the config it holds\n"


def _parse(replica: str, rows: list[str]) -> list[NodeEvidence]:
    nodes = []
    for row in rows:
        try:
            nodes.append(from_json(row))
        except ValueError as error:
            log.warning("fleet evidence unreadable, skipped", replica=replica, error=str(error))
    return nodes
