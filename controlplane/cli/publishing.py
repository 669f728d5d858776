"""`xdsctl publish`: read a config directory, show its diff, and send it to be checked and
stored.

A group other than default that has no snapshot yet needs --create-group: without it the
server refuses the publish and names the groups it knows, so a typo creates nothing.

Exit status: 0 published, staged or unchanged; 1 refused or not sent; 3 sent but cut off
before the answer came, so the snapshot may have been stored (the message says how to check;
publishing again is a no-op if it was).
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2

from controlplane.admin import limits
from controlplane.cli import follow
from controlplane.cli.client import (
    EXIT_OK,
    RPC_TIMEOUT_SECONDS,
    CommandError,
    actor,
    add_server,
    as_json,
    call,
)

# The request was sent and its answer lost: the server may have stored the snapshot.
EXIT_MAYBE_STORED = 3
_CUT_OFF_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)
_NEVER_CONNECTED = "failed to connect"  # gRPC's UNAVAILABLE text when no connection was made

_T = TypeVar("_T")


class CutOffError(Exception):
    """The Publish call ended without an answer after it may have reached the server."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _send(stub: Any, metadata: Any, request: Any) -> Any:
    try:
        return stub.Publish(request, timeout=RPC_TIMEOUT_SECONDS, metadata=metadata)
    except grpc.RpcError as error:
        code, details = error.code(), error.details() or ""  # type: ignore[attr-defined]
        if code in _CUT_OFF_CODES and _NEVER_CONNECTED not in details.lower():
            raise CutOffError(f"{code.name.lower()}: {details}") from None
        raise


def cut_off_text(args: argparse.Namespace, version: str, reason: str) -> str:
    """What to say when a publish was cut off: it may be stored, and how to find out. The
    version was computed here: versions are content hashes, the same on the server."""
    return (
        f"the publish to group {args.group} was sent to {args.server}, but no answer came "
        f"back ({reason}): the snapshot may have been stored. Its version is {version}; "
        f"check with `xdsctl snapshots --group {args.group}`. Publishing {args.directory} "
        'again is safe: if it was stored, the answer is "unchanged".'
    )


def add_commands(commands: Any) -> None:
    publish = commands.add_parser(
        "publish",
        help="publish a directory of Envoy config",
        description=__doc__.split("\n\n", 1)[1].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    publish.add_argument("directory", type=Path)
    publish.add_argument("--group", default="default", help="node group (node.cluster)")
    publish.add_argument(
        "--create-group",
        action="store_true",
        help="allow the first publish to a group that has no snapshot yet (without it, that "
        "is refused as a likely typo; default needs no flag)",
    )
    publish.add_argument("--env", default=None, help="apply DIR/environments/ENV.yaml")
    publish.add_argument("--message", "-m", default="", help="why: kept in the history")
    publish.add_argument(
        "--show-secrets",
        action="store_true",
        help="show secret values in the diff printed first (by default a changed private key "
        "or password shows as a changed [redacted ...] mark)",
    )
    publish.add_argument(
        "--wait",
        action="store_true",
        help="follow the rollout (or, without a policy, the group's ACKs) to its end: "
        "exit 0 promoted, 1 aborted, 2 timeout",
    )
    follow.add_timeout_flag(publish, "--wait")
    publish.add_argument("--json", action="store_true", help="JSON (JSON lines with --wait)")
    add_server(publish)
    publish.set_defaults(handler=cmd_publish)


def cmd_publish(args: argparse.Namespace) -> int:
    from controlplane import resources
    from controlplane.admin.v1 import admin_pb2
    from controlplane.cli import authoring
    from controlplane.config import ConfigError, snapshot_of
    from controlplane.config.environments import load_config

    # The diff shown first needs the group's stable snapshot: read it while the files are
    # parsed. Only that read goes out before they pass, and a refusal does not wait for it.
    stable = _in_background(lambda: authoring.stable_snapshot(args, args.group, True))
    try:
        config = load_config(args.directory, args.env)
        try:
            snapshot = snapshot_of(config.resources)
        except ConfigError:
            _refuse_if_invalid(args, config)  # field rules and lint speak first, as in validate
            raise
    except ConfigError as error:
        _print_errors(error.problems)
        raise CommandError(
            f"{args.directory}: {len(error.problems)} error(s); nothing published"
        ) from None
    request = admin_pb2.PublishRequest(
        group=args.group,
        message=args.message,
        actor=actor(),
        create_group=args.create_group,
        resources=[
            any_pb2.Any(type_url=r.type_url, value=resources.serialize(r.message))
            for r in config.resources
        ],
    )
    if error := limits.too_large("the publish request", request.ByteSize()):
        raise CommandError(f"{args.directory}: {error}; nothing published")
    # The server checks Envoy's field rules and the lint errors on every publish
    # (controlplane.publish): they run here only to locate, in the files, what it refused.
    try:
        preview = authoring.publish_preview(snapshot, stable.result(), args.show_secrets)
        print(preview, file=sys.stderr)
        response = call(args, lambda stub, md: _send(stub, md, request))
    except CutOffError as error:
        print(f"xdsctl: {cut_off_text(args, snapshot.version, error.reason)}", file=sys.stderr)
        return EXIT_MAYBE_STORED
    except CommandError:
        _refuse_if_invalid(args, config)
        raise
    counts = ", ".join(f"{n} {t}" for t, n in sorted(response.counts.items()) if n)
    outcome = {
        "promoted": f"published {response.version} to group {args.group}",
        "staged": f"staged {response.version} for a canary rollout in group {args.group} "
        "(see `xdsctl rollout status`)",
        "unchanged": f"unchanged: group {args.group} already holds {response.version}",
    }[response.outcome]
    print(f"{outcome} ({counts})", file=sys.stderr)
    if args.wait:
        return follow.after_publish(args, response)
    print(as_json(response) if args.json else response.version)
    return EXIT_OK


def _in_background(work: Callable[[], _T]) -> Future[_T]:
    """`work` run on a daemon thread (the command may end without its answer)."""
    future: Future[_T] = Future()

    def run() -> None:
        try:
            future.set_result(work())
        except BaseException as error:  # handed to whoever waits for the result
            future.set_exception(error)

    threading.Thread(target=run, name="xdsctl-prefetch", daemon=True).start()
    return future


def _refuse_if_invalid(args: argparse.Namespace, config: Any) -> None:
    """Raise CommandError, after printing each at its file and line, if the config breaks
    Envoy's field rules (Envoy would NACK it) or has error-level lint findings (a NACK or
    broken traffic): the rules the server refuses a publish by."""
    from controlplane.cli import authoring
    from controlplane.config.field_rules import check_field_rules
    from controlplane.config.lint import refusals

    if problems := check_field_rules(config.resources, config.sources):
        _print_errors(problems)
        raise CommandError(f"{args.directory}: {len(problems)} error(s); nothing published")
    if found := refusals(config.resources, config.sources):
        for finding in found:
            print(authoring.lint_problem(finding).text(), file=sys.stderr)
        raise CommandError(
            f"{args.directory}: {len(found)} lint error(s), as `xdsctl validate` shows; "
            "nothing published"
        )


def _print_errors(problems: Iterable[object]) -> None:
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
