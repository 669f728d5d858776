"""xdsctl commands that run on the server's machine: `serve`, `certgen`, `store-key`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controlplane.cli.client import EXIT_OK, CommandError

if TYPE_CHECKING:
    from controlplane import app


def add_commands(commands: Any) -> None:
    serve = commands.add_parser("serve", help="run the control plane")
    serve.add_argument("--xds-address", default="127.0.0.1:18000", help="xDS gRPC (Envoys)")
    serve.add_argument(
        "--xds-socket", type=Path, default=None, help="also serve xDS on this Unix socket"
    )
    serve.add_argument("--admin-address", default="127.0.0.1:18001", help="admin gRPC (xdsctl)")
    serve.add_argument("--http-address", default="127.0.0.1:18002", help="/healthz, /readyz")
    serve.add_argument(
        "--store",
        default=None,
        help="SQLite file (default .xdscp/xdscp.db), or a PostgreSQL URL postgresql://USER@HOST"
        ":PORT/DBNAME (a password is better in ~/.pgpass or PGPASSWORD than in the URL)",
    )
    serve.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="with a PostgreSQL --store: where the admin tokens and the xDS Unix socket go "
        "(default .xdscp)",
    )
    serve.add_argument(
        "--replica-id",
        default=None,
        help="with a PostgreSQL --store: this replica's name in `xdsctl status` and the "
        "logs (default: host name and 6 random hex digits)",
    )
    serve.add_argument(
        "--store-key-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="encrypt the secrets in the store with this key: 32 bytes, raw or base64, "
        "owner-only (make one with `xdsctl store-key create FILE`)",
    )
    serve.add_argument(
        "--rollout-policy",
        type=Path,
        default=None,
        help="canary policy YAML; relative paths in it are relative to its directory",
    )
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
    serve.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="least severe log lines written",
    )
    serve.add_argument("--drain-seconds", type=float, default=5.0, help="grace period on shutdown")
    serve.add_argument(
        "--warming-timeout",
        type=_positive_seconds,
        default=None,
        metavar="SECONDS",
        help="how long listeners and routes wait for Envoy to warm (ACK) new clusters "
        "before they are sent anyway (default 10)",
    )
    serve.add_argument(
        "--first-sync-timeout",
        type=_positive_seconds,
        default=None,
        metavar="SECONDS",
        help="how long an Envoy starting empty may take to ACK every type it is served "
        "before it shows as STUCK (default 30)",
    )
    serve.set_defaults(handler=cmd_serve)
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
    certgen.add_argument("--days", type=int, default=365, help="validity of the certificates")
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
    from controlplane.rollout.policy import check_probe_binaries

    try:
        config = serve_config(args)
        check_probe_binaries(args.rollout_policy, config.policies)  # envoy --version, unshare
    except ValueError as error:
        raise CommandError(str(error)) from None
    import asyncio

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
    from controlplane.store import pg_url

    store = args.store or str(app.DEFAULT_STORE)
    database = pg_url.DatabaseUrl.parse(store) if pg_url.is_database_url(store) else None
    return app.Config(
        xds_address=app.Address.parse(args.xds_address),
        admin_address=app.Address.parse(args.admin_address),
        http_address=app.Address.parse(args.http_address),
        store_path=app.DEFAULT_STORE if database else Path(store),
        database=database,
        state_dir=args.state_dir,
        replica_id=args.replica_id,
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
        **({"first_sync_timeout": args.first_sync_timeout} if args.first_sync_timeout else {}),
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
