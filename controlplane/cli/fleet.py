"""xdsctl commands that read: `status` (the fleet), `config-dump` (one node), `snapshots`
(history), `get` (a version)."""

from __future__ import annotations

import argparse
import fnmatch
import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format

from controlplane.cli import render, versions
from controlplane.cli.client import (
    EXIT_OK,
    RPC_TIMEOUT_SECONDS,
    CommandError,
    add_server,
    as_json,
    call,
    fetch_snapshot,
)

if TYPE_CHECKING:
    from google.protobuf import any_pb2

    from controlplane.admin.v1 import admin_pb2


def add_commands(commands: Any) -> None:
    status = commands.add_parser(
        "status",
        help="one line per connected Envoy: role, versions, SYNCED/STALE/NACKED/WARMING/STUCK",
    )
    status.add_argument(
        "--node", default="", metavar="GLOB", help="only nodes whose id matches (fnmatch glob)"
    )
    status.add_argument(
        "--group", default="", help="only nodes of this group (their own or the one they follow)"
    )
    status.add_argument(
        "--types", action="store_true", help="one line per node and type, with type versions"
    )
    status.add_argument("--json", action="store_true", help="print the answer as JSON")
    add_server(status)
    status.set_defaults(handler=cmd_status)

    dump = commands.add_parser(
        "config-dump", help="what one node was sent, ACKed and should hold, per type"
    )
    dump.add_argument("node", metavar="NODE", help="the node id (as `xdsctl status` lists it)")
    dump.add_argument("--type", default="", help=f"only this type: {_type_names()}")
    dump.add_argument(
        "--resources",
        action="store_true",
        help="print the resources it should hold as YAML, not only their names",
    )
    dump.add_argument(
        "-o",
        "--output",
        choices=("text", "yaml", "json"),
        default="text",
        help="yaml: the whole dump with the resources; json: the API's answer",
    )
    dump.add_argument("--json", action="store_true", help="same as -o json")
    _add_show_secrets(dump)
    add_server(dump)
    dump.set_defaults(handler=cmd_config_dump)

    snapshots = commands.add_parser("snapshots", help="snapshot history and group pointers")
    snapshots.add_argument("--group", default="", help="only this group (default: every group)")
    snapshots.add_argument("--limit", type=int, default=50, help="newest entries shown")
    snapshots.add_argument("--json", action="store_true", help="print the answer as JSON")
    add_server(snapshots)
    snapshots.set_defaults(handler=cmd_snapshots)

    get = commands.add_parser("get", help="print a stored snapshot's resources as YAML")
    get.add_argument("version", metavar="VERSION", help=versions.HELP)
    get.add_argument("--group", default="default", help="whose stable, candidate or last_good")
    get.add_argument("--type", default="", help=f"only this type: {_type_names()}")
    get.add_argument("--name", default="", help="only the resource of this name")
    get.add_argument(
        "--json", action="store_true", help="the same `resources:` as JSON, instead of YAML"
    )
    _add_show_secrets(get)
    add_server(get)
    get.set_defaults(handler=cmd_get)


def _add_show_secrets(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--show-secrets",
        action="store_true",
        help="print private keys, passwords and other secret values as stored; needs the "
        "write token (without it they read [redacted])",
    )


def _type_names() -> str:
    from controlplane import resources

    return ", ".join(resources.BY_SHORT_NAME)


def _type_url(name: str) -> str:
    """A --type value (short name or type URL) as a type URL; "" stays "" (every type)."""
    from controlplane import resources

    if not name or name in resources.BY_URL:
        return name
    known = resources.BY_SHORT_NAME.get(name)
    if known is None:
        raise CommandError(f"unknown --type {name!r}; use one of {_type_names()}")
    return known.type_url


def cmd_status(args: argparse.Namespace) -> int:
    from controlplane.admin.v1 import admin_pb2

    response = call(
        args,
        lambda stub, md: stub.GetFleetStatus(
            admin_pb2.GetFleetStatusRequest(), timeout=RPC_TIMEOUT_SECONDS, metadata=md
        ),
    )
    kept = [n for n in response.nodes if _selected(n, args.node, args.group)]
    del response.nodes[:]
    response.nodes.extend(kept)
    if args.json:
        print(as_json(response))
    elif not kept and (args.node or args.group):
        print(f"no connected node matches{_filters(args)}")
    else:
        print(render.fleet_status(response) if args.types else render.fleet_summary(response))
    return EXIT_OK


def _selected(node: admin_pb2.NodeStatus, glob: str, group: str) -> bool:
    if glob and not fnmatch.fnmatchcase(node.node_id, glob):
        return False
    return not group or group in (node.group, node.served_group)


def _filters(args: argparse.Namespace) -> str:
    return "".join(
        f" {flag} {value}"
        for flag, value in (("--node", args.node), ("--group", args.group))
        if value
    )


def cmd_config_dump(args: argparse.Namespace) -> int:
    from controlplane import resources
    from controlplane.admin.v1 import admin_pb2

    output = "json" if args.json else args.output
    request = admin_pb2.NodeConfigRequest(
        node_id=args.node,
        type_url=_type_url(args.type),
        include_resources=args.resources or args.show_secrets or output == "yaml",
        include_secrets=args.show_secrets,
    )
    response = call(
        args, lambda stub, md: stub.GetNodeConfig(request, timeout=RPC_TIMEOUT_SECONDS, metadata=md)
    )
    resources.load_all_descriptors()  # the JSON and YAML of the resources' typed_configs
    if output == "json":
        print(as_json(response))
        return EXIT_OK
    if output == "yaml":
        print(_yaml(render.node_config_tree(response, resources_yaml=_plain)), end="")
        return EXIT_OK
    print(render.node_config(response, _yaml_of if request.include_resources else None))
    return EXIT_OK


def _plain(packed: Iterable[any_pb2.Any]) -> list[dict[str, Any]]:
    """Resources as plain dicts in the form `publish` reads (with their @type)."""
    from controlplane import resources

    items = []
    for each in packed:
        message = resources.unpack_any(each)
        fields = json_format.MessageToDict(message, preserving_proto_field_name=True)
        # A plain-dict copy: typed_config Anys come back as OrderedDicts, which YAML won't take.
        items.append({"@type": each.type_url, **json.loads(json.dumps(fields))})
    return items


def _yaml(data: object) -> str:
    import yaml

    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # the C writer: same text, faster
    return yaml.dump(data, Dumper=dumper, sort_keys=False)


def _yaml_of(packed: Iterable[any_pb2.Any]) -> str:
    return _yaml({"resources": _plain(packed)})


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
    from controlplane import resources

    version = versions.resolve_arg(args, args.version, args.group)
    response = fetch_snapshot(args, version, _type_url(args.type), args.name, args.show_secrets)
    if not response.resources:
        raise CommandError(f"no resources in {response.version} match --type/--name")
    resources.load_all_descriptors()
    if args.json:  # the JSON form of the same file, so it publishes back too
        print(json.dumps({"resources": _plain(response.resources)}, indent=2))
        return EXIT_OK
    print(f"# xdsctl get {response.version}")
    print(_yaml_of(response.resources), end="")
    return EXIT_OK
