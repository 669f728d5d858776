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
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import any_pb2, json_format

from controlplane.admin import limits
from controlplane.cli import authoring, render

if TYPE_CHECKING:
    from controlplane import app
    from controlplane.admin.v1 import admin_pb2, admin_pb2_grpc

DEFAULT_SERVER = "127.0.0.1:18001"
DEFAULT_TOKEN_FILE = Path(".xdscp") / "admin-token"
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
    serve.add_argument(
        "--store-key-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="encrypt the secrets in the store with this key: 32 bytes, raw or base64, "
        "owner-only (make one with `xdsctl store-key create FILE`)",
    )
    serve.add_argument("--rollout-policy", type=Path, default=None, help="canary policy YAML")
    serve.add_argument(
        "--admin-token-file",
        type=Path,
        default=None,
        help="token of the admin write role: publish, promote, abort, rollback, and reads "
        "with secrets (default: admin-token beside the store; created)",
    )
    serve.add_argument(
        "--admin-read-token-file",
        type=Path,
        default=None,
        help="token of the admin read role: status, snapshots, get, diff, rollout status "
        "(default: admin-read-token beside the store; created)",
    )
    tls_flags = serve.add_argument_group(
        "TLS", "TLS on the xDS and admin ports; see docs/security.md (plaintext: loopback only)"
    )
    tls_flags.add_argument("--tls-cert", type=Path, help="server certificate chain (PEM)")
    tls_flags.add_argument("--tls-key", type=Path, help="its private key (PEM, unencrypted)")
    tls_flags.add_argument(
        "--tls-client-ca",
        type=Path,
        help="mTLS on xDS: clients need a certificate from this CA, and it decides which "
        "node id and group they may claim (needs --trust-domain)",
    )
    tls_flags.add_argument(
        "--trust-domain",
        help="trust domain of node identities: spiffe://DOMAIN/group/G/node/ID or ID.G.DOMAIN",
    )
    tls_flags.add_argument(
        "--admin-client-ca", type=Path, help="mTLS on admin: xdsctl needs a certificate from it"
    )
    tls_flags.add_argument(
        "--allow-plaintext",
        action="store_true",
        help="serve plaintext on a non-loopback address (warned at every start)",
    )
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    serve.add_argument("--drain-seconds", type=float, default=5.0, help="grace period on shutdown")
    serve.add_argument(
        "--warming-timeout",
        type=_positive_seconds,
        default=None,
        metavar="SECONDS",
        help="how long listeners and routes wait for Envoy to warm (ACK) new clusters "
        "before they are sent anyway (default 10)",
    )
    serve.set_defaults(handler=cmd_serve)

    publish = commands.add_parser("publish", help="publish a directory of Envoy config")
    publish.add_argument("directory", type=Path)
    publish.add_argument("--group", default="default", help="node group (node.cluster)")
    publish.add_argument("--env", default=None, help="apply DIR/environments/ENV.yaml")
    publish.add_argument("--message", "-m", default="", help="why: kept in the history")
    publish.add_argument(
        "--show-secrets",
        action="store_true",
        help="show secret values in the diff printed first (by default a changed private key "
        "or password shows as a changed [redacted ...] mark)",
    )
    _add_server(publish)
    publish.set_defaults(handler=cmd_publish)

    status = commands.add_parser(
        "status", help="per node and type: SYNCED, WARMING, STALE, NACKED, NOT_SENT"
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

    get = commands.add_parser("get", help="print a stored snapshot's resources as YAML")
    get.add_argument("version")
    get.add_argument("--type", default="", help="cluster, endpoint, listener, route, secret")
    get.add_argument("--name", default="")
    get.add_argument(
        "--show-secrets",
        action="store_true",
        help="print private keys, passwords and other secret values as stored; needs the "
        "write token (without it they read [redacted])",
    )
    _add_server(get)
    get.set_defaults(handler=cmd_get)

    authoring.add_commands(commands, _add_server)

    certgen = commands.add_parser(
        "certgen",
        help="write a CA, a server certificate and node/xdsctl client certificates",
        description="For deployments without cert-manager or SPIRE. A CA already in DIR is "
        "reused; other files are replaced (that is how they are rotated). Example: "
        "xdsctl certgen deploy/certs --trust-domain xdscp.local --server-name xdscp "
        "--node 'edge/*' --canary edge/edge-canary --admin-client",
    )
    certgen.add_argument("directory", type=Path)
    certgen.add_argument("--trust-domain", required=True)
    certgen.add_argument(
        "--server-name", action="append", required=True, help="DNS name or IP (repeatable)"
    )
    certgen.add_argument(
        "--node", action="append", default=[], metavar="GROUP/ID", help="ID may be a glob"
    )
    certgen.add_argument(
        "--canary", action="append", default=[], metavar="GROUP/ID", help="a canary node"
    )
    certgen.add_argument("--admin-client", action="store_true", help="a certificate for xdsctl")
    certgen.add_argument("--days", type=int, default=365)
    certgen.set_defaults(handler=cmd_certgen)

    store_key = commands.add_parser("store-key", help="the key that encrypts the store's secrets")
    store_key_commands = store_key.add_subparsers(
        dest="store_key_command", required=True, metavar="ACTION"
    )
    create_key = store_key_commands.add_parser(
        "create", help="write a new random key to FILE (mode 0600; never overwrites)"
    )
    create_key.add_argument("file", type=Path, metavar="FILE")
    create_key.set_defaults(handler=cmd_store_key_create)

    rollout = commands.add_parser("rollout", help="canary rollouts: status, promote, abort")
    rollout_commands = rollout.add_subparsers(
        dest="rollout_command", required=True, metavar="ACTION"
    )
    rollout_status = rollout_commands.add_parser("status", help="current or last rollout per group")
    rollout_status.add_argument("--group", default="")
    rollout_status.add_argument("--json", action="store_true")
    _add_server(rollout_status)
    rollout_status.set_defaults(handler=cmd_rollout_status)
    for action, handler, help_text in (
        ("promote", cmd_rollout_promote, "promote a candidate that passed its canaries"),
        ("abort", cmd_rollout_abort, "abort: canaries back to stable, candidate rejected"),
    ):
        command = rollout_commands.add_parser(action, help=help_text)
        command.add_argument("--group", default="default")
        command.add_argument("--reason", default="")
        _add_server(command)
        command.set_defaults(handler=handler)

    rollback = commands.add_parser(
        "rollback", help="put last_good (or --to VERSION) on every node now, and wait for ACKs"
    )
    rollback.add_argument("--group", default="default")
    rollback.add_argument("--to", dest="to_version", default="", metavar="VERSION")
    rollback.add_argument("--reason", default="")
    rollback.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for ACKs")
    _add_server(rollback)
    rollback.set_defaults(handler=cmd_rollback)
    return parser


def _add_server(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        default=os.environ.get("XDSCTL_SERVER", DEFAULT_SERVER),
        help=f"admin address of xdscp (env XDSCTL_SERVER, default {DEFAULT_SERVER})",
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help="the server's write token, or its read token for reads only "
        f"(env XDSCTL_TOKEN; default {DEFAULT_TOKEN_FILE} if present)",
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


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < seconds <= 3600:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 3600 seconds: {text}")
    return seconds


def cmd_serve(args: argparse.Namespace) -> int:
    from controlplane import app, tls
    from controlplane.admin.auth import TokenError
    from controlplane.observability import grpc_core_log
    from controlplane.observability import logging as obs_logging
    from controlplane.store import StoreError

    grpc_core_log.install()  # before logging: log lines go to the real stderr
    obs_logging.configure(args.log_level)
    try:
        config = serve_config(args)
    except ValueError as error:
        raise CommandError(str(error)) from None
    try:
        asyncio.run(app.run(config))
    except (app.BindError, tls.TlsError, TokenError, StoreError) as error:
        raise CommandError(str(error)) from None
    return EXIT_OK


def serve_config(args: argparse.Namespace) -> app.Config:
    """The app.Config `serve` runs with, from its parsed flags; ValueError if app.Config
    refuses them (e.g. plaintext on a non-loopback address). Also used by the deploy tests."""
    from controlplane import app
    from controlplane.rollout.policy import load_policies

    return app.Config(
        xds_address=app.Address.parse(args.xds_address),
        admin_address=app.Address.parse(args.admin_address),
        http_address=app.Address.parse(args.http_address),
        store_path=args.store or app.DEFAULT_STORE,
        drain_seconds=args.drain_seconds,
        xds_socket=args.xds_socket,
        policies=load_policies(args.rollout_policy) if args.rollout_policy else {},
        admin_token_file=args.admin_token_file,
        admin_read_token_file=args.admin_read_token_file,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        xds_client_ca=args.tls_client_ca,
        admin_client_ca=args.admin_client_ca,
        trust_domain=args.trust_domain,
        allow_plaintext=args.allow_plaintext,
        store_key_file=args.store_key_file,
        **({"warming_timeout": args.warming_timeout} if args.warming_timeout else {}),
    )


def cmd_certgen(args: argparse.Namespace) -> int:
    from controlplane import certgen

    nodes = [(*_node_spec(spec), False) for spec in args.node]
    nodes += [(*_node_spec(spec), True) for spec in args.canary]
    if not 1 <= args.days <= 3650:
        raise CommandError(f"--days must be 1 to 3650, not {args.days}")
    for path in certgen.create(
        args.directory,
        trust_domain=args.trust_domain,
        server_names=args.server_name,
        nodes=nodes,
        admin_client=args.admin_client,
        days=args.days,
    ):
        print(path)
    return EXIT_OK


def _node_spec(text: str) -> tuple[str, str]:
    group, sep, node_id = text.partition("/")
    if not sep or not group or not node_id or "/" in node_id:
        raise CommandError(f"{text!r} is not GROUP/ID")
    return group, node_id


def cmd_store_key_create(args: argparse.Namespace) -> int:
    from controlplane.store import StoreError
    from controlplane.store.sealing import create_key_file

    try:
        create_key_file(args.file)
    except StoreError as error:
        raise CommandError(str(error)) from None
    print(
        f"wrote a new store key to {args.file} (mode 0600): keep it apart from the store, "
        "and keep a copy: without it the store does not open",
        file=sys.stderr,
    )
    return EXIT_OK


def cmd_publish(args: argparse.Namespace) -> int:
    from controlplane import resources
    from controlplane.admin.v1 import admin_pb2
    from controlplane.cli import authoring
    from controlplane.config import ConfigError, snapshot_of
    from controlplane.config.environments import load_config
    from controlplane.config.field_rules import check_field_rules

    try:
        config = load_config(args.directory, args.env)
        # Envoy's own field rules: Envoy would NACK a violation, so it never leaves here.
        if problems := check_field_rules(config.resources, config.sources):
            raise ConfigError(problems)
        snapshot = snapshot_of(config.resources)
    except ConfigError as error:
        for problem in error.problems:
            print(f"error: {problem}", file=sys.stderr)
        raise CommandError(
            f"{args.directory}: {len(error.problems)} error(s); nothing published"
        ) from None
    request = admin_pb2.PublishRequest(
        group=args.group,
        message=args.message,
        actor=_actor(),
        resources=[
            any_pb2.Any(type_url=r.type_url, value=resources.serialize(r.message))
            for r in config.resources
        ],
    )
    if error := limits.too_large("the publish request", request.ByteSize()):
        raise CommandError(f"{args.directory}: {error}; nothing published")
    print(authoring.publish_preview(snapshot, args.group, args), file=sys.stderr)
    response = _call(
        args, lambda stub, md: stub.Publish(request, timeout=RPC_TIMEOUT_SECONDS, metadata=md)
    )
    counts = ", ".join(f"{n} {t}" for t, n in sorted(response.counts.items()) if n)
    outcome = {
        "promoted": f"published {response.version} to group {args.group}",
        "staged": f"staged {response.version} for a canary rollout in group {args.group} "
        "(see `xdsctl rollout status`)",
        "unchanged": f"unchanged: group {args.group} already holds {response.version}",
    }[response.outcome]
    print(f"{outcome} ({counts})", file=sys.stderr)
    print(response.version)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from controlplane.admin.v1 import admin_pb2

    response = _call(
        args,
        lambda stub, md: stub.GetFleetStatus(
            admin_pb2.GetFleetStatusRequest(), timeout=RPC_TIMEOUT_SECONDS, metadata=md
        ),
    )
    print(_as_json(response) if args.json else render.fleet_status(response))
    return EXIT_OK


def cmd_snapshots(args: argparse.Namespace) -> int:
    from controlplane.admin.v1 import admin_pb2

    request = admin_pb2.ListSnapshotsRequest(group=args.group, limit=args.limit)
    response = _call(
        args, lambda stub, md: stub.ListSnapshots(request, timeout=RPC_TIMEOUT_SECONDS, metadata=md)
    )
    print(_as_json(response) if args.json else render.history(response))
    return EXIT_OK


def cmd_get(args: argparse.Namespace) -> int:
    """Prints Envoy v3 YAML in the form `publish` reads, so the output can be published."""
    import yaml

    from controlplane import resources

    type_url = args.type
    if type_url and type_url not in resources.BY_URL:
        known = resources.BY_SHORT_NAME.get(type_url)
        if known is None:
            raise CommandError(
                f"unknown --type {type_url!r}; use one of {', '.join(resources.BY_SHORT_NAME)}"
            )
        type_url = known.type_url
    response = fetch_snapshot(args, args.version, type_url, args.name, args.show_secrets)
    if not response.resources:
        raise CommandError(f"no resources in {response.version} match --type/--name")
    resources.load_all_descriptors()
    items = []
    for packed in response.resources:
        message = resources.unpack_any(packed)
        fields = json_format.MessageToDict(message, preserving_proto_field_name=True)
        # A plain-dict copy: typed_config Anys come back as OrderedDicts, which YAML won't take.
        items.append({"@type": packed.type_url, **json.loads(json.dumps(fields))})
    print(f"# xdsctl get {response.version}")
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # the C writer: same text, faster
    print(yaml.dump({"resources": items}, Dumper=dumper, sort_keys=False), end="")
    return EXIT_OK


def cmd_rollout_status(args: argparse.Namespace) -> int:
    from controlplane.admin.v1 import admin_pb2

    request = admin_pb2.ListRolloutsRequest(group=args.group)
    response = _call(
        args, lambda stub, md: stub.ListRollouts(request, timeout=RPC_TIMEOUT_SECONDS, metadata=md)
    )
    print(_as_json(response) if args.json else render.rollouts(response))
    return EXIT_OK


def cmd_rollout_promote(args: argparse.Namespace) -> int:
    return _rollout_command(args, "Promote")


def cmd_rollout_abort(args: argparse.Namespace) -> int:
    return _rollout_command(args, "Abort")


def _rollout_command(args: argparse.Namespace, method: str) -> int:
    from controlplane.admin.v1 import admin_pb2

    request = admin_pb2.RolloutCommand(group=args.group, actor=_actor(), reason=args.reason)
    status = _call(
        args,
        lambda stub, md: getattr(stub, method)(request, timeout=RPC_TIMEOUT_SECONDS, metadata=md),
    )
    print(render.rollout(status))
    return EXIT_OK


def cmd_rollback(args: argparse.Namespace) -> int:
    from controlplane.admin.v1 import admin_pb2

    request = admin_pb2.RollbackRequest(
        group=args.group, to_version=args.to_version, actor=_actor(), reason=args.reason
    )
    done = _call(
        args, lambda stub, md: stub.Rollback(request, timeout=RPC_TIMEOUT_SECONDS, metadata=md)
    )
    aborted = " (aborted the rollout in progress)" if done.aborted_rollout else ""
    print(
        f"rolled back group {args.group} to {done.version} from "
        f"{done.previous_version or '-'}{aborted}; waiting up to {args.timeout:g}s for ACKs",
        file=sys.stderr,
    )
    wait = admin_pb2.WaitForConvergenceRequest(
        group=args.group, version=done.version, since=done.started_at, timeout_seconds=args.timeout
    )
    converged = _call(
        args,
        lambda stub, md: stub.WaitForConvergence(wait, timeout=args.timeout + 30, metadata=md),
    )
    print(
        f"{converged.acked_nodes}/{converged.total_nodes} nodes ACKed {done.version} "
        f"in {converged.seconds:.2f}s"
    )
    if converged.lagging:
        for node in converged.lagging:
            print(f"not ACKed: {node.node_id}: {node.state}", file=sys.stderr)
        raise CommandError(f"{len(converged.lagging)} node(s) did not ACK within {args.timeout:g}s")
    return EXIT_OK


def _as_json(message: object) -> str:
    return json.dumps(
        json_format.MessageToDict(message, preserving_proto_field_name=True),
        indent=2,
        sort_keys=True,  # type: ignore[arg-type]
    )


def _actor() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


def _token(args: argparse.Namespace) -> str | None:
    if token := os.environ.get("XDSCTL_TOKEN", "").strip():
        return token
    path = args.token_file or DEFAULT_TOKEN_FILE
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        if args.token_file is not None:
            raise CommandError(f"token file {path} does not exist") from None
        return None


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

    return _call(args, read_pages)


def _call(args: argparse.Namespace, rpc: Callable) -> Any:  # type: ignore[type-arg]
    """rpc(stub, metadata) against --server, mapping gRPC failures to one-line errors."""
    from controlplane.admin.v1 import admin_pb2_grpc

    token = _token(args)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with _channel(args) as channel:
        try:
            return rpc(admin_pb2_grpc.AdminStub(channel), metadata)
        except grpc.RpcError as error:
            code, details = error.code(), error.details()  # type: ignore[attr-defined]
            if code == grpc.StatusCode.UNAVAILABLE:
                raise CommandError(f"cannot reach xdscp at {args.server}: {details}") from None
            raise CommandError(f"{code.name.lower()}: {details}") from None


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


if __name__ == "__main__":
    # `python -m` runs this file as __main__, a second copy of controlplane.cli.main: run the
    # one authoring imports, so that main() catches the CommandError it raises.
    from controlplane.cli.main import main as package_main

    sys.exit(package_main())
