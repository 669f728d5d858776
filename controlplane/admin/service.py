"""The admin gRPC API (protos/controlplane/admin/v1/admin.proto) that xdsctl calls.

Who may call what is auth.py's business (read and write roles); this module says which calls
need the write role. Answers never show key material by accident: resources are redacted
unless the request asks for secrets, and texts that come from Envoys (NACK errors) lose any
PEM private key they quote.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import grpc
import structlog
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from controlplane import resources
from controlplane.admin import limits
from controlplane.admin.node_views import NodeConfigTooLarge, NodeViews
from controlplane.admin.v1 import admin_pb2, admin_pb2_grpc
from controlplane.config.lint import LintRefusal
from controlplane.publish import FieldRuleRefusal, build_snapshot
from controlplane.redaction import redact_pem_keys, redact_resource
from controlplane.resources import UnknownTypeError
from controlplane.rollout.controller import (
    NotFoundError,
    PublishOutcome,
    RollbackOutcome,
    RolloutController,
    RolloutError,
)
from controlplane.rollout.gate import Rollout
from controlplane.rollout.guard import Guard
from controlplane.rollout.traffic import TrafficPolicy
from controlplane.snapshot import ConsistencyError, DuplicateResourceError, Resource, Snapshot
from controlplane.store import DEFAULT_GROUP, HistoryEntry, SnapshotStore, StoreError
from controlplane.xds.assignments import Assignments
from controlplane.xds.evidence import FleetEvidence
from controlplane.xds.fleet import Fleet, NodeStatus

log = structlog.get_logger("admin")

_INVALID = (
    UnknownTypeError,
    DecodeError,
    ConsistencyError,
    DuplicateResourceError,
    FieldRuleRefusal,
    LintRefusal,
)

# Calls that change what the fleet gets: they need the write role.
MUTATING_METHODS = {
    f"/xdscp.admin.v1.Admin/{name}" for name in ("Publish", "Promote", "Abort", "Rollback")
}


def asks_for_secrets(request: object) -> bool:
    """A read that asks for key material: it needs the write role too."""
    return bool(getattr(request, "include_secrets", False))


class OperatorCommands(Protocol):
    """The calls that move pointers: the rollout controller's, or (with replicas) the
    leader's, whichever replica the call reached (replicas/commands.py)."""

    async def publish(
        self, group: str, snapshot: Snapshot, *, message: str, actor: str
    ) -> PublishOutcome: ...

    async def promote(self, group: str, *, actor: str, reason: str) -> Rollout: ...

    async def abort(self, group: str, *, actor: str, reason: str) -> Rollout: ...

    async def rollback(
        self, group: str, *, to_version: str | None, actor: str, reason: str
    ) -> RollbackOutcome: ...


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(
        self,
        controller: RolloutController,
        store: SnapshotStore,
        fleet: Fleet,
        assignments: Assignments | None = None,
        *,
        evidence: FleetEvidence | None = None,
        commands: OperatorCommands | None = None,
    ) -> None:
        """`evidence`: the fleet the status shows (default: this server's streams);
        `commands`: who carries out pointer moves (default: `controller`)."""
        self._controller = controller
        self._commands: OperatorCommands = commands or controller
        self._store = store
        self._fleet = fleet
        self._evidence = evidence
        self._views = (
            NodeViews(fleet, assignments, controller.policy, store)
            if assignments is not None
            else None
        )
        # The version GetSnapshot read last: a client reads one version page after page.
        self._last_read: Snapshot | None = None
        # Its resources as shown without include_secrets, redacted once: (version, by key).
        self._last_redacted: tuple[str, dict[tuple[str, str], Resource]] = ("", {})

    async def Publish(
        self, request: admin_pb2.PublishRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.PublishResponse:
        group = request.group or DEFAULT_GROUP
        if not request.create_group:
            try:
                unknown = await asyncio.to_thread(self._unknown_group, group)
            except StoreError as error:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
            if unknown:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, unknown)
        try:
            snapshot = await build_snapshot(request.resources)
            outcome = await self._commands.publish(
                group, snapshot, message=request.message, actor=request.actor or context.peer()
            )
        except _INVALID as error:
            log.warning("publish refused", group=group, error=str(error))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except (RolloutError, StoreError) as error:  # StoreError: e.g. the database is down
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
        log.info(
            "publish",
            group=group,
            version=outcome.version,
            parent_version=outcome.parent_version,
            outcome=outcome.outcome,
            actor=request.actor,
            message=request.message,
            bytes=snapshot.size_bytes,
        )
        return admin_pb2.PublishResponse(
            version=outcome.version,
            changed=outcome.outcome != "unchanged",
            parent_version=outcome.parent_version or "",
            counts=snapshot.counts(),
            outcome=outcome.outcome,
        )

    def _statuses(self) -> list[NodeStatus]:
        return self._evidence.statuses() if self._evidence is not None else self._fleet.status()

    def _unknown_group(self, group: str) -> str | None:
        """Why a publish may not create `group` unasked, or None: a group is known once it
        has a snapshot (or history), when a rollout policy names it, or if it is "default"
        (every node falls back on it, so it is never a typo for another group)."""
        if group == DEFAULT_GROUP or self._controller.policy(group) is not None:
            return None
        groups = self._store.pointers()
        if group in groups or self._store.history(group, 1):
            return None
        known = ", ".join(sorted(groups)) or "none yet"
        return (
            f"group {group!r} has no snapshot yet (known groups: {known}); to create it, "
            "publish again with --create-group (create_group in the admin API)"
        )

    async def ListRollouts(
        self, request: admin_pb2.ListRolloutsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListRolloutsResponse:
        rollouts = self._controller.rollouts()
        guards = self._controller.last_guards()
        return admin_pb2.ListRolloutsResponse(
            rollouts=[
                self._rollout_status(r)
                for group, r in sorted(rollouts.items())
                if not request.group or group == request.group
            ],
            guards=[
                _guard_status(g, time.time())
                for group, g in sorted(guards.items())
                if not request.group or group == request.group
            ],
        )

    async def Promote(
        self, request: admin_pb2.RolloutCommand, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RolloutStatus:
        return await self._rollout_command(self._commands.promote, request, context)

    async def Abort(
        self, request: admin_pb2.RolloutCommand, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RolloutStatus:
        return await self._rollout_command(self._commands.abort, request, context)

    async def _rollout_command(
        self,
        command: Callable[..., Awaitable[Rollout]],
        request: admin_pb2.RolloutCommand,
        context: grpc.aio.ServicerContext,
    ) -> admin_pb2.RolloutStatus:
        try:
            rollout = await command(
                request.group or DEFAULT_GROUP, actor=request.actor, reason=request.reason
            )
        except (RolloutError, StoreError) as error:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
        return self._rollout_status(rollout)

    async def Rollback(
        self, request: admin_pb2.RollbackRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RollbackResponse:
        try:
            outcome = await self._commands.rollback(
                request.group or DEFAULT_GROUP,
                to_version=request.to_version or None,
                actor=request.actor or context.peer(),
                reason=request.reason,
            )
        except NotFoundError as error:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(error))
        except (RolloutError, StoreError) as error:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
        return admin_pb2.RollbackResponse(
            version=outcome.version,
            previous_version=outcome.previous_version or "",
            aborted_rollout=outcome.aborted_rollout,
            started_at=outcome.started_at,
        )

    async def GetSnapshot(
        self, request: admin_pb2.GetSnapshotRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetSnapshotResponse:
        snapshot = await self._read(request.version)
        if snapshot is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"version {request.version!r} is not in the store"
            )
        if request.type_url and request.type_url not in resources.BY_URL:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"unknown type {request.type_url!r}"
            )
        matching = [
            r
            for r in snapshot.all_resources()
            if (not request.type_url or r.type_url == request.type_url)
            and (not request.name or r.name == request.name)
        ]
        if not request.include_secrets:
            matching = await self._redacted(snapshot.version, matching)
        end = len(matching)
        if request.page_bytes:
            # wire_entry is exactly what a resource adds to the answer (field 2, an Any).
            sizes = [len(r.wire_entry) for r in matching]
            end = limits.page_end(sizes, request.offset, request.page_bytes)
        return admin_pb2.GetSnapshotResponse(
            version=snapshot.version,
            resources=[
                any_pb2.Any(type_url=r.type_url, value=r.body)
                for r in matching[request.offset : end]
            ],
            next_offset=end if end < len(matching) else 0,
        )

    async def _read(self, version: str) -> Snapshot | None:
        cached = self._last_read
        if cached is not None and cached.version == version:
            return cached
        snapshot = await asyncio.to_thread(self._store.get, version)
        if snapshot is not None:
            self._last_read = snapshot
        return snapshot

    async def _redacted(self, version: str, matching: list[Resource]) -> list[Resource]:
        """`matching` with key material redacted; each resource is redacted once per version
        read, since pages are sized by the redacted resources and a client reads them all."""
        if self._last_redacted[0] != version:
            self._last_redacted = (version, {})
        done = self._last_redacted[1]
        missing = [r for r in matching if (r.type_url, r.name) not in done]
        if missing:
            done.update(
                await asyncio.to_thread(
                    lambda: {(r.type_url, r.name): redact_resource(r) for r in missing}
                )
            )
        return [done[r.type_url, r.name] for r in matching]

    async def WaitForConvergence(
        self, request: admin_pb2.WaitForConvergenceRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.WaitForConvergenceResponse:
        group = request.group or DEFAULT_GROUP
        version = request.version or await asyncio.to_thread(self._store.pointer, group) or ""
        convergence = await self._controller.wait_for_convergence(
            group,
            version,
            since=request.since or time.time(),
            timeout=max(0.0, request.timeout_seconds),
        )
        return admin_pb2.WaitForConvergenceResponse(
            version=convergence.version,
            total_nodes=convergence.total,
            acked_nodes=convergence.acked,
            seconds=convergence.seconds,
            lagging=[
                admin_pb2.LaggingNode(node_id=node_id, state=redact_pem_keys(state))
                for node_id, state in convergence.lagging
            ],
        )

    def _rollout_status(self, rollout: Rollout) -> admin_pb2.RolloutStatus:
        policy = self._controller.policy(rollout.group)
        now = time.time()
        status = admin_pb2.RolloutStatus(
            group=rollout.group,
            phase=rollout.phase.value,
            candidate=rollout.candidate,
            previous_stable=rollout.previous_stable or "",
            staged_at=rollout.staged_at,
            ended_at=rollout.ended_at or 0.0,
            reason=redact_pem_keys(rollout.reason),
            actor=rollout.actor,
            message=rollout.message,
            existing_acked=rollout.existing_acked,
            fresh_acked=rollout.fresh_acked,
            probe_state=rollout.probe_state.value,
            probe_reason=redact_pem_keys(rollout.probe_reason),
            pending=[
                admin_pb2.RolloutPendingNode(
                    node_id=p.node_id,
                    waiting_for=p.waiting_for,
                    types=p.types,
                    since=p.since,
                    detail=p.describe(rollout.candidate, now),
                )
                for p in rollout.pending
            ],
            bake_started_at=rollout.evidence_complete_at or 0.0,
            observed_at=now,
        )
        if policy is not None:
            status.bake_ends_at = rollout.bake_ends_at(policy) or 0.0
            status.bake_seconds_left = rollout.bake_left(policy, now) or 0.0
            status.min_existing = policy.min_existing
            status.min_fresh = policy.min_fresh
            status.canary_selector = policy.canary.describe() if policy.canary else ""
            status.auto_promote = policy.auto_promote
            status.bake_seconds = policy.bake_seconds
            status.deadline_seconds = policy.deadline_seconds
            if policy.traffic is not None:
                _traffic_status(status, rollout, policy.traffic)
        return status

    async def ListSnapshots(
        self, request: admin_pb2.ListSnapshotsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListSnapshotsResponse:
        try:
            entries = await asyncio.to_thread(
                self._store.history, request.group or None, request.limit or 100
            )
            pointers_of = await asyncio.to_thread(self._store.pointers)
        except StoreError as error:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
        groups = {
            group: admin_pb2.GroupPointers(pointers=pointers)
            for group, pointers in pointers_of.items()
            if not request.group or group == request.group
        }
        return admin_pb2.ListSnapshotsResponse(
            entries=[_history_entry(e) for e in entries], groups=groups
        )

    async def GetFleetStatus(
        self, request: admin_pb2.GetFleetStatusRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetFleetStatusResponse:
        nodes = [_node_status(n) for n in self._statuses()]
        if self._views is not None:
            nodes = self._views.annotate_all(nodes)
            if self._views.needs_recent(nodes):  # a node holds an older version: which?
                await asyncio.to_thread(self._views.read_recent, self._views.groups())
                nodes = self._views.annotate_all(nodes)
        return admin_pb2.GetFleetStatusResponse(nodes=nodes)

    async def GetNodeConfig(
        self, request: admin_pb2.NodeConfigRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.NodeConfigResponse:
        views = self._views
        if views is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no node views on this server")
        if request.type_url and request.type_url not in resources.BY_URL:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"unknown type {request.type_url!r}"
            )
        await asyncio.to_thread(views.read_recent, views.groups())
        streams = views.streams_of(request.node_id)
        if not streams:
            elsewhere = sorted(
                {n.replica for n in self._statuses() if n.node_id == request.node_id}
            )
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"node {request.node_id!r} is connected to replica {', '.join(elsewhere)}: its "
                "config is shown by that replica's admin address"
                if elsewhere
                else f"node {request.node_id!r} is not connected (xdsctl status lists those "
                "that are)",
            )
        by_stream = {n.stream_id: n for n in self._fleet.status()}
        response = admin_pb2.NodeConfigResponse()
        held = []
        for stream in streams:
            node = views.annotate(_node_status(by_stream[stream.stream_id]), stream)
            types = []
            for status in node.types:
                if request.type_url and status.type_url != request.type_url:
                    continue
                entry, resources_held = views.config_type(
                    stream, stream.types[status.type_url], status
                )
                types.append(entry)
                held.append(resources_held)
            del node.types[:]
            response.streams.append(admin_pb2.NodeConfigStream(node=node, types=types))
        if request.include_resources:
            entries = [t for s in response.streams for t in s.types]
            await asyncio.to_thread(
                views.attach_resources,
                list(zip(entries, held, strict=True)),
                request.include_secrets,
            )
        try:
            views.check_size(response)
        except NodeConfigTooLarge as error:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        return response


def _history_entry(entry: HistoryEntry) -> admin_pb2.HistoryEntry:
    return admin_pb2.HistoryEntry(
        id=entry.id,
        group=entry.group,
        action=entry.action,
        version=entry.version,
        parent_version=entry.parent_version or "",
        created_at=entry.created_at,
        actor=entry.actor,
        message=entry.message,
    )


def _node_status(node: NodeStatus) -> admin_pb2.NodeStatus:
    return admin_pb2.NodeStatus(
        node_id=node.node_id,
        group=node.group,
        build_version=node.build_version,
        user_agent=node.user_agent,
        protocol=node.protocol,
        stream_id=node.stream_id,
        connected_at=node.connected_at,
        snapshot_version=node.snapshot_version or "",
        types=[
            admin_pb2.TypeStatus(
                type_url=t.type_url,
                state=t.state.value,
                expected_version=t.expected_version or "",
                sent_version=t.sent_version or "",
                sent_at=t.sent_at or 0.0,
                acked_version=t.acked_version or "",
                acked_at=t.acked_at or 0.0,
                nacked_version=t.nacked_version or "",
                nacked_at=t.nacked_at or 0.0,
                nack_error=redact_pem_keys(t.nack_error or ""),
            )
            for t in node.types
        ],
        started_empty=node.started_empty,
        stuck=node.stuck,
        stuck_since=node.stuck_since or 0.0,
        missing=node.missing,
        replica=node.replica,
    )


def _traffic_status(
    status: admin_pb2.RolloutStatus, rollout: Rollout, traffic: TrafficPolicy
) -> None:
    status.traffic_prometheus = traffic.prometheus
    status.traffic_min_passes = traffic.min_passes
    status.traffic_interval_seconds = traffic.interval_seconds
    states = {s.name: s for s in rollout.traffic}
    for check in traffic.checks:
        state = states.get(check.name)
        entry = status.traffic_checks.add(
            name=check.name, query=check.query, state="pending", max=check.max, min=check.min
        )
        if state is not None:
            entry.state, entry.detail = state.state, redact_pem_keys(state.detail)
            entry.query = state.query or check.query
            entry.passes, entry.failures = state.passes, state.failures
            entry.evaluated_at = state.evaluated_at or 0.0
            if state.value is not None:
                entry.value = state.value


def _guard_status(guard: Guard, now: float) -> admin_pb2.GuardStatus:
    return admin_pb2.GuardStatus(
        group=guard.group,
        version=guard.version,
        rollback_to=guard.rollback_to,
        phase=guard.phase.value,
        started_at=guard.started_at,
        seconds=guard.policy.seconds,
        seconds_left=guard.remaining(now) if guard.ended_at is None else 0.0,
        first_sync_seconds=guard.policy.first_sync_seconds,
        reason=guard.reason,
        ended_at=guard.ended_at or 0.0,
    )
