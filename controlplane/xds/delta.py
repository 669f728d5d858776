"""Delta (incremental) xDS on the shared protocol core (stream.XdsStream).

What delta adds to the shared rules:
- Subscriptions change by `resource_names_subscribe` / `_unsubscribe`, on any request,
  stale nonce or not. The first request of a wildcard-capable type with no names is the
  legacy wildcard; names subscribed later are added to it, and it stays a wildcard. `*`
  subscribes or unsubscribes the wildcard explicitly.
- The stream tracks which version of each resource the client holds, counting every
  response sent as applied (responses are applied in order) unless it is NACKed. A
  response carries only resources whose version differs, and `removed_resources` for
  resources the client holds (and still asks for) that are not in the snapshot.
- After a NACK, what the client holds of that response's resources is unknown (Envoy applies
  the valid part of an update): they are marked UNKNOWN, and the next response sends or
  removes each of them, so the client is exact again. A NACK of a response a newer one has
  superseded is recorded, and what it carried is sent once more at once: the newer
  response counted it as applied, and an ACK of it must not make the node look synced.
- Unsubscribing `*` forgets what the client held through the wildcard alone (it drops it).
- Subscribing to a name sends it, even if the client held it; a subscribed name that does
  not exist is answered in `removed_resources`. Unsubscribing an explicit name under a
  wildcard is answered with the resource (or its removal). A name unsubscribed is forgotten
  at once, even while a response carrying it is in flight.
- On (re)connect, `initial_resource_versions` says what the client holds: only what differs
  is sent, and nothing at all when everything is current.
- A client that holds nothing gets an answer even when there is nothing for it (an empty
  response), so its initial fetch completes instead of waiting for a timeout.
- A resource's version is the content hash of its bytes, the same on every replica.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from envoy.service.discovery.v3 import discovery_pb2

from controlplane import resources
from controlplane.caches import ByteBoundedCache, size_of_names
from controlplane.snapshot import TypeResources
from controlplane.xds import limits, wire
from controlplane.xds.stream import WILDCARD, Request, TypeState, XdsStream, shared_names

# The version of a resource whose state on the client is not known: never a content hash,
# so the next response sends the resource, or its removal.
UNKNOWN = ""
# Unacknowledged responses remembered per type; if a NACK names an older one, everything the
# client holds of the type is treated as unknown.
IN_FLIGHT_LIMIT = 16


class DeltaStream(XdsStream):
    protocol = "delta"

    __slots__ = ()

    def _acked_version(self, state: TypeState, request: Request) -> str:
        return state.sent_version or ""  # a delta ACK names no version: it accepts what we sent

    def _initial(self, state: TypeState, request: Request) -> None:
        assert isinstance(request, discovery_pb2.DeltaDiscoveryRequest)
        if request.initial_resource_versions:
            self.started_empty = False
        if not state.subscribed:
            state.held = limits.versions(request.initial_resource_versions, request.ByteSize())
            state.held_key = None

    def _subscribe(self, state: TypeState, request: Request) -> None:
        assert isinstance(request, discovery_pb2.DeltaDiscoveryRequest)
        if state.subscribed and not (
            request.resource_names_subscribe or request.resource_names_unsubscribe
        ):
            return  # an ACK or NACK: the subscription stays as it is
        size = request.ByteSize()
        subscribe = limits.names("resource_names_subscribe", request.resource_names_subscribe, size)
        unsubscribe = limits.names(
            "resource_names_unsubscribe", request.resource_names_unsubscribe, size
        )
        first = not state.subscribed
        if first:
            state.subscribed = True
            if not subscribe and resources.resource_type(state.type_url).wildcard:
                state.wildcard = state.legacy_wildcard = True
        if not subscribe and not unsubscribe:
            return
        if subscribe:
            state.legacy_wildcard = False  # a legacy wildcard stays a wildcard, with names
        if WILDCARD in subscribe:
            state.wildcard = True
        dropped_wildcard = WILDCARD in unsubscribe and state.wildcard
        if dropped_wildcard:
            state.wildcard = False
        held = state.held  # copied before a change: it may be shared with other streams
        # On the first request, what the client reported holding (initial_resource_versions)
        # stays held; later, subscribing to a name it holds sends it again.
        resubscribed = frozenset() if first else held.keys() & subscribe - {WILDCARD}
        new = frozenset(name for name in subscribe if name not in held) - {WILDCARD}
        # The wildcard still covers an explicit name unsubscribed: say where it stands.
        answer = {n for n in unsubscribe if state.wildcard and n in state.names}
        forget = (unsubscribe - answer - {WILDCARD}) & held.keys()
        if dropped_wildcard:  # the client drops what it held through the wildcard alone
            forget |= held.keys() - ((state.names | subscribe) - unsubscribe)
        if forget:
            _change_held(
                state,
                ("forgot", frozenset(forget)),
                lambda held: {n: v for n, v in held.items() if n not in forget},
            )
        _mark_unknown(state, resubscribed | answer)  # send it again
        if resubscribed or answer or forget:
            state.refresh = True
        if new or state.unanswered:
            state.unanswered = frozenset((state.unanswered | new) - unsubscribe)
            state.refresh = True
        state.names = _changed_names(state.names, subscribe, unsubscribe)

    def _nacked(self, state: TypeState, nonce: str, error: str, now: float) -> None:
        sent = state.in_flight.get(nonce) if state.in_flight else None
        version, touched = sent or ("", tuple(state.held))
        # (an unremembered response: nothing the client holds of the type is certain)
        _mark_unknown(state, touched)
        if nonce != state.latest_nonce:
            # A newer response was sent counting these as applied, and the client may ACK
            # it: record the rejection, and send what it carried once more, so that the
            # client either takes it or NACKs the latest response.
            state.nacked_version, state.nack_error, state.nacked_at = version, error, now
            state.refresh = True

    def _reports_held(self, request: Request) -> bool:
        assert isinstance(request, discovery_pb2.DeltaDiscoveryRequest)
        return bool(request.initial_resource_versions)

    def _refresh(self, state: TypeState, names: frozenset[str]) -> None:
        if _mark_held_unknown(state, names):
            state.refresh = True

    def _encode(
        self, state: TypeState, current: TypeResources, names: frozenset[str] | None, nonce: str
    ) -> tuple[bytes, tuple[str, ...]] | None:
        held_key = state.held_key
        if held_key is None and not state.held:
            held_key = _HOLDS_NOTHING  # a first answer: the same for every such client
        key = (held_key, current.version, names) if held_key is not None else None
        transition = _TRANSITIONS.get(key) if key is not None else None
        if transition is None:
            transition = _transition(state.held, current, names)
            if key is not None:
                _TRANSITIONS.put(key, transition, _size_of(transition))
        entries, changed, removed, held, exact = transition
        if state.unanswered:  # subscribed names that do not exist: say so
            absent = state.unanswered.difference(current.by_name)
            removed = tuple(sorted(absent.union(removed)))
            state.unanswered = frozenset()
        first_answer = state.sent_version is None and not state.held
        if not entries and not removed and not first_answer:
            return None  # the client holds exactly this (e.g. a reconnect): send nothing
        state.held = held
        state.held_key = (current.version, names) if exact else None
        if state.in_flight is None:
            state.in_flight = {}
        elif len(state.in_flight) >= IN_FLIGHT_LIMIT:
            state.in_flight.pop(next(iter(state.in_flight)))
        state.in_flight[nonce] = (current.version, changed + removed)
        payload = wire.delta_response(current.version, state.type_url, nonce, entries, removed)
        return payload, removed


def _changed_names(
    names: frozenset[str], subscribe: frozenset[str], unsubscribe: frozenset[str]
) -> frozenset[str]:
    """The (shared) names subscribed after a change. A fleet makes the same change to the
    same shared set: each is worked out once, and looked up without hashing the set again."""
    key = (names, subscribe, unsubscribe)
    changed = _CHANGED_NAMES.get(key)
    if changed is None:
        changed = names | subscribe if subscribe else names
        if unsubscribe or WILDCARD in changed:
            changed = changed - unsubscribe - {WILDCARD}
        # Counted whole: the sets may outlive the shared ones (stream.shared_names) here.
        size = sum(map(size_of_names, (names, subscribe, unsubscribe, changed)))
        changed = _CHANGED_NAMES.put(key, shared_names(changed), size + _KEY_OVERHEAD_BYTES)
    return changed


def _mark_unknown(state: TypeState, names: Iterable[str]) -> bool:
    """What the client holds of `names` is unknown: the next response sends or removes each
    (`held` is replaced, never changed in place: it may be shared with other streams).
    True if there were any."""
    unknown = dict.fromkeys(names, UNKNOWN)
    if not unknown:
        return False
    return _change_held(state, ("unknown", frozenset(unknown)), lambda held: {**held, **unknown})


def _mark_held_unknown(state: TypeState, names: frozenset[str]) -> bool:
    """`_mark_unknown` for those of `names` the client holds. `names` is one set shared by
    every client making the same move (stream.added_or_changed_references), so it names the
    change as it is, without a set made per stream."""

    def apply(held: Mapping[str, str]) -> dict[str, str] | None:
        unknown = dict.fromkeys((name for name in names if name in held), UNKNOWN)
        return {**held, **unknown} if unknown else None

    return _change_held(state, ("unknown if held", names), apply)


def _change_held(
    state: TypeState,
    change: tuple[str, frozenset[str]],
    apply: Callable[[Mapping[str, str]], dict[str, str] | None],
) -> bool:
    """Replace what the client holds by `apply(held)`, unless that is None (no change); True
    if it changed. When `held` was known exactly (a held key), the outcome is too, and is
    the same for every client making the same change (a fleet taking a push re-creates the
    same clusters, drops the same names): so it is worked out once and shared, and so is
    the diff to the next version."""
    if state.held_key is None:
        held = apply(state.held)
        if held is None:
            return False
        state.held = held
        return True
    held_version, held_names = state.held_key
    key = ((held_version, change), held_names)
    found = _CHANGED_HELD.get(key)
    if found is None:
        held = apply(state.held)
        # (counted whole: the key keeps the change's names; an unchanged entry takes room)
        size = size_of_names(held or state.held) + size_of_names(change[1]) + _KEY_OVERHEAD_BYTES
        found = _CHANGED_HELD.put(key, (held,), size)
    held = found[0]
    if held is None:
        return False
    state.held, state.held_key = held, key
    return True


# entries to send, the names they carry, names removed, what the client then holds, and
# whether that is exactly the version's resources for those names (so the transition can
# key a shared cache)
Transition = tuple[bytes, tuple[str, ...], tuple[str, ...], dict[str, str], bool]

# Diffs shared by every client moving between the same two versions with the same names:
# a fleet moves together, so each is computed once, not once per stream. What the client
# then holds is shared too: a client's `held` of 5,000 clusters is ~150 KiB.
_TRANSITIONS: ByteBoundedCache[tuple[object, str, frozenset[str] | None], Transition] = (
    ByteBoundedCache(
        "delta_diffs",
        64 << 20,
        lambda key: (key[2], key[0][1] if key[0] else None),  # type: ignore[index]
    )
)


# What clients hold after a change to what they held exactly (_change_held; None inside:
# unchanged), by held key.
_CHANGED_HELD: ByteBoundedCache[
    tuple[object, frozenset[str] | None], tuple[dict[str, str] | None]
] = ByteBoundedCache("delta_changed_held", 16 << 20, lambda key: (key[1],))

# Subscriptions after a change (_changed_names), by (names before, subscribed, unsubscribed).
_CHANGED_NAMES: ByteBoundedCache[
    tuple[frozenset[str], frozenset[str], frozenset[str]], frozenset[str]
] = ByteBoundedCache("delta_changed_names", 16 << 20, lambda key: (key[0],))
_KEY_OVERHEAD_BYTES = 100  # a key's tuple and its entry, beyond the sets counted

_HOLDS_NOTHING = ("", None)  # the held_key of a client that holds nothing (no version is "")


def _size_of(transition: Transition) -> int:
    entries, changed, removed, held, _ = transition
    return len(entries) + size_of_names(changed) + size_of_names(removed) + size_of_names(held)


def _transition(
    held: Mapping[str, str], current: TypeResources, names: frozenset[str] | None
) -> Transition:
    wanted = {
        name: resource.version
        for name, resource in current.by_name.items()
        if names is None or name in names
    }
    changed = tuple(sorted(name for name, version in wanted.items() if held.get(name) != version))
    removed = tuple(
        sorted(name for name in held if name not in wanted and (names is None or name in names))
    )
    gone = set(removed)
    now_held = {name: v for name, v in held.items() if name not in gone} | {
        name: wanted[name] for name in changed
    }
    entries = b"".join(current.by_name[name].delta_entry for name in changed)
    return entries, changed, removed, now_held, len(now_held) == len(wanted)
