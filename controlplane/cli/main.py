"""xdsctl: run the control plane, publish config, and inspect the fleet and history.

The CLI maps flags onto calls and nothing more: `serve` builds an app.Config, the other
commands call the admin gRPC API of a running server (--server or XDSCTL_SERVER).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
from google.protobuf import any_pb2, json_format

from controlplane.cli import render

DEFAULT_SERVER = "127.0.0.1:18001"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
RPC_TIMEOUT_SECONDS = 30.0


class CommandError(Exception):
    """A failure to report on stderr with a non-zero exit, without a traceback."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except CommandError as error:
        print(f"xdsctl: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xdsctl", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the control plane")
    serve.add_argument("--xds-address", default="127.0.0.1:18000", help="xDS gRPC (Envoys)")
    serve.add_argument(
        "--xds-socket", type=Path, default=None, help="also serve xDS on this Unix socket"
    )
    serve.add_argument("--admin-address", default="127.0.0.1:18001", help="admin gRPC (xdsctl)")
    serve.add_argument("--http-address", default="127.0.0.1:18002", help="/healthz, /readyz")
    serve.add_argument(
        "--store", type=Path, default=None, help="SQLite file (default .xdscp/xdscp.db)"
    )
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    serve.add_argument("--drain-seconds", type=float, default=5.0, help="grace period on shutdown")
    serve.set_defaults(handler=cmd_serve)

    publish = commands.add_parser("publish", help="publish a directory of Envoy config")
    publish.add_argument("directory", type=Path)
    publish.add_argument("--group", default="default", help="node group (node.cluster)")
    publish.add_argument("--message", "-m", default="", help="why: kept in the history")
    _add_server(publish)
    publish.set_defaults(handler=cmd_publish)

    status = commands.add_parser(
        "status", help="per node and type: SYNCED, STALE, NACKED, NOT_SENT"
    )
    status.add_argument("--json", action="store_true")
    _add_server(status)
    status.set_defaults(handler=cmd_status)

    snapshots = commands.add_parser("snapshots", help="snapshot history and group pointers")
    snapshots.add_argument("--group", default="")
    snapshots.add_argument("--limit", type=int, default=50)
    snapshots.add_argument("--json", action="store_true")
    _add_server(snapshots)
    snapshots.set_defaults(handler=cmd_snapshots)
    return parser


def _add_server(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        default=os.environ.get("XDSCTL_SERVER", DEFAULT_SERVER),
        help=f"admin address of xdscp (env XDSCTL_SERVER, default {DEFAULT_SERVER})",
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from controlplane import app
    from controlplane.observability import logging as obs_logging

    obs_logging.configure(args.log_level)
    try:
        config = app.Config(
            xds_address=app.Address.parse(args.xds_address),
            admin_address=app.Address.parse(args.admin_address),
            http_address=app.Address.parse(args.http_address),
            store_path=args.store or app.DEFAULT_STORE,
            drain_seconds=args.drain_seconds,
            xds_socket=args.xds_socket,
        )
    except ValueError as error:
        raise CommandError(str(error)) from None
    try:
        asyncio.run(app.run(config))
    except app.BindError as error:
        raise CommandError(str(error)) from None
    return EXIT_OK


def cmd_publish(args: argparse.Namespace) -> int:
    from controlplane import resources
    from controlplane.admin.v1 import admin_pb2
    from controlplane.config import ConfigError, load_directory
    from controlplane.snapshot import ConsistencyError, Snapshot

    try:
        loaded = load_directory(args.directory)
    except ConfigError as error:
        for problem in error.problems:
            print(f"error: {problem}", file=sys.stderr)
        raise CommandError(
            f"{args.directory}: {len(error.problems)} error(s); nothing published"
        ) from None
    try:
        Snapshot.from_messages((r.type_url, r.message) for r in loaded)
    except ConsistencyError as error:
        where = {(r.type_url, r.name): r.location for r in loaded}
        for dangling in error.dangling:
            print(
                f"error: {where[(dangling.from_type, dangling.from_name)]}: {dangling}",
                file=sys.stderr,
            )
        raise CommandError(f"{args.directory}: dangling references; nothing published") from None
    request = admin_pb2.PublishRequest(
        group=args.group,
        message=args.message,
        actor=f"{getpass.getuser()}@{socket.gethostname()}",
        resources=[
            any_pb2.Any(type_url=r.type_url, value=resources.serialize(r.message)) for r in loaded
        ],
    )
    response = _call(args.server, lambda stub: stub.Publish(request, timeout=RPC_TIMEOUT_SECONDS))
    counts = ", ".join(f"{n} {t}" for t, n in sorted(response.counts.items()) if n)
    outcome = "published" if response.changed else "unchanged: group already holds"
    print(f"{outcome} {response.version} to group {args.group} ({counts})", file=sys.stderr)
    print(response.version)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from controlplane.admin.v1 import admin_pb2

    response = _call(
        args.server,
        lambda stub: stub.GetFleetStatus(
            admin_pb2.GetFleetStatusRequest(), timeout=RPC_TIMEOUT_SECONDS
        ),
    )
    print(_as_json(response) if args.json else render.fleet_status(response))
    return EXIT_OK


def cmd_snapshots(args: argparse.Namespace) -> int:
    from controlplane.admin.v1 import admin_pb2

    request = admin_pb2.ListSnapshotsRequest(group=args.group, limit=args.limit)
    response = _call(
        args.server, lambda stub: stub.ListSnapshots(request, timeout=RPC_TIMEOUT_SECONDS)
    )
    print(_as_json(response) if args.json else render.history(response))
    return EXIT_OK


def _as_json(message: object) -> str:
    return json.dumps(
        json_format.MessageToDict(message, preserving_proto_field_name=True),
        indent=2,
        sort_keys=True,  # type: ignore[arg-type]
    )


def _call(server: str, rpc: Callable) -> object:  # type: ignore[type-arg]
    from controlplane.admin.v1 import admin_pb2_grpc

    with grpc.insecure_channel(server) as channel:
        try:
            return rpc(admin_pb2_grpc.AdminStub(channel))
        except grpc.RpcError as error:
            code, details = error.code(), error.details()  # type: ignore[attr-defined]
            if code == grpc.StatusCode.UNAVAILABLE:
                raise CommandError(f"cannot reach xdscp at {server}: {details}") from None
            raise CommandError(f"{code.name.lower()}: {details}") from None


if __name__ == "__main__":
    sys.exit(main())
