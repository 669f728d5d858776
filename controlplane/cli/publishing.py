"""`xdsctl publish`: check a config directory here, show its diff, and send it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

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


def add_commands(commands: Any) -> None:
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
        actor=actor(),
        resources=[
            any_pb2.Any(type_url=r.type_url, value=resources.serialize(r.message))
            for r in config.resources
        ],
    )
    if error := limits.too_large("the publish request", request.ByteSize()):
        raise CommandError(f"{args.directory}: {error}; nothing published")
    print(authoring.publish_preview(snapshot, args.group, args), file=sys.stderr)
    response = call(
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
    if args.wait:
        return follow.after_publish(args, response)
    print(as_json(response) if args.json else response.version)
    return EXIT_OK
