"""Admin authentication: mutating calls need the server's token in `authorization` metadata.

The token comes from a file (created with a random value, mode 0600, when missing) so that
xdsctl on the same machine can read it; remote operators pass it via XDSCTL_TOKEN.
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

METADATA_KEY = "authorization"
SCHEME = "Bearer "


def load_or_create_token(path: Path) -> str:
    if path.exists():
        token = path.read_text().strip()
        if not token:
            raise ValueError(f"admin token file {path} is empty")
        return token
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses the named methods unless the caller presents the token."""

    def __init__(self, token: str, protected_methods: set[str]) -> None:
        self._token = token.encode()
        self._protected = protected_methods

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method not in self._protected or self._authorized(details):
            return await continuation(details)
        return grpc.unary_unary_rpc_method_handler(_refuse)

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == METADATA_KEY and isinstance(value, str) and value.startswith(SCHEME):
                return hmac.compare_digest(value[len(SCHEME) :].encode(), self._token)
        return False


async def _refuse(request: object, context: grpc.aio.ServicerContext) -> None:
    await context.abort(
        grpc.StatusCode.UNAUTHENTICATED,
        "admin token missing or wrong: set XDSCTL_TOKEN or --token-file "
        "(the server's token is in its --admin-token-file)",
    )
