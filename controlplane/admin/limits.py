"""Message size limits of the admin gRPC API, one set for the server (app.py) and xdsctl.

- Every admin message, request or response, may be up to MAX_MESSAGE_BYTES (256 MiB): the
  server and xdsctl both set that as their send and their receive limit (GRPC_OPTIONS).
  A publish request holds the whole config, so this bounds the largest config there is.
- A stored snapshot is read a page at a time, PAGE_BYTES (4 MiB, gRPC's default receive
  limit) per page, so no answer grows with the snapshot and a client with gRPC's default
  limits can page through it too. A page always holds at least one resource, and never
  more than the message limit allows.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_MESSAGE_BYTES = 256 << 20
PAGE_BYTES = 4 << 20
GRPC_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)
_PAGE_HEADER_BYTES = 1 << 10  # room for a page's other fields (version, next offset)


def too_large(what: str, size: int) -> str | None:
    """The error to show for a message of `size` bytes, or None when it is within the limit."""
    if size <= MAX_MESSAGE_BYTES:
        return None
    return (
        f"{what} is {size:,} bytes, over the admin API's message limit of "
        f"{MAX_MESSAGE_BYTES:,} bytes ({MAX_MESSAGE_BYTES / (1 << 20):g} MiB)"
    )


def page_end(sizes: Sequence[int], start: int, budget: int) -> int:
    """Where the page that begins at entry `start` ends: as many of the entries (each of
    `sizes[i]` bytes) as fit in `budget` bytes, at least one."""
    budget = min(budget, MAX_MESSAGE_BYTES - _PAGE_HEADER_BYTES)
    end, used = start, 0
    while end < len(sizes) and (end == start or used + sizes[end] <= budget):
        used += sizes[end]
        end += 1
    return end
