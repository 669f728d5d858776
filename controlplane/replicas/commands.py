"""Operator commands (publish, promote, abort, rollback) on any replica: the leader carries
them out itself; a follower hands them to the leader through the database (tables.py) and
waits for the outcome, so every pointer move is the leader's.

A command the leader has not claimed by its deadline is withdrawn, and the caller is told
nothing changed. One it claimed is waited for a while longer: its outcome is on its way.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import structlog

from controlplane.replicas.tables import Command, ReplicaTables
from controlplane.rollout.controller import (
    NotFoundError,
    PublishOutcome,
    RollbackOutcome,
    RolloutController,
    RolloutError,
)
from controlplane.rollout.gate import Rollout
from controlplane.snapshot import Snapshot
from controlplane.store import StoreError
from controlplane.store.postgres import PostgresStore

log = structlog.get_logger("replicas")

CLAIM_TIMEOUT_SECONDS = 15.0  # for a leader to take the command (a takeover takes a few)
OUTCOME_TIMEOUT_SECONDS = 30.0  # then, for the leader to finish it
POLL_SECONDS = 1.0  # a missed notification costs at most this
_ERRORS: dict[str, type[Exception]] = {
    "not_found": NotFoundError,
    "rollout": RolloutError,
    "store": StoreError,
}


class LeaderCommands:
    """The operator commands as the admin API calls them, whichever replica it reached."""

    def __init__(
        self,
        controller: RolloutController,
        store: PostgresStore,
        tables: ReplicaTables,
        is_leader: Callable[[], bool],
    ) -> None:
        self._controller = controller
        self._store = store
        self._tables = tables
        self._is_leader = is_leader
        self._waiting: dict[int, asyncio.Event] = {}

    async def publish(
        self, group: str, snapshot: Snapshot, *, message: str, actor: str
    ) -> PublishOutcome:
        if self._is_leader():
            return await self._controller.publish(group, snapshot, message=message, actor=actor)
        await asyncio.to_thread(self._store.put, snapshot)  # the leader reads it from there
        request = {"kind": "publish", "group": group, "version": snapshot.version}
        result = await self._hand_over({**request, "message": message, "actor": actor})
        return PublishOutcome(**result)

    async def promote(self, group: str, *, actor: str, reason: str) -> Rollout:
        if self._is_leader():
            return await self._controller.promote(group, actor=actor, reason=reason)
        request = {"kind": "promote", "group": group, "actor": actor, "reason": reason}
        return Rollout.from_record(await self._hand_over(request))

    async def abort(self, group: str, *, actor: str, reason: str) -> Rollout:
        if self._is_leader():
            return await self._controller.abort(group, actor=actor, reason=reason)
        request = {"kind": "abort", "group": group, "actor": actor, "reason": reason}
        return Rollout.from_record(await self._hand_over(request))

    async def rollback(
        self, group: str, *, to_version: str | None, actor: str, reason: str
    ) -> RollbackOutcome:
        if self._is_leader():
            return await self._controller.rollback(
                group, to_version=to_version, actor=actor, reason=reason
            )
        request = {"kind": "rollback", "group": group, "to_version": to_version}
        return RollbackOutcome(
            **await self._hand_over({**request, "actor": actor, "reason": reason})
        )

    def done(self, command: int) -> None:
        """The leader recorded `command`'s outcome (told by a notification)."""
        if (event := self._waiting.get(command)) is not None:
            event.set()

    async def _hand_over(self, request: dict[str, Any]) -> dict[str, Any]:
        command = await asyncio.to_thread(self._tables.submit, request, CLAIM_TIMEOUT_SECONDS)
        event = self._waiting[command] = asyncio.Event()
        try:
            outcome = await self._await_outcome(command, event, CLAIM_TIMEOUT_SECONDS)
            if outcome is None:
                if await asyncio.to_thread(self._tables.withdraw, command):
                    raise RolloutError(
                        f"no rollout leader took the {request['kind']} within "
                        f"{CLAIM_TIMEOUT_SECONDS:g}s (is one running? see xdscp_rollout_leader); "
                        "nothing changed"
                    )
                outcome = await self._await_outcome(command, event, OUTCOME_TIMEOUT_SECONDS)
            if outcome is None:
                raise RolloutError(
                    f"the rollout leader took the {request['kind']} but did not finish it within "
                    f"{OUTCOME_TIMEOUT_SECONDS:g}s: see `xdsctl snapshots` for whether it happened"
                )
        finally:
            del self._waiting[command]
        if "error" in outcome:
            raise _ERRORS.get(outcome["error"], RolloutError)(outcome["message"])
        return dict(outcome["result"])

    async def _await_outcome(
        self, command: int, event: asyncio.Event, timeout: float
    ) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while True:
            outcome = await asyncio.to_thread(self._tables.outcome, command)
            if outcome is not None or (left := deadline - time.monotonic()) <= 0:
                return outcome
            event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), min(left, POLL_SECONDS))


async def carry_out(
    controller: RolloutController, command: Command, store: PostgresStore
) -> dict[str, Any]:
    """Run a follower's command on the leader; its outcome as the follower decodes it."""
    request = command.request
    kind, group = request.get("kind"), str(request.get("group", ""))
    try:
        if kind == "publish":
            snapshot = await asyncio.to_thread(store.get, str(request["version"]))
            if snapshot is None:
                raise NotFoundError(f"version {request['version']} is not in the store")
            published = await controller.publish(
                group, snapshot, message=str(request["message"]), actor=str(request["actor"])
            )
            return {"result": asdict(published)}
        if kind in ("promote", "abort"):
            step = controller.promote if kind == "promote" else controller.abort
            rollout = await step(group, actor=str(request["actor"]), reason=str(request["reason"]))
            return {"result": rollout.to_record()}
        if kind == "rollback":
            to_version = request.get("to_version")
            rolled_back = await controller.rollback(
                group,
                to_version=str(to_version) if to_version else None,
                actor=str(request["actor"]),
                reason=str(request["reason"]),
            )
            return {"result": asdict(rolled_back)}
        return {"error": "rollout", "message": f"unknown command {kind!r}"}
    except NotFoundError as error:
        return {"error": "not_found", "message": str(error)}
    except RolloutError as error:
        return {"error": "rollout", "message": str(error)}
    except StoreError as error:
        return {"error": "store", "message": str(error)}
