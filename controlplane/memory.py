"""Give back the memory of streams that are gone.

Now and then: the shared caches drop entries made from subscriptions no open stream holds
(caches.release_unused), and glibc's malloc_trim hands free pages back to the operating
system, off the event loop. Without it, Python returns what a closed stream used to the C
allocator, which keeps it: after a burst of large requests the process stayed hundreds of
MiB larger for good. On a C library without malloc_trim (musl, macOS) that step does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
from collections.abc import Callable

import structlog

from controlplane import caches

log = structlog.get_logger("memory")

TRIM_INTERVAL_SECONDS = 10.0


def _malloc_trim() -> None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


async def release_periodically(
    names_in_use: Callable[[], set[int]], interval: float = TRIM_INTERVAL_SECONDS
) -> None:
    """Until cancelled: every `interval` seconds, release what closed streams left behind.
    `names_in_use()` gives the ids of the name sets open streams hold."""
    while True:
        await asyncio.sleep(interval)
        try:
            caches.release_unused(names_in_use())
        except Exception:  # a bug of ours: logged, and the next round tries again
            log.exception("releasing unused cache entries failed")
        with contextlib.suppress(RuntimeError):  # the loop's executor is shutting down
            await asyncio.to_thread(_malloc_trim)
