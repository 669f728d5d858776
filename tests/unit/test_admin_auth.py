"""Admin roles: the interceptor driven directly, with no sockets (the integration test in
tests/integration/test_admin_roles.py drives it through xdsctl)."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog

from controlplane.admin import auth
from controlplane.admin.auth import AdminTokens, RoleInterceptor, TokenError
from controlplane.admin.service import MUTATING_METHODS, asks_for_secrets
from controlplane.admin.v1 import admin_pb2
from controlplane.observability.metrics import Metrics

ADMIN = "/xdscp.admin.v1.Admin/"


@dataclass
class Details:
    method: str
    invocation_metadata: tuple[tuple[str, str], ...]


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class Context:
    def peer(self) -> str:
        return "ipv4:127.0.0.1:5555"

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


@dataclass
class Plane:
    tokens: AdminTokens
    metrics: Metrics
    interceptor: RoleInterceptor
    served: list[str] = field(default_factory=list)

    async def call(self, method: str, request: Any, token: bytes | None) -> str:
        """What the service answered, or raises Aborted as gRPC would answer the caller."""
        metadata = () if token is None else (("authorization", f"Bearer {token.decode()}"),)

        async def continuation(details: Details) -> grpc.RpcMethodHandler:
            async def behavior(request: Any, context: Context) -> str:
                self.served.append(details.method)
                return "ok"

            return grpc.unary_unary_rpc_method_handler(behavior)

        handler = await self.interceptor.intercept_service(
            continuation,  # type: ignore[arg-type]
            Details(ADMIN + method, metadata),  # type: ignore[arg-type]
        )
        return await handler.unary_unary(request, Context())

    def refused(self, reason: str) -> float | None:
        return self.metrics.registry.get_sample_value(
            "xdscp_admin_refused_total", {"reason": reason}
        )


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[Plane]:
    tokens = AdminTokens.load(tmp_path / "admin-token", tmp_path / "admin-read-token")
    metrics = Metrics()
    interceptor = RoleInterceptor(tokens, MUTATING_METHODS, asks_for_secrets, metrics.admin_refused)
    yield Plane(tokens, metrics, interceptor)


def test_both_token_files_are_created_private_different_and_kept(tmp_path: Path) -> None:
    write_file, read_file = tmp_path / "state" / "admin-token", tmp_path / "state" / "read"
    tokens = AdminTokens.load(write_file, read_file)
    for path in (write_file, read_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert tokens.write != tokens.read
    assert AdminTokens.load(write_file, read_file) == tokens


def test_the_server_refuses_one_token_for_both_roles(tmp_path: Path) -> None:
    (tmp_path / "w").write_text("same-token\n")
    (tmp_path / "r").write_text("same-token")
    with pytest.raises(TokenError) as refused:
        AdminTokens.load(tmp_path / "w", tmp_path / "r")
    assert str(tmp_path / "w") in str(refused.value) and str(tmp_path / "r") in str(refused.value)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(TokenError, match="is empty"):
        AdminTokens.load(tmp_path / "empty", tmp_path / "r")


@pytest.mark.parametrize(
    ("token", "reason", "says"),
    [
        (None, auth.NO_TOKEN, "admin token missing: set XDSCTL_TOKEN or pass --token-file"),
        (
            b"guess",
            auth.INVALID_TOKEN,
            "admin token not accepted: set XDSCTL_TOKEN or --token-file",
        ),
        (b"", auth.NO_TOKEN, "admin token missing"),
    ],
)
async def test_a_read_without_a_valid_token_is_unauthenticated(
    plane: Plane, token: bytes | None, reason: str, says: str
) -> None:
    with structlog.testing.capture_logs() as logs, pytest.raises(Aborted) as refused:
        await plane.call("GetFleetStatus", admin_pb2.GetFleetStatusRequest(), token)
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert says in refused.value.details
    # ... and where the server's tokens are.
    assert str(plane.tokens.write_file) in refused.value.details
    assert str(plane.tokens.read_file) in refused.value.details
    assert plane.served == []
    assert plane.refused(reason) == 1
    assert logs == [
        {
            "event": "admin call refused",
            "log_level": "warning",
            "method": ADMIN + "GetFleetStatus",
            "reason": reason,
            "peer": "ipv4:127.0.0.1:5555",
            "suppressed": 0,
        }
    ]


async def test_the_read_token_reads_and_cannot_change_anything(plane: Plane) -> None:
    read = plane.tokens.read
    assert await plane.call("ListSnapshots", admin_pb2.ListSnapshotsRequest(), read) == "ok"
    assert await plane.call("GetSnapshot", admin_pb2.GetSnapshotRequest(version="v"), read) == "ok"
    for method in ("Publish", "Promote", "Abort", "Rollback"):
        with pytest.raises(Aborted) as refused:
            await plane.call(method, b"", read)
        assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert refused.value.details.startswith(f"{method} needs the write role;")
        assert str(plane.tokens.write_file) in refused.value.details
    assert plane.served == [ADMIN + "ListSnapshots", ADMIN + "GetSnapshot"]
    assert plane.refused(auth.NEEDS_WRITE_ROLE) == 4


async def test_secrets_need_the_write_role(plane: Plane) -> None:
    asking = admin_pb2.GetSnapshotRequest(version="v", include_secrets=True)
    with pytest.raises(Aborted) as refused:
        await plane.call("GetSnapshot", asking, plane.tokens.read)
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "GetSnapshot with include_secrets needs the write role" in refused.value.details
    assert plane.served == []
    assert await plane.call("GetSnapshot", asking, plane.tokens.write) == "ok"


async def test_the_write_token_may_do_everything(plane: Plane) -> None:
    for method in ("Publish", "Rollback", "GetFleetStatus", "ListRollouts"):
        assert await plane.call(method, b"", plane.tokens.write) == "ok"
    assert len(plane.served) == 4
    assert all(plane.refused(reason) == 0 for reason in auth.REFUSAL_REASONS)


async def test_refusals_are_all_counted_but_logged_once_a_second_per_reason(plane: Plane) -> None:
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            with pytest.raises(Aborted):
                await plane.call("ListRollouts", admin_pb2.ListRolloutsRequest(), None)
        with pytest.raises(Aborted):
            await plane.call("ListRollouts", admin_pb2.ListRolloutsRequest(), b"wrong")
    assert plane.refused(auth.NO_TOKEN) == 3 and plane.refused(auth.INVALID_TOKEN) == 1
    assert [entry["reason"] for entry in logs] == [auth.NO_TOKEN, auth.INVALID_TOKEN]
