"""What every xdsctl command that talks to a server shares: the --server/--token/TLS flags,
the admin channel, one-line errors, and JSON output."""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import json_format

from controlplane.admin import limits

if TYPE_CHECKING:
    from controlplane.admin.v1 import admin_pb2, admin_pb2_grpc

DEFAULT_SERVER = "127.0.0.1:18001"
TOKEN_ENV, TOKEN_FILE_ENV = "XDSCTL_TOKEN", "XDSCTL_TOKEN_FILE"
# The tokens `serve` creates beside its default store (app.DEFAULT_STORE), the write token
# first: run from the server's directory, every command finds one.
DEFAULT_TOKEN_FILE = Path(".xdscp") / "admin-token"
DEFAULT_TOKEN_FILES = (DEFAULT_TOKEN_FILE, DEFAULT_TOKEN_FILE.with_name("admin-read-token"))
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
RPC_TIMEOUT_SECONDS = 30.0


class CommandError(Exception):
    """A failure to report on stderr with a non-zero exit, without a traceback."""


def add_server(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        default=os.environ.get("XDSCTL_SERVER", DEFAULT_SERVER),
        help=f"admin address of xdscp (env XDSCTL_SERVER, default {DEFAULT_SERVER})",
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help="file holding the server's write token, or its read token for reads only; "
        f"else env {TOKEN_ENV} (the token), env {TOKEN_FILE_ENV} (a file), "
        f"{DEFAULT_TOKEN_FILES[0]} or {DEFAULT_TOKEN_FILES[1]}, whichever comes first",
    )
    tls_flags = parser.add_argument_group("TLS to the admin port")
    for flag, env, help_text in (
        ("--tls-ca", "XDSCTL_TLS_CA", "use TLS, trusting this CA for the server's certificate"),
        ("--tls-cert", "XDSCTL_TLS_CERT", "client certificate, when the server asks for mTLS"),
        ("--tls-key", "XDSCTL_TLS_KEY", "its private key"),
    ):
        tls_flags.add_argument(
            flag, type=Path, default=os.environ.get(env) or None, help=f"{help_text} (env {env})"
        )
    tls_flags.add_argument(
        "--tls-server-name",
        default=os.environ.get("XDSCTL_TLS_SERVER_NAME") or None,
        help="the name the server's certificate must carry, if not --server's host "
        "(env XDSCTL_TLS_SERVER_NAME)",
    )


def as_json(message: object) -> str:
    return json.dumps(
        json_format.MessageToDict(message, preserving_proto_field_name=True),
        indent=2,
        sort_keys=True,  # type: ignore[arg-type]
    )


def actor() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


def _token(args: argparse.Namespace) -> str | None:
    """The admin token, from the first source that names one (docs/operations.md):
    --token-file, XDSCTL_TOKEN, XDSCTL_TOKEN_FILE, then the write token and the read token
    that `serve` creates beside its default store; None if none does. A file named
    explicitly must exist."""
    if args.token_file is not None:
        return _read_token(args.token_file, "--token-file")
    if token := os.environ.get(TOKEN_ENV, "").strip():
        return token
    if named := os.environ.get(TOKEN_FILE_ENV, "").strip():
        return _read_token(Path(named), TOKEN_FILE_ENV)
    for path in DEFAULT_TOKEN_FILES:
        if path.is_file():
            return _read_token(path, "default")
    return None


def no_token_hint() -> str:
    """What xdsctl says when it found no token: every place it looked."""
    tried = [
        "--token-file (not given)",
        f"{TOKEN_ENV} (not set)",
        f"{TOKEN_FILE_ENV} (not set)",
        *(f"{path.absolute()} (no such file)" for path in DEFAULT_TOKEN_FILES),
    ]
    return f"xdsctl found no admin token; it tried {', '.join(tried)}"


def _read_token(path: Path, source: str) -> str:
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        raise CommandError(f"token file {path} ({source}) does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise CommandError(f"token file {path} ({source}): {reason}") from None
    if not token:
        raise CommandError(f"token file {path} ({source}) is empty")
    return token


def fetch_snapshot(
    args: argparse.Namespace,
    version: str,
    type_url: str = "",
    name: str = "",
    include_secrets: bool = False,
) -> admin_pb2.GetSnapshotResponse:
    """Every matching resource of a stored version, read a page at a time (see
    controlplane.admin.limits), as one answer. Secret values read "[redacted]" unless
    `include_secrets` (which needs the write token)."""
    from controlplane.admin.v1 import admin_pb2

    def read_pages(
        stub: admin_pb2_grpc.AdminStub, metadata: Sequence[tuple[str, str]]
    ) -> admin_pb2.GetSnapshotResponse:
        request = admin_pb2.GetSnapshotRequest(
            version=version,
            type_url=type_url,
            name=name,
            page_bytes=limits.PAGE_BYTES,
            include_secrets=include_secrets,
        )
        answer = admin_pb2.GetSnapshotResponse()
        while True:
            page = stub.GetSnapshot(request, timeout=RPC_TIMEOUT_SECONDS, metadata=metadata)
            answer.version = page.version
            answer.resources.extend(page.resources)
            if not page.next_offset:
                return answer
            request.offset = page.next_offset

    return call(args, read_pages)


def call(args: argparse.Namespace, rpc: Callable) -> Any:  # type: ignore[type-arg]
    """rpc(stub, metadata) against --server, mapping gRPC failures to one-line errors."""
    from controlplane.admin.v1 import admin_pb2_grpc

    token = _token(args)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    shared = _command_channels
    channel = shared.channel(args) if shared is not None else _channel(args)
    try:
        return rpc(admin_pb2_grpc.AdminStub(channel), metadata)
    except grpc.RpcError as error:
        code, details = error.code(), error.details()  # type: ignore[attr-defined]
        if code == grpc.StatusCode.UNAVAILABLE:
            raise CommandError(f"cannot reach xdscp at {args.server}: {details}") from None
        if code == grpc.StatusCode.UNAUTHENTICATED and token is None:
            details = f"{details}. {no_token_hint()}"
        raise CommandError(f"{code.name.lower()}: {details}") from None
    finally:
        if shared is None:
            channel.close()


class _SharedChannels:
    """The channels one command has open, by server and TLS settings."""

    def __init__(self) -> None:
        self._open: dict[tuple[object, ...], grpc.Channel] | None = {}  # None once closed
        self._lock = threading.Lock()  # a command may call from a second thread

    def channel(self, args: argparse.Namespace) -> grpc.Channel:
        key = (args.server, args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
        with self._lock:
            if self._open is None:  # a call from a thread the command did not wait for
                raise CommandError("the command has ended")
            if key not in self._open:
                self._open[key] = _channel(args)
            return self._open[key]

    def close(self) -> None:
        with self._lock:
            channels, self._open = self._open or {}, None
        for channel in channels.values():
            channel.close()


_command_channels: _SharedChannels | None = None


@contextlib.contextmanager
def one_channel_per_server() -> Iterator[None]:
    """Within: the calls of a command to one server share a channel, so one connection
    (and, over TLS, one handshake) serves them all; it closes when the block ends."""
    global _command_channels
    outer, _command_channels = _command_channels, _SharedChannels()
    try:
        yield
    finally:
        _command_channels.close()
        _command_channels = outer


def _channel(args: argparse.Namespace) -> grpc.Channel:
    options = list(limits.GRPC_OPTIONS)
    if args.tls_ca is None:
        if args.tls_cert or args.tls_key:
            raise CommandError("--tls-cert and --tls-key need --tls-ca (the server's CA)")
        return grpc.insecure_channel(args.server, options=options)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise CommandError("--tls-cert and --tls-key go together")
    ca, cert, key = (_read_pem(p) for p in (args.tls_ca, args.tls_cert, args.tls_key))
    if args.tls_server_name:
        options.append(("grpc.ssl_target_name_override", args.tls_server_name))
    credentials = grpc.ssl_channel_credentials(ca, key, cert)
    return grpc.secure_channel(args.server, credentials, options=options)


def _read_pem(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as error:
        raise CommandError(f"{path}: {error.strerror}") from None
