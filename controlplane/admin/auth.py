"""Admin authentication: two tokens, two roles, and every admin call needs one of them.

- `read`: every call that only looks (status, snapshots, get, rollout status, diff, ...).
- `write`: calls that change what the fleet gets (service.MUTATING_METHODS), and reads
  that ask for key material (`include_secrets`). Write implies read.

Each token comes from a file, created with a random value (mode 0600) when missing, so that
xdsctl on the same machine can read it; remote operators pass it via XDSCTL_TOKEN. The two
must differ. Tokens are compared in constant time. A refused call is answered
UNAUTHENTICATED (no token, or not one of ours) or PERMISSION_DENIED (a read token on a call
that needs write), each saying what to do; it is logged (at most one line per reason per
second, with a count of those left out) and counted in xdscp_admin_refused_total{reason}.
"""

from __future__ import annotations

import enum
import hmac
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog
from prometheus_client import Counter

from controlplane.xds.server import LogRateLimit

log = structlog.get_logger("admin")

METADATA_KEY = "authorization"
SCHEME = "Bearer "
REFUSAL_LOG_INTERVAL_SECONDS = 1.0  # per reason, server-wide
# Why a call was refused: the values of xdscp_admin_refused_total's `reason` label.
NO_TOKEN, INVALID_TOKEN, NEEDS_WRITE_ROLE = "no_token", "invalid_token", "needs_write_role"
REFUSAL_REASONS = (NO_TOKEN, INVALID_TOKEN, NEEDS_WRITE_ROLE)


class Role(enum.Enum):
    READ = "read"
    WRITE = "write"


class TokenError(ValueError):
    """The token files cannot serve: one is empty, or both hold the same token."""


def load_or_create_token(path: Path) -> str:
    if path.exists():
        token = path.read_text().strip()
        if not token:
            raise TokenError(f"admin token file {path} is empty")
        return token
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


@dataclass(frozen=True)
class AdminTokens:
    write: bytes
    read: bytes
    write_file: Path
    read_file: Path

    @classmethod
    def load(cls, write_file: Path, read_file: Path) -> AdminTokens:
        """Both tokens, each created when its file is missing. Raises TokenError."""
        write = load_or_create_token(write_file).encode()
        read = load_or_create_token(read_file).encode()
        if hmac.compare_digest(write, read):
            raise TokenError(
                f"the admin write token ({write_file}) and read token ({read_file}) are the "
                "same: give each role its own token"
            )
        return cls(write, read, write_file, read_file)

    def role_of(self, token: bytes) -> Role | None:
        # Both comparisons always run, in constant time: timing tells nothing about either.
        is_write = hmac.compare_digest(token, self.write)
        is_read = hmac.compare_digest(token, self.read)
        return Role.WRITE if is_write else Role.READ if is_read else None


class RoleInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through only with a token of the role it needs."""

    def __init__(
        self,
        tokens: AdminTokens,
        write_methods: Collection[str],
        asks_for_write: Callable[[object], bool],
        refused: Counter,
    ) -> None:
        """`write_methods` always need the write role; any other call needs it when
        `asks_for_write(request)`. `refused` counts refusals by reason."""
        self._tokens = tokens
        self._write_methods = write_methods
        self._asks_for_write = asks_for_write
        self._refused = refused
        self._log = LogRateLimit(REFUSAL_LOG_INTERVAL_SECONDS)
        for reason in REFUSAL_REASONS:
            refused.labels(reason)  # every reason is exposed from the start, at 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        name = method.rsplit("/", 1)[-1]
        token = _presented_token(details)
        role = None if token is None else self._tokens.role_of(token)
        if role is None:
            where = (
                f"the server's tokens are in {self._tokens.write_file} (write) and "
                f"{self._tokens.read_file} (read)"
            )
            if token is None:
                return self._refusal(
                    method,
                    NO_TOKEN,
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"admin token missing: set XDSCTL_TOKEN or pass --token-file ({where})",
                )
            return self._refusal(
                method,
                INVALID_TOKEN,
                grpc.StatusCode.UNAUTHENTICATED,
                f"admin token not accepted: set XDSCTL_TOKEN or --token-file to one of the "
                f"server's tokens ({where})",
            )
        if role is Role.READ and method in self._write_methods:
            return self._refusal(
                method, NEEDS_WRITE_ROLE, grpc.StatusCode.PERMISSION_DENIED, self._needs_write(name)
            )
        handler = await continuation(details)
        if role is Role.WRITE or handler is None or handler.unary_unary is None:
            return handler
        return self._checking_request(method, name, handler)

    def _checking_request(
        self, method: str, name: str, handler: grpc.RpcMethodHandler
    ) -> grpc.RpcMethodHandler:
        """`handler`, refusing read-role requests that ask for what needs the write role."""
        behavior = handler.unary_unary

        async def checked(request: object, context: grpc.aio.ServicerContext) -> object:
            if self._asks_for_write(request):
                await self._refuse(
                    context,
                    method,
                    NEEDS_WRITE_ROLE,
                    grpc.StatusCode.PERMISSION_DENIED,
                    self._needs_write(f"{name} with include_secrets"),
                )
            return await behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(
            checked,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _needs_write(self, what: str) -> str:
        return (
            f"{what} needs the write role; this token has the read role only "
            f"(the write token is in the server's {self._tokens.write_file})"
        )

    def _refusal(
        self, method: str, reason: str, code: grpc.StatusCode, message: str
    ) -> grpc.RpcMethodHandler:
        async def refuse(request: object, context: grpc.aio.ServicerContext) -> None:
            await self._refuse(context, method, reason, code, message)

        return grpc.unary_unary_rpc_method_handler(refuse)

    async def _refuse(
        self,
        context: grpc.aio.ServicerContext,
        method: str,
        reason: str,
        code: grpc.StatusCode,
        message: str,
    ) -> None:
        self._refused.labels(reason).inc()
        suppressed = self._log.allow(reason, time.monotonic())
        if suppressed is not None:
            log.warning(
                "admin call refused",
                method=method,
                reason=reason,
                peer=context.peer(),
                suppressed=suppressed,
            )
        await context.abort(code, message)


def _presented_token(details: grpc.HandlerCallDetails) -> bytes | None:
    for key, value in details.invocation_metadata or ():
        if key == METADATA_KEY and isinstance(value, str) and value.startswith(SCHEME):
            return value[len(SCHEME) :].encode() or None
    return None
