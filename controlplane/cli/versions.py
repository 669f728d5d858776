"""Version references as xdsctl takes them, resolved to whole versions in this one place.

Wherever a command takes a version (get, diff, rollback --to), it also takes:
- a unique prefix of MIN_PREFIX or more hex digits; an ambiguous prefix is an error listing
  the versions it matches;
- `stable`, `candidate` or `last_good`: that pointer of the command's --group.

Resolution happens in the CLI, from the server's ListSnapshots answer (history and pointers),
so the admin API keeps taking whole versions only. A prefix is looked for among the newest
SCAN_LIMIT history entries and every group's pointers; an older version needs its whole
name, and the error says so.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from controlplane.cli.client import RPC_TIMEOUT_SECONDS, CommandError, call
from controlplane.snapshot import VERSION_LENGTH
from controlplane.store import POINTERS

if TYPE_CHECKING:
    from controlplane.admin.v1 import admin_pb2

MIN_PREFIX = 8  # hex digits: short enough to type, long enough to be unique in practice
SCAN_LIMIT = 10_000  # newest history entries searched for a prefix
_HEX = re.compile(r"[0-9a-f]+")

# (group, limit) -> the ListSnapshots answer; group "" asks for every group.
Listing = Callable[[str, int], "admin_pb2.ListSnapshotsResponse"]

HELP = (
    f"a version, a unique prefix of {MIN_PREFIX}+ hex digits, or {', '.join(POINTERS)} (of --group)"
)


def is_reference(text: str) -> bool:
    """Whether `text` reads as a version reference (not, say, a directory name)."""
    return text in POINTERS or (len(text) >= MIN_PREFIX and _HEX.fullmatch(text) is not None)


def resolve(text: str, group: str, listing: Listing) -> str:
    """The whole version `text` names. Raises CommandError naming what was tried."""
    if text in POINTERS:
        answer = listing(group, 1)
        pointers = answer.groups[group].pointers if group in answer.groups else {}
        version = pointers.get(text, "")
        if not version:
            raise CommandError(
                f"group {group} has no {text} version (see xdsctl snapshots --group {group})"
            )
        return version
    if not _HEX.fullmatch(text):
        raise CommandError(f"{text!r} is not a version: give {HELP}")
    if len(text) >= VERSION_LENGTH:
        return text
    if len(text) < MIN_PREFIX:
        raise CommandError(
            f"version prefix {text} is too short: give at least {MIN_PREFIX} hex digits"
        )
    answer = listing("", SCAN_LIMIT)
    known = {entry.version for entry in answer.entries}
    known.update(v for pointers in answer.groups.values() for v in pointers.pointers.values())
    matches = sorted(v for v in known if v.startswith(text))
    if not matches:
        raise CommandError(
            f"no stored version starts with {text} (searched the newest {SCAN_LIMIT:,} "
            "history entries and every group's pointers; give an older version whole)"
        )
    if len(matches) > 1:
        raise CommandError(f"version prefix {text} is ambiguous: it matches {', '.join(matches)}")
    return matches[0]


def server_listing(args: argparse.Namespace) -> Listing:
    """A Listing that asks the server of `args` (--server, token, TLS)."""
    from controlplane.admin.v1 import admin_pb2

    def listing(group: str, limit: int) -> admin_pb2.ListSnapshotsResponse:
        request = admin_pb2.ListSnapshotsRequest(group=group, limit=limit)
        return call(
            args,
            lambda stub, md: stub.ListSnapshots(request, timeout=RPC_TIMEOUT_SECONDS, metadata=md),
        )

    return listing


def resolve_arg(args: argparse.Namespace, text: str, group: str) -> str:
    return resolve(text, group, server_listing(args))
