"""Caches shared between streams stay within their byte budgets (controlplane/caches.py)."""

from __future__ import annotations

from collections import OrderedDict

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from controlplane.caches import CACHES, ByteBoundedCache, size_of_names
from controlplane.resources import ENDPOINT
from controlplane.xds.limits import MAX_NAMES_PER_REQUEST
from controlplane.xds.stream import SotwStream
from tests import factories


def test_the_least_recently_used_entries_go_first_once_over_budget() -> None:
    cache: ByteBoundedCache[str, str] = ByteBoundedCache("test_lru", 100)
    for key in "abcd":
        cache.put(key, key, 10)
    assert cache.get("a") == "a"  # now the most recently used
    for key in "efghijk":
        cache.put(key, key, 10)
    assert cache.bytes <= 100 and len(cache) == 10
    assert cache.get("a") == "a" and cache.get("b") is None


def test_an_entry_over_an_eighth_of_the_budget_is_returned_but_not_kept() -> None:
    cache: ByteBoundedCache[str, bytes] = ByteBoundedCache("test_large", 800)
    assert cache.put("big", b"x", 101) == b"x"
    assert cache.get("big") is None and cache.bytes == 0


def test_size_of_names_counts_every_name() -> None:
    assert size_of_names(None) == 0
    assert size_of_names(["ab", "cd"]) > size_of_names(["ab"]) > 0


def test_clients_naming_many_distinct_resources_cannot_grow_the_shared_caches() -> None:
    """40 streams, each asking for as many names as a request may carry, names nobody else
    asks for (on the old code, 40 x 100,000 names left +421 MiB after the streams closed)."""
    snapshot = factories.edge_snapshot()
    for client in range(40):
        stream = SotwStream(client, lambda node: snapshot)
        request = discovery_pb2.DiscoveryRequest(
            type_url=ENDPOINT,
            resource_names=[f"hostile-{client}-{i}" for i in range(MAX_NAMES_PER_REQUEST)],
            node=base_pb2.Node(id=f"hostile-{client}"),
        )
        stream.receive(request)
    for name, cache in CACHES.items():
        assert cache.bytes <= cache.budget_bytes, name
    assert sum(cache.bytes for cache in CACHES.values()) <= 200 << 20


def test_entries_made_from_subscriptions_no_open_stream_holds_are_released() -> None:
    from controlplane import caches
    from controlplane.xds.fleet import Fleet

    class Control:
        def wake(self) -> None: ...
        def close(self) -> None: ...

    snapshot = factories.edge_snapshot()
    fleet = Fleet()
    streams = []
    for client in range(2):
        stream = SotwStream(100 + client, lambda node: snapshot)
        names = [f"mine-{client}-{i}" for i in range(1000)]
        request = discovery_pb2.DiscoveryRequest(
            type_url=ENDPOINT, resource_names=names, node=base_pb2.Node(id=f"n{client}")
        )
        stream.receive(request)
        fleet.add(stream, Control())
        streams.append(stream)
    kept, gone = (s.types[ENDPOINT].names for s in streams)
    name_sets = CACHES["name_sets"]
    assert name_sets.get(kept) is kept and name_sets.get(gone) is gone
    fleet.remove(streams[1])
    caches.release_unused(fleet.names_in_use())
    assert name_sets.get(kept) is kept
    assert name_sets.get(gone) is None
    assert not any(key[2] is gone for key in CACHES["sotw_entries"]._entries)


def test_a_cache_without_subscriptions_in_its_keys_is_never_walked_by_the_release() -> None:
    """publish._prepared's cache changes in the publish's worker thread while the release
    runs on the event loop: walking it then fails ("mutated during iteration") and ended
    the periodic release for good. Such a cache holds nothing made from a subscription, so
    the release leaves it alone."""

    class Unwalkable(OrderedDict):  # type: ignore[type-arg]
        def __iter__(self):  # type: ignore[no-untyped-def]
            raise RuntimeError("OrderedDict mutated during iteration")

    cache: ByteBoundedCache[str, str] = ByteBoundedCache("test-unwalked", 1 << 20)
    cache.put("a", "A", 10)
    cache._entries = Unwalkable(cache._entries)
    cache.release_unused(set())
    assert cache.get("a") == "A"
