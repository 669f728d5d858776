"""xdsctl commands of the canary gate and recovery: `rollout status|promote|abort`, `rollback`."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from controlplane.cli import follow, render, versions
from controlplane.cli.client import (
    EXIT_FAILED,
    EXIT_OK,
    RPC_TIMEOUT_SECONDS,
    CommandError,
    actor,
    add_server,
    as_json,
    call,
)

if TYPE_CHECKING:
    from controlplane.admin.v1 import admin_pb2


def add_commands(commands: Any) -> None:
    rollout = commands.add_parser("rollout", help="canary rollouts: status, promote, abort")
    rollout_commands = rollout.add_subparsers(
        dest="rollout_command", required=True, metavar="ACTION"
    )
    rollout_status = rollout_commands.add_parser("status", help="current or last rollout per group")
    rollout_status.add_argument(
        "--group", default="", help="only this group (default: every group)"
    )
    rollout_status.add_argument(
        "--json", action="store_true", help="JSON (JSON lines with --watch)"
    )
    rollout_status.add_argument(
        "--watch",
        action="store_true",
        help="follow the running rollout (of --group, or the only one) to its end: "
        "exit 0 promoted, 1 aborted, 2 timeout",
    )
    follow.add_timeout_flag(rollout_status, "--watch")
    add_server(rollout_status)
    rollout_status.set_defaults(handler=cmd_rollout_status)
    for action, handler, help_text in (
        ("promote", cmd_rollout_promote, "promote a candidate that passed its canaries"),
        ("abort", cmd_rollout_abort, "abort: canaries back to stable, candidate rejected"),
    ):
        command = rollout_commands.add_parser(action, help=help_text)
        command.add_argument("--group", default="default", help="the group whose rollout this is")
        command.add_argument("--reason", default="", help="recorded in the history")
        command.add_argument("--json", action="store_true", help="print the answer as JSON")
        add_server(command)
        command.set_defaults(handler=handler)

    rollback = commands.add_parser(
        "rollback", help="put last_good (or --to VERSION) on every node now, and wait for ACKs"
    )
    rollback.add_argument("--group", default="default", help="the group to roll back")
    rollback.add_argument(
        "--to",
        dest="to_version",
        default="",
        metavar="VERSION",
        help="what to put on stable, if not last_good: " + versions.HELP,
    )
    rollback.add_argument("--reason", default="", help="recorded in the history")
    rollback.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for ACKs")
    rollback.add_argument(
        "--json", action="store_true", help="JSON lines: the rollback, each N/M, the end"
    )
    add_server(rollback)
    rollback.set_defaults(handler=cmd_rollback)


def cmd_rollout_status(args: argparse.Namespace) -> int:
    from controlplane.admin.v1 import admin_pb2

    request = admin_pb2.ListRolloutsRequest(group=args.group)
    response = call(
        args, lambda stub, md: stub.ListRollouts(request, timeout=RPC_TIMEOUT_SECONDS, metadata=md)
    )
    if args.watch:
        group = _group_to_watch(args.group, response)
        printer = follow.Printer(args.json)
        return call(  # type: ignore[no-any-return]
            args,
            lambda stub, md: follow.follow_rollout(stub, md, group, "", args.timeout, printer),
        )
    print(as_json(response) if args.json else render.rollouts(response))
    return EXIT_OK


def _group_to_watch(group: str, response: admin_pb2.ListRolloutsResponse) -> str:
    if group:
        return group
    active = [r.group for r in response.rollouts if r.phase in ("canary", "awaiting_promotion")]
    if len(active) != 1:
        running = ", ".join(active) or "none"
        raise CommandError(f"--watch needs --group: {len(active)} rollouts running ({running})")
    return active[0]


def cmd_rollout_promote(args: argparse.Namespace) -> int:
    return _rollout_command(args, "Promote")


def cmd_rollout_abort(args: argparse.Namespace) -> int:
    return _rollout_command(args, "Abort")


def _rollout_command(args: argparse.Namespace, method: str) -> int:
    from controlplane.admin.v1 import admin_pb2

    request = admin_pb2.RolloutCommand(group=args.group, actor=actor(), reason=args.reason)
    status = call(
        args,
        lambda stub, md: getattr(stub, method)(request, timeout=RPC_TIMEOUT_SECONDS, metadata=md),
    )
    print(as_json(status) if args.json else render.rollout(status))
    return EXIT_OK


def cmd_rollback(args: argparse.Namespace) -> int:
    from controlplane.admin.v1 import admin_pb2

    to_version = versions.resolve_arg(args, args.to_version, args.group) if args.to_version else ""
    request = admin_pb2.RollbackRequest(
        group=args.group, to_version=to_version, actor=actor(), reason=args.reason
    )
    done = call(
        args, lambda stub, md: stub.Rollback(request, timeout=RPC_TIMEOUT_SECONDS, metadata=md)
    )
    aborted = " (aborted the rollout in progress)" if done.aborted_rollout else ""
    printer = follow.Printer(args.json, text_out=sys.stderr)
    printer.event(
        "rollback",
        f"rolled back group {args.group} to {done.version} from "
        f"{done.previous_version or '-'}{aborted}; waiting up to {args.timeout:g}s for ACKs",
        {"group": args.group, **follow.message_dict(done)},
    )
    converged = call(
        args,
        lambda stub, md: follow.follow_convergence(
            stub, md, args.group, done.version, done.started_at, args.timeout, printer
        ),
    )
    final = (
        f"{converged.acked_nodes}/{converged.total_nodes} nodes ACKed {done.version} "
        f"in {converged.seconds:.2f}s"
    )
    if args.json:
        code = EXIT_FAILED if converged.lagging else EXIT_OK
        printer.event(
            "end",
            final,
            {
                "outcome": "converged" if code == EXIT_OK else "timeout",
                "exit_code": code,
                "message": final,
            },
        )
        return code
    print(final)
    if converged.lagging:
        for node in converged.lagging:
            print(f"not ACKed: {node.node_id}: {node.state}", file=sys.stderr)
        raise CommandError(f"{len(converged.lagging)} node(s) did not ACK within {args.timeout:g}s")
    return EXIT_OK
