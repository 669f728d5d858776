"""Snapshot: an immutable, validated, versioned set of Envoy resources.

Invariants:
- Every resource is serialized once, here; streams send these bytes and never re-encode.
- Versions are content hashes: the same resources give the same version on every machine
  and after every restart. Each type has its own version, so an unchanged type is not pushed.
- A snapshot built from messages has no dangling references (see resources.references).
- A node is served only the secrets its snapshot's other resources reference, and none when
  the snapshot is another group's (`as_served`): an Envoy never receives keys that nothing
  it runs uses, or that belong to a group it is not in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from controlplane import resources
from controlplane.caches import ByteBoundedCache, size_of_names
from controlplane.resources import ADS_ORDER

# Wire entries joined per (type, version, names): a fleet mostly asks for the same names.
_JOINED_ENTRIES: ByteBoundedCache[tuple[str, str, frozenset[str]], bytes] = ByteBoundedCache(
    "sotw_entries", 64 << 20, lambda key: (key[2],)
)
VERSION_LENGTH = 16  # hex digits of sha256 kept in a version string
_ANY_RESOURCES_TAG = b"\x12"  # DiscoveryResponse.resources: field 2, length-delimited
_DELTA_RESOURCES_TAG = b"\x12"  # DeltaDiscoveryResponse.resources: field 2 as well


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _digest(*parts: bytes) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(_varint(len(part)))
        hasher.update(part)
    return hasher.hexdigest()[:VERSION_LENGTH]


@dataclass(frozen=True)
class Resource:
    """One resource, serialized once, with its ready-to-send response fields, each built
    the first time a response needs it (a fleet on one protocol never needs the other's,
    and xdsctl's snapshots never send): `wire_entry` for state of the world (an Any) and
    `delta_entry` for delta (a Resource with its name and version)."""

    type_url: str
    name: str
    body: bytes
    version: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "version", _digest(self.body))

    @cached_property
    def wire_entry(self) -> bytes:
        packed = any_pb2.Any(type_url=self.type_url, value=self.body).SerializeToString()
        return _ANY_RESOURCES_TAG + _varint(len(packed)) + packed

    @cached_property
    def delta_entry(self) -> bytes:
        packed = any_pb2.Any(type_url=self.type_url, value=self.body)
        delta = discovery_pb2.Resource(name=self.name, version=self.version, resource=packed)
        serialized = delta.SerializeToString()
        return _DELTA_RESOURCES_TAG + _varint(len(serialized)) + serialized

    def message(self) -> Message:
        return resources.parse(self.type_url, self.body)

    @cached_property
    def references(self) -> tuple[tuple[str, str], ...]:
        """(type URL, name) of each resource this one needs (see resources.references),
        parsed once per snapshot however many streams ask."""
        return tuple(dict.fromkeys(resources.references(self.message())))


@dataclass(frozen=True)
class TypeResources:
    """All resources of one type in a snapshot, with that type's own version."""

    type_url: str
    by_name: Mapping[str, Resource]
    version: str = field(init=False)

    def __post_init__(self) -> None:
        names = sorted(self.by_name)
        object.__setattr__(self, "by_name", MappingProxyType({n: self.by_name[n] for n in names}))
        parts = [self.type_url.encode()]
        for name in names:
            parts += [name.encode(), self.by_name[name].body]
        object.__setattr__(self, "version", _digest(*parts))

    @cached_property
    def wire_entries(self) -> bytes:
        """Every resource's wire entry, in name order: a state-of-the-world answer to all."""
        return b"".join(r.wire_entry for r in self.by_name.values())

    def entries_for(self, names: frozenset[str] | None) -> bytes:
        """Wire entries for the named resources (all of them when names is None). Joined once
        per distinct set of names: a fleet mostly asks for the same ones."""
        if names is None:
            return self.wire_entries
        key = (self.type_url, self.version, names)
        entries = _JOINED_ENTRIES.get(key)
        if entries is None:
            if len(names) < len(self.by_name):
                wanted = sorted(n for n in names if n in self.by_name)
            else:  # by_name is sorted: filtering it costs less than sorting many names
                wanted = [n for n in self.by_name if n in names]
            entries = b"".join(self.by_name[n].wire_entry for n in wanted)
            _JOINED_ENTRIES.put(key, entries, len(entries) + size_of_names(names))
        return entries


@dataclass(frozen=True)
class DanglingReference:
    from_type: str
    from_name: str
    to_type: str
    to_name: str

    def __str__(self) -> str:
        source = resources.resource_type(self.from_type).short_name
        target = resources.resource_type(self.to_type)
        return (
            f'{source} "{self.from_name}" references {target.short_name} "{self.to_name}", '
            f"which is not in the snapshot"
        )


class ConsistencyError(ValueError):
    """The resources reference names the snapshot does not hold."""

    def __init__(self, dangling: list[DanglingReference]) -> None:
        self.dangling = dangling
        super().__init__("; ".join(str(d) for d in dangling))


class DuplicateResourceError(ValueError):
    pass


class Snapshot:
    """Immutable set of resources by type. Build with `from_messages`, `from_resources` or
    `from_serialized`."""

    __slots__ = ("_served", "_types", "version")

    def __init__(self, types: Mapping[str, TypeResources], *, version: str | None = None) -> None:
        """`version` is given only to a view of another snapshot (`as_served`), which keeps
        the version of the snapshot it shows."""
        self._types = MappingProxyType(dict(types))
        self._served: dict[bool, Snapshot] = {}
        present = [t for t in ADS_ORDER if self._types[t.type_url].by_name]
        self.version = version or _digest(
            *(
                p
                for t in present
                for p in (t.type_url.encode(), self._types[t.type_url].version.encode())
            )
        )

    @classmethod
    def from_serialized(cls, items: Iterable[tuple[str, str, bytes]]) -> Snapshot:
        """From (type URL, name, bytes) triples, e.g. read back from a store. Not re-checked."""
        return cls._of(Resource(type_url, name, body) for type_url, name, body in items)

    @classmethod
    def from_resources(cls, items: Iterable[Resource]) -> Snapshot:
        """From resources already canonical (as `from_messages` makes them, e.g. kept from
        an earlier snapshot); checks every reference resolves, as `from_messages` does."""
        items = list(items)
        return cls._of(items)._resolving((r.type_url, r.name, r.references) for r in items)

    def _resolving(
        self, referring: Iterable[tuple[str, str, Iterable[tuple[str, str]]]]
    ) -> Snapshot:
        """This snapshot, if every (type URL, name) that each (type URL, name, references)
        of `referring` names is in it; else ConsistencyError lists the dangling ones."""
        dangling = [
            DanglingReference(url, name, to_type, to_name)
            for url, name, references in referring
            for to_type, to_name in references
            if to_name not in self.resources(to_type)
        ]
        if dangling:
            raise ConsistencyError(dangling)
        return self

    @classmethod
    def _of(cls, items: Iterable[Resource]) -> Snapshot:
        grouped: dict[str, dict[str, Resource]] = {t.type_url: {} for t in ADS_ORDER}
        for resource in items:
            bucket = grouped[resources.resource_type(resource.type_url).type_url]
            if resource.name in bucket:
                raise DuplicateResourceError(
                    f"duplicate {resource.type_url} named {resource.name!r}"
                )
            bucket[resource.name] = resource
        return cls({url: TypeResources(url, by_name) for url, by_name in grouped.items()})

    @classmethod
    def from_messages(cls, items: Iterable[tuple[str, Message]]) -> Snapshot:
        """Canonicalize, serialize once, and check every reference resolves."""
        items = list(items)
        for _, message in items:
            resources.canonicalize(message)
        snapshot = cls.from_serialized(
            (url, resources.resource_name(m), resources.serialize(m)) for url, m in items
        )
        return snapshot._resolving(
            (url, resources.resource_name(m), dict.fromkeys(resources.references(m)))
            for url, m in items
        )

    def as_served(self, *, owner: bool) -> Snapshot:
        """This snapshot as a node is served it: with only the secrets its other resources
        reference, or (`owner` False: the node's group falls back on this group's config)
        with none. Same version; built once per snapshot."""
        secrets = self.of_type(resources.SECRET)
        if not secrets.by_name:
            return self
        view = self._served.get(owner)
        if view is None:
            kept = self._referenced_secrets() if owner else frozenset()
            if kept == secrets.by_name.keys():
                view = self
            else:
                types = dict(self._types)
                types[resources.SECRET] = TypeResources(
                    resources.SECRET, {n: r for n, r in secrets.by_name.items() if n in kept}
                )
                view = Snapshot(types, version=self.version)
            self._served[owner] = view
        return view

    def _referenced_secrets(self) -> frozenset[str]:
        return frozenset(
            name
            for resource in self.all_resources()
            if resource.type_url != resources.SECRET
            for to_type, name in resource.references
            if to_type == resources.SECRET
        )

    def of_type(self, type_url: str) -> TypeResources:
        return self._types[resources.resource_type(type_url).type_url]

    def resources(self, type_url: str) -> Mapping[str, Resource]:
        return self.of_type(type_url).by_name

    def type_versions(self) -> dict[str, str]:
        return {url: t.version for url, t in self._types.items()}

    def all_resources(self) -> Iterable[Resource]:
        for resource_type in ADS_ORDER:
            yield from self._types[resource_type.type_url].by_name.values()

    @property
    def size_bytes(self) -> int:
        return sum(len(r.body) for r in self.all_resources())

    def counts(self) -> dict[str, int]:
        return {t.short_name: len(self._types[t.type_url].by_name) for t in ADS_ORDER}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Snapshot) and other.version == self.version

    def __hash__(self) -> int:
        return hash(self.version)

    def __repr__(self) -> str:
        return f"Snapshot(version={self.version!r}, counts={self.counts()})"
