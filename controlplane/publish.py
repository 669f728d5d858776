"""Publishing input: resources packed as Any (from xdsctl) -> a validated Snapshot.

Nothing here stores or serves; the rollout controller decides where the snapshot goes.
What any admin client publishes meets the same bar as `xdsctl publish`: no dangling
reference (Snapshot), and no error-level lint finding (config.lint.refusals).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from google.protobuf import any_pb2
from google.protobuf.message import Message

from controlplane import resources
from controlplane.config.lint import check_publishable
from controlplane.snapshot import Snapshot

REQUEST_LOCATION = "publish request"


async def build_snapshot(packed: Iterable[any_pb2.Any]) -> Snapshot:
    """Raises UnknownTypeError, DecodeError, DuplicateResourceError, ConsistencyError or
    LintRefusal."""
    items = [(item.type_url, resources.parse(item.type_url, item.value)) for item in packed]
    # Canonicalizing, serializing and linting a large config takes a while: keep the loop
    # serving.
    return await asyncio.to_thread(_checked, items)


def _checked(items: list[tuple[str, Message]]) -> Snapshot:
    snapshot = Snapshot.from_messages(items)
    check_publishable(items, REQUEST_LOCATION)
    return snapshot
