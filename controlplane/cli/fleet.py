"""xdsctl commands that read: `status` (the fleet), `snapshots` (history), `get` (a version)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from google.protobuf import json_format

from controlplane.cli import render
from controlplane.cli.client import (
    EXIT_OK,
    RPC_TIMEOUT_SECONDS,
    CommandError,
    add_server,
    as_json,
    call,
    fetch_snapshot,
)


def add_commands(commands: Any) -> None:
    status = commands.add_parser(
        "status", help="per node and type: SYNCED, WARMING, STALE, NACKED, NOT_SENT; STUCK nodes"
    )
    status.add_argument("--json", action="store_true")
    add_server(status)
    status.set_defaults(handler=cmd_status)

    snapshots = commands.add_parser("snapshots", help="snapshot history and group pointers")
    snapshots.add_argument("--group", default="")
    snapshots.add_argument("--limit", type=int, default=50)
    snapshots.add_argument("--json", action="store_true")
    add_server(snapshots)
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
    add_server(get)
    get.set_defaults(handler=cmd_get)


def cmd_status(args: argparse.Namespace) -> int:
    from controlplane.admin.v1 import admin_pb2

    response = call(
        args,
        lambda stub, md: stub.GetFleetStatus(
            admin_pb2.GetFleetStatusRequest(), timeout=RPC_TIMEOUT_SECONDS, metadata=md
        ),
    )
    print(as_json(response) if args.json else render.fleet_status(response))
    return EXIT_OK


def cmd_snapshots(args: argparse.Namespace) -> int:
    from controlplane.admin.v1 import admin_pb2

    request = admin_pb2.ListSnapshotsRequest(group=args.group, limit=args.limit)
    response = call(
        args, lambda stub, md: stub.ListSnapshots(request, timeout=RPC_TIMEOUT_SECONDS, metadata=md)
    )
    print(as_json(response) if args.json else render.history(response))
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
