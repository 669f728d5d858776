"""Publishing input: resources packed as Any (from xdsctl) -> a validated Snapshot.

Nothing here stores or serves; the rollout controller decides where the snapshot goes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from google.protobuf import any_pb2

from controlplane import resources
from controlplane.snapshot import Snapshot


async def build_snapshot(packed: Iterable[any_pb2.Any]) -> Snapshot:
    """Raises UnknownTypeError, DecodeError, DuplicateResourceError or ConsistencyError."""
    items = [(item.type_url, resources.parse(item.type_url, item.value)) for item in packed]
    # Canonicalizing and serializing a large config takes a while: keep the loop serving.
    return await asyncio.to_thread(Snapshot.from_messages, items)
