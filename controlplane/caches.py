"""Caches shared by every stream, each bounded by bytes, whatever the clients ask.

A fleet asks for the same things over and over (the same names, the same diffs), so work is
shared through these caches. A client asking for a million distinct things must not make
them grow without bound: each is a least-recently-used map with a byte budget, and an entry
larger than an eighth of its budget is computed but not kept. Sizes are estimates of what an
entry holds (its bytes and strings), and every cache reports them as metrics
(`xdscp_cache_bytes`, `xdscp_cache_entries`). Entries made from subscriptions that no open
stream holds any more are released now and then (controlplane/memory.py).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_STRING_OVERHEAD = 57  # bytes CPython takes for a short str beyond its characters
_SLOT = 16  # bytes a set or dict slot takes per entry, roughly
_NAME_OVERHEAD = _STRING_OVERHEAD + _SLOT  # what one name in a set takes beyond its chars

# Every cache by name, for the metrics.
CACHES: dict[str, ByteBoundedCache[object, object]] = {}


class ByteBoundedCache(Generic[K, V]):
    def __init__(
        self,
        name: str,
        budget_bytes: int,
        names_in_key: Callable[[K], Iterable[frozenset[str] | None]] | None = None,
    ) -> None:
        """`names_in_key(key)` gives the subscriptions (name sets) a key was made from, so
        that entries no open stream can ask for again are released (`release_unused`). A
        cache without it holds nothing made from a subscription, and `release_unused`
        leaves it alone: so a cache used off the event loop (publish's) is never walked
        while it changes."""
        self.name = name
        self.budget_bytes = budget_bytes
        self._names_in_key = names_in_key
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self.bytes = 0
        CACHES[name] = self  # type: ignore[assignment]

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: K, value: V, size: int) -> V:
        """Keep `value` (of about `size` bytes) unless it is too large; return it."""
        if size > self.budget_bytes // 8:
            return value
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        self._entries[key] = (value, size)
        self.bytes += size
        while self.bytes > self.budget_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.bytes -= evicted
        return value

    def release_unused(self, names_in_use: set[int]) -> None:
        """Drop the entries made from a subscription no open stream holds (by identity:
        streams hold the shared name sets, see xds.stream.shared_names)."""
        names_in_key = self._names_in_key
        if names_in_key is None:
            return
        unused = [
            key
            for key in self._entries
            if any(n is not None and id(n) not in names_in_use for n in names_in_key(key))
        ]
        for key in unused:
            self.bytes -= self._entries.pop(key)[1]

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


def size_of_names(names: Iterable[str] | None) -> int:
    """About what a set (or the keys of a dict) of these names takes."""
    if names is None:
        return 0
    if not isinstance(names, (set, frozenset, dict, list, tuple)):
        names = list(names)
    return len(names) * _NAME_OVERHEAD + sum(map(len, names))


def release_unused(names_in_use: set[int]) -> None:
    """Every cache drops what only closed streams could ask for."""
    for cache in CACHES.values():
        cache.release_unused(names_in_use)
