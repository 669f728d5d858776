"""Delta (incremental) xDS on the shared protocol core (stream.XdsStream).

What delta adds to the shared rules:
- Subscriptions change by `resource_names_subscribe` / `_unsubscribe`. The first request of
  a wildcard-capable type with no names is the legacy wildcard, which ends once the client
  names resources without `*`; `*` subscribes or unsubscribes the wildcard explicitly.
- The stream tracks which version of each resource the client holds. A response carries
  only resources whose version differs, and `removed_resources` for resources the client
  holds (and still asks for) that left the snapshot. What the client holds changes only when
  it ACKs; a NACK leaves it as it was.
- On (re)connect, `initial_resource_versions` says what the client holds: only what differs
  is sent, and nothing at all when everything is current.
- A client that holds nothing gets an answer even when there is nothing for it (an empty
  response), so its initial fetch completes instead of waiting for a timeout.
- A resource's version is the content hash of its bytes, the same on every replica.
"""

from __future__ import annotations

from envoy.service.discovery.v3 import discovery_pb2

from controlplane import resources
from controlplane.snapshot import TypeResources
from controlplane.xds import wire
from controlplane.xds.stream import WILDCARD, Request, TypeState, XdsStream, shared_names


class DeltaStream(XdsStream):
    protocol = "delta"

    def _acked_version(self, state: TypeState, request: Request) -> str:
        return state.sent_version or ""  # a delta ACK names no version: it accepts what we sent

    def _initial(self, state: TypeState, request: Request) -> None:
        assert isinstance(request, discovery_pb2.DeltaDiscoveryRequest)
        if request.initial_resource_versions:
            self.started_empty = False
        if not state.subscribed:
            state.client_versions = dict(request.initial_resource_versions)
            state.held_key = None

    def _subscribe(self, state: TypeState, request: Request) -> None:
        assert isinstance(request, discovery_pb2.DeltaDiscoveryRequest)
        if state.subscribed and not (
            request.resource_names_subscribe or request.resource_names_unsubscribe
        ):
            return  # an ACK or NACK: the subscription stays as it is
        subscribe = set(request.resource_names_subscribe)
        unsubscribe = set(request.resource_names_unsubscribe)
        if not state.subscribed:
            state.subscribed = True
            if not subscribe and resources.resource_type(state.type_url).wildcard:
                state.wildcard = state.legacy_wildcard = True
        elif state.legacy_wildcard and subscribe:
            state.wildcard = state.legacy_wildcard = False
        if WILDCARD in subscribe:
            state.wildcard, state.legacy_wildcard = True, False
        if WILDCARD in unsubscribe:
            state.wildcard, state.legacy_wildcard = False, False
        state.names = shared_names(frozenset((state.names | subscribe) - unsubscribe - {WILDCARD}))
        # The client forgets what it no longer asks for, so a later resubscription sends it again.
        if unsubscribe & state.client_versions.keys():
            state.client_versions = {
                n: v for n, v in state.client_versions.items() if n not in unsubscribe
            }  # a new dict: client_versions may be shared with other streams
            state.held_key = None

    def _encode(
        self, state: TypeState, current: TypeResources, names: frozenset[str] | None, nonce: str
    ) -> tuple[bytes, tuple[str, ...]] | None:
        key = (state.held_key, current.version, names) if state.held_key is not None else None
        transition = _TRANSITIONS.get(key) if key is not None else None
        if transition is None:
            transition = _transition(state.client_versions, current, names)
            if key is not None:
                if len(_TRANSITIONS) >= _TRANSITIONS_LIMIT:
                    _TRANSITIONS.clear()
                _TRANSITIONS[key] = transition
        entries, removed, pending, exact = transition
        first_answer = state.sent_version is None and not state.client_versions
        if not entries and not removed and not first_answer:
            state.pending_versions = state.pending_key = None
            return None  # the client holds exactly this (e.g. a reconnect): send nothing
        state.pending_versions = pending
        state.pending_key = (current.version, names) if exact else None
        payload = wire.delta_response(
            current.version, state.type_url, nonce, entries, list(removed)
        )
        return payload, removed


# entries to send, names removed, what the client then holds, and whether that is exactly
# the version's resources for those names (so the transition can key a shared cache)
Transition = tuple[bytes, tuple[str, ...], dict[str, str], bool]

# Diffs shared by every client moving between the same two versions with the same names:
# a fleet moves together, so each is computed once, not once per stream.
_TRANSITIONS: dict[tuple[object, str, frozenset[str] | None], Transition] = {}
_TRANSITIONS_LIMIT = 1024


def _transition(
    held: dict[str, str], current: TypeResources, names: frozenset[str] | None
) -> Transition:
    wanted = {
        name: resource.version
        for name, resource in current.by_name.items()
        if names is None or name in names
    }
    changed = sorted(name for name, version in wanted.items() if held.get(name) != version)
    removed = tuple(
        sorted(name for name in held if name not in wanted and (names is None or name in names))
    )
    pending = {name: v for name, v in held.items() if name not in removed} | {
        name: wanted[name] for name in changed
    }
    entries = b"".join(current.by_name[name].delta_entry for name in changed)
    return entries, removed, pending, len(pending) == len(wanted)
