"""Caches shared by every stream, each bounded by bytes, whatever the clients ask.

A fleet asks for the same things over and over (the same names, the same diffs), so work is
shared through these caches. A client asking for a million distinct things must not make
them grow without bound: each is a least-recently-used map with a byte budget, and an entry
larger than an eighth of its budget is computed but not kept. Sizes are estimates of what an
entry holds (its bytes and strings), and every cache reports them as metrics
(`xdscp_cache_bytes`, `xdscp_cache_entries`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_STRING_OVERHEAD = 57  # bytes CPython takes for a short str beyond its characters
_SLOT = 16  # bytes a set or dict slot takes per entry, roughly

# Every cache by name, for the metrics.
CACHES: dict[str, ByteBoundedCache[object, object]] = {}


class ByteBoundedCache(Generic[K, V]):
    def __init__(self, name: str, budget_bytes: int) -> None:
        self.name = name
        self.budget_bytes = budget_bytes
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
    return len(names) * (_STRING_OVERHEAD + _SLOT) + sum(map(len, names))
