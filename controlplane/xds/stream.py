"""xDS streams as sans-IO state machines: the rules both protocols share, and state of the world.

One stream object per gRPC stream (ADS, or one per-type service). The shell feeds it requests
(`receive`), snapshot changes (`on_snapshot`) and the passing of time (`on_tick`, at
`next_deadline()`); each call returns the responses to send, as bytes already encoded. It
never touches a socket, and reads time only from the clock it was given.

`XdsStream` holds every rule state-of-the-world and delta share; `SotwStream` (here) and
`delta.DeltaStream` add only how a protocol reads subscriptions and encodes responses. What
waits on what is the table in `ordering.py`.

Rules kept here and nowhere else:
- Every request is checked against the limits in limits.py before anything else.
- The Node comes from the first request; a stream without one is refused. With a client
  certificate, the node may claim only what the certificate grants (identity.py).
- Every response has its own nonce, never used before on the stream: "<epoch>.<n>", the
  n-th response of the stream in the epoch of assignments (assignments.py) it was sent in.
  Streams that do the same thing in an epoch (a fleet taking a push) number their responses
  alike, so they send the same bytes (wire.py encodes each distinct response once). A
  request naming a nonce that is not its type's latest is stale: it is neither an ACK nor a
  NACK, but the subscription it carries still counts.
  A request with no nonce is an initial request (or a resubscription).
- A request answering the latest nonce is a NACK when `error_detail` is set, else an ACK.
- A newer response supersedes an unACKed one: a type is never held behind its own ACK, so a
  new snapshot, an abort or a rollback reaches the client whatever is in flight.
- A type waits for the ACK of the types `ordering.WAITS_FOR` names, for at most the warming
  timeout; after a response that added or changed clusters, their endpoints are sent again.
- A version the client NACKed is not sent again unless the snapshot or the subscription
  changes: never in a loop.
- An unknown type URL on ADS is ignored (reported to the shell), not a reason to end the
  stream; on a per-type service, another type is a protocol error.
- A node that has not completed its first sync within the first-sync timeout is judged
  then, once: stuck (until it completes it) or not, by first_sync.py's rule.

State of the world (SotwStream):
- The first request for a wildcard-capable type with no names is the legacy wildcard. It
  lasts while requests name nothing; once names are given, only `*` asks for everything,
  and an empty list then means nothing.
- A reconnecting client that reports the version it holds is sent nothing if that is
  current, only on wildcard subscriptions: for named ones the version says nothing about
  which names the client holds.
- A named subscription with no names is answered with nothing: Envoy does not ACK an empty
  response to it, so the type counts as held at once.
"""

from __future__ import annotations

import enum
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import NamedTuple

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import json_format

from controlplane import resources
from controlplane.caches import ByteBoundedCache, size_of_names
from controlplane.resources import ADS_ORDER
from controlplane.snapshot import Resource, Snapshot, TypeResources
from controlplane.store import DEFAULT_GROUP
from controlplane.xds import first_sync, limits, ordering, wire
from controlplane.xds.identity import CLAIMED, Certificate, Trust
from controlplane.xds.limits import RemoteProtocolError

WILDCARD = "*"
_ADS_TYPE_URLS = tuple(t.type_url for t in ADS_ORDER)


class RequestKind(enum.Enum):
    INITIAL = "initial"  # no nonce: first request for a type, or a resubscription
    STALE = "stale"  # answers a response that is no longer the latest: not an ACK or NACK
    ACK = "ack"
    NACK = "nack"
    UPDATE = "update"  # names the latest nonce, already ACKed: only the subscription changes
    UNSUPPORTED = "unsupported"  # a type this server does not serve: ignored


class Send(NamedTuple):
    """Action: write `payload` (an encoded DiscoveryResponse) to the stream. (A tuple: a
    push makes one per node and type.)"""

    type_url: str
    version: str
    nonce: str
    resource_names: frozenset[str] | None  # None: every resource of the type
    payload: bytes
    removed: tuple[str, ...] = ()  # delta: names the client is told to drop


NOTHING_HELD: Mapping[str, str] = MappingProxyType({})  # one empty `held` for every stream


@dataclass(slots=True)
class TypeState:
    """What one stream asked for and was sent, for one type. Read by the fleet view."""

    type_url: str
    subscribed: bool = False
    names: frozenset[str] = frozenset()
    wildcard: bool = False
    # The first request named nothing, and no request has named anything since.
    legacy_wildcard: bool = False
    latest_nonce: str | None = None
    awaiting_ack: bool = False
    sent_version: str | None = None
    sent_names: frozenset[str] | None = None
    sent_resources: TypeResources | None = None
    sent_at: float | None = None  # the latest response of this type
    # Send again even if the version is unchanged: what the client holds must be refreshed.
    refresh: bool = False
    # Resources just sent reference names of this type the client will now ask for: wait
    # for that request until then (monotonic; ordering.SUBSCRIPTION_GRACE_SECONDS).
    subscription_due_by: float | None = None
    acked_version: str | None = None
    acked_at: float | None = None
    nacked_version: str | None = None
    nack_error: str | None = None
    nacked_at: float | None = None
    stale_requests: int = 0
    # Delta only: what the client holds (name -> resource version; UNKNOWN after a NACK),
    # counting every response sent as applied unless it is NACKed. Replaced, never changed
    # in place: streams share it.
    held: Mapping[str, str] = field(default_factory=lambda: NOTHING_HELD)
    # (type version, names) when `held` is exactly that version's resources for those
    # names, ((type version, names it lost track of), names) after delta._mark_unknown:
    # then the diff to the next version is the same for every such client.
    held_key: tuple[object, frozenset[str] | None] | None = None
    # Delta only: names just subscribed that the client does not hold: the next response
    # carries each, or names it in removed_resources if it does not exist.
    unanswered: frozenset[str] = frozenset()
    # Delta only: nonce -> (version, the names it added, changed or removed) of each
    # unACKed response; None while there is none.
    in_flight: dict[str, tuple[str, tuple[str, ...]]] | None = None
    # Since when (monotonic) a response of this type has been awaiting its ACK (not reset
    # when a newer one supersedes it): what the warming timeout counts from.
    unacked_since: float | None = None
    # Subscribed on the client's behalf (ordering.IMPLIES_SUBSCRIPTION), not asked for yet.
    implied: bool = False


NO_METADATA: Mapping[str, object] = MappingProxyType({})


@dataclass(frozen=True)
class NodeInfo:
    id: str
    group: str
    build_version: str
    user_agent: str
    metadata: Mapping[str, object] = field(default_factory=lambda: NO_METADATA)
    trust: Trust = CLAIMED

    @classmethod
    def from_node(cls, node: base_pb2.Node) -> NodeInfo:
        build = node.user_agent_version
        if node.HasField("user_agent_build_version"):
            v = node.user_agent_build_version.version
            build = f"{v.major_number}.{v.minor_number}.{v.patch}"
        # A fleet's nodes share their group, build and user agent: one string each.
        return cls(
            id=node.id,
            group=sys.intern(node.cluster or DEFAULT_GROUP),
            build_version=sys.intern(build),
            user_agent=sys.intern(node.user_agent_name),
            metadata=json_format.MessageToDict(node.metadata)
            if node.metadata.fields
            else NO_METADATA,
        )


Request = discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest


# A fleet asks for the same names over and over: one object for each distinct subscription.
_NAME_SETS: ByteBoundedCache[frozenset[str], frozenset[str]] = ByteBoundedCache(
    "name_sets", 32 << 20, lambda names: (names,)
)


# The same again, by the list as a request carries it: a fleet's ACKs repeat their
# subscription (an Envoy's EDS ACK names every cluster), and a tuple of the names costs less
# to look up than a set costs to build and compare. (Checked against the limits once, when
# first seen.)
_NAME_LISTS: ByteBoundedCache[tuple[str, ...], frozenset[str]] = ByteBoundedCache(
    "name_lists", 16 << 20
)


def requested_names(
    what: str, field: Sequence[str], request_bytes: Callable[[], int]
) -> frozenset[str]:
    """The names of a request field, checked against the limits, as one shared set (see
    limits.names; `request_bytes()`: the request's size)."""
    listed = tuple(field)
    names = _NAME_LISTS.get(listed)
    if names is None:
        names = limits.names(what, listed, request_bytes())
        _NAME_LISTS.put(listed, names, size_of_names(listed) + 8 * len(listed))
    return shared_names(names)  # (the one object of that set now, whatever this cache kept)


def names_to_send(state: TypeState) -> frozenset[str] | None:
    """The resources of its type a subscription gets: None for every one (wildcard), else
    the names it asked for (those the snapshot has)."""
    return None if state.wildcard else state.names


def shared_names(names: frozenset[str]) -> frozenset[str]:
    """One object for each distinct subscription: a fleet asks for the same names over and
    over, and thousands of streams need not each keep their own copy."""
    shared = _NAME_SETS.get(names)
    if shared is None:
        shared = _NAME_SETS.put(names, names, size_of_names(names))
    return shared


def _holds_sent(state: TypeState, current: TypeResources, names: frozenset[str] | None) -> bool:
    """What was last sent of the type is `current` for `names` (shared name sets are
    compared by identity first: equal sets of thousands of names cost a walk)."""
    sent = state.sent_names
    return state.sent_version == current.version and (sent is names or sent == names)


def classify(state: TypeState, request: Request) -> RequestKind:
    if not request.response_nonce:
        return RequestKind.INITIAL
    if request.response_nonce != state.latest_nonce:
        return RequestKind.STALE
    if request.HasField("error_detail"):
        return RequestKind.NACK
    if not state.awaiting_ack:
        return RequestKind.UPDATE
    return RequestKind.ACK


# What a move between two versions adds or changes, and what a set of resources references:
# the same for every client, so computed once.
_CHANGED_REFERENCES: ByteBoundedCache[tuple[str, str, str], frozenset[str]] = ByteBoundedCache(
    "changed_references", 8 << 20
)
_REFERENCES: ByteBoundedCache[tuple[str, frozenset[str] | None, str], frozenset[str]] = (
    ByteBoundedCache("references", 16 << 20, lambda key: (key[1],))
)


def added_or_changed_references(
    previous: TypeResources, current: TypeResources, to_type: str
) -> frozenset[str]:
    """Names of `to_type` referenced by the resources that `current` adds or changes over
    `previous`. The same for every client making that move, so computed once per move."""
    key = (previous.version, current.version, to_type)
    names = _CHANGED_REFERENCES.get(key)
    if names is None:
        names = _referenced(
            (
                resource
                for name, resource in current.by_name.items()
                if (old := previous.by_name.get(name)) is None or old.version != resource.version
            ),
            to_type,
        )
        _CHANGED_REFERENCES.put(key, names, size_of_names(names))
    return names


def references(
    current: TypeResources, names: frozenset[str] | None, to_type: str
) -> frozenset[str]:
    """Names of `to_type` that the named resources of `current` (all when None) reference:
    what a client holding them asks for. Computed once per version and names."""
    key = (current.version, names, to_type)
    found = _REFERENCES.get(key)
    if found is None:
        found = _referenced(
            (r for name, r in current.by_name.items() if names is None or name in names), to_type
        )
        _REFERENCES.put(key, found, size_of_names(found) + size_of_names(names))
    return found


_SUBSCRIPTION_CHANGES: ByteBoundedCache[
    tuple[frozenset[str], frozenset[str], frozenset[str]], bool
] = ByteBoundedCache("subscription_changes", 8 << 20, lambda key: (key[2],))


def changes_subscription(
    before: frozenset[str], after: frozenset[str], subscribed: frozenset[str]
) -> bool:
    """A client subscribed to `subscribed` that held resources referencing `before` and now
    those referencing `after` will subscribe to some name or drop one. The same for every
    client of a push (the sets are shared ones), so worked out once."""
    key = (before, after, subscribed)
    changes = _SUBSCRIPTION_CHANGES.get(key)
    if changes is None:
        changes = bool(after - subscribed or (before - after) & subscribed)
        # (sized as if it held the sets alone: it may be what keeps them)
        _SUBSCRIPTION_CHANGES.put(key, changes, size_of_names(before) + size_of_names(after))
    return changes


def _referenced(among: Iterable[Resource], to_type: str) -> frozenset[str]:
    return frozenset(
        name for resource in among for type_url, name in resource.references if type_url == to_type
    )


class XdsStream:
    """The protocol core both state-of-the-world and delta streams run on."""

    protocol = ""
    # A fleet holds thousands of these: no per-instance dict.
    __slots__ = (
        "_ads",
        "_allowed",
        "_certificate",
        "_clock",
        "_epoch",
        "_first_sync_due",
        "_first_sync_timeout",
        "_monotonic",
        "_nonce_epoch",
        "_nonces_in_epoch",
        "_resolve",
        "_warming_timeout",
        "assigned_at",
        "first_synced_at",
        "node",
        "snapshot",
        "started_at",
        "started_empty",
        "stream_id",
        "stuck_since",
        "types",
    )

    def __init__(
        self,
        stream_id: int,
        resolve: Callable[[NodeInfo], Snapshot | None],
        *,
        types: Iterable[str] | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        warming_timeout: float = ordering.DEFAULT_WARMING_TIMEOUT_SECONDS,
        first_sync_timeout: float = first_sync.DEFAULT_FIRST_SYNC_TIMEOUT_SECONDS,
        certificate: Certificate | None = None,
        epoch: Callable[[], int] = lambda: 0,
    ) -> None:
        """`resolve(node)` gives the snapshot a node should hold, `epoch()` how many times
        what nodes should hold has changed (it numbers the nonces); `types` limits the stream
        to those type URLs (a per-type service), default every type (ADS); types wait for a
        CDS ACK at most `warming_timeout` seconds; the first sync is judged
        `first_sync_timeout` seconds after it starts (first_sync.py). `certificate` is the
        client's, when it showed one: it decides what the node may claim. `clock` stamps what the status shows;
        deadlines are kept on `monotonic`, which a wall-clock step cannot move."""
        self.stream_id = stream_id
        self._resolve = resolve
        self._clock = clock
        self._monotonic = monotonic
        self._warming_timeout = warming_timeout
        self._first_sync_timeout = first_sync_timeout
        self._certificate = certificate
        self._ads = types is None
        self._allowed = tuple(types) if types is not None else _ADS_TYPE_URLS
        self.types: dict[str, TypeState] = {}  # created on a type's first request
        self.node: NodeInfo | None = None
        self.snapshot: Snapshot | None = None
        self.assigned_at: float | None = None  # when `snapshot` became this stream's
        self.started_at = clock()
        # Fresh: the client held nothing when it connected (a new Envoy, not a reconnect).
        self.started_empty = True
        self.first_synced_at: float | None = None  # when it ACKed every type it is served
        self.stuck_since: float | None = None  # when its first sync ran out of time
        # When (monotonic) the first sync is judged; None once judged, or once complete.
        self._first_sync_due: float | None = monotonic() + first_sync_timeout
        self._epoch = epoch
        self._nonce_epoch = -1
        self._nonces_in_epoch = 0

    def receive(
        self, request: Request, size: int | None = None
    ) -> tuple[RequestKind, TypeState, list[Send]]:
        """Take one request (`size`: its encoded size, if known); return what it was, the
        type's state after it, and what to send."""
        limits.check_request(request, size)
        self._learn_node(request)
        state = self._state_for(request.type_url)
        if state is None:
            return RequestKind.UNSUPPORTED, TypeState(request.type_url), []
        if state.implied:
            # The client's own first request for a type subscribed on its behalf: what it
            # says it holds now counts, whatever it did with what it was sent before.
            state = self.types[state.type_url] = TypeState(state.type_url)
            kind = RequestKind.INITIAL
        else:
            kind = classify(state, request)
        now = self._clock()
        if kind is RequestKind.STALE:
            state.stale_requests += 1
            if request.HasField("error_detail"):
                error = limits.clip(request.error_detail.message)
                self._nacked(state, request.response_nonce, error, now)
        elif kind is RequestKind.NACK:
            state.awaiting_ack = False
            state.unacked_since = None
            state.nacked_version = state.sent_version
            if state.acked_version == state.nacked_version:
                state.acked_version = None  # it rejected (part of) what it had accepted
            state.nack_error = limits.clip(request.error_detail.message)
            state.nacked_at = now
            self._nacked(state, request.response_nonce, state.nack_error, now)
        elif kind is RequestKind.ACK:
            state.awaiting_ack = False
            state.unacked_since = None
            state.acked_version = self._acked_version(state, request)
            state.acked_at = now
            state.in_flight = None
        elif kind is RequestKind.INITIAL:
            self._initial(state, request)
            self._imply_paused_subscription(state.type_url, request)
        self._subscribe(state, request)
        state.subscription_due_by = None  # the client has spoken since what it must ask for
        if kind is RequestKind.INITIAL:
            self._adopt(state, request)
        # An ACK may release types held behind this one; a subscription change may be due.
        sends = self._send_due()
        self.check_first_sync()
        return kind, state, sends

    # -- what each protocol defines ---------------------------------------------------------

    def _acked_version(self, state: TypeState, request: Request) -> str:
        raise NotImplementedError

    def _initial(self, state: TypeState, request: Request) -> None:
        """Learn what a client that (re)connects says it already holds."""
        raise NotImplementedError

    def _subscribe(self, state: TypeState, request: Request) -> None:
        raise NotImplementedError

    def _adopt(self, state: TypeState, request: Request) -> None:
        """After subscribing: record that the client already holds what is current."""

    def _imply_paused_subscription(self, type_url: str, request: Request) -> None:
        """An Envoy on ADS that reconnects and asks for `type_url` before the type it always
        asks for first has that type paused (see ordering.IMPLIES_SUBSCRIPTION): subscribe
        it as Envoy would, so what it holds of that type is tracked, shown and can be fixed.
        (A fresh Envoy may ask for endpoints first too, for an EDS cluster in its bootstrap:
        it holds nothing, and is left to ask for clusters itself.)"""
        implied = ordering.IMPLIES_SUBSCRIPTION.get(type_url)
        if (
            implied is None
            or not self._ads
            or implied in self.types
            or self.node is None
            or self.node.user_agent != "envoy"
            or not self._reports_held(request)
        ):
            return
        state = self.types[implied] = TypeState(implied)
        state.subscribed = state.wildcard = state.legacy_wildcard = state.implied = True

    def _nacked(self, state: TypeState, nonce: str, error: str, now: float) -> None:
        """The response with `nonce` was NACKed (possibly after a newer one was sent: then
        the NACK is not recorded above, and the newer response settles what it carried)."""

    def _refresh(self, state: TypeState, names: frozenset[str]) -> None:
        """Make the next response of `state`'s type carry `names` again."""
        raise NotImplementedError

    def _reports_held(self, request: Request) -> bool:
        """The request says the client holds resources of its type (a reconnect)."""
        raise NotImplementedError

    def _encode(
        self, state: TypeState, current: TypeResources, names: frozenset[str] | None, nonce: str
    ) -> tuple[bytes, tuple[str, ...]] | None:
        """The response bringing the client to `current` and the names it removes, or None
        if the client holds `current` already."""
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------

    def on_snapshot(self, snapshot: Snapshot | None) -> list[Send]:
        self._assign(snapshot)
        sends = self._send_due()
        self.check_first_sync()
        return sends

    def on_tick(self) -> list[Send]:
        """Time passed (the shell calls this at `next_deadline()`): send what stopped waiting,
        and mark a first sync that ran out of time."""
        sends = self._send_due()
        self.check_first_sync()
        return sends

    def on_written(self, type_url: str) -> bool:
        """The shell finished writing a response of `type_url`. A subscription change that
        response makes due is waited for from now (ordering.SUBSCRIPTION_GRACE_SECONDS), not
        from when it was built: the client asks only once it has the response, and a large
        one queued behind a fleet's worth of others can take longer than the grace to leave.
        True if that moved a deadline.
        """
        dependent = self._dependent(type_url)
        if dependent is None or dependent.subscription_due_by is None:
            return False
        due_by = self._monotonic() + ordering.SUBSCRIPTION_GRACE_SECONDS
        dependent.subscription_due_by = max(dependent.subscription_due_by, due_by)
        return True

    def next_deadline(self) -> float | None:
        """When (on the monotonic clock) a type held back is released anyway, or the first
        sync runs out of time, if either is due."""
        soonest = self._first_sync_due
        if not self._may_hold_back():
            return soonest  # (after almost every ACK)
        now = self._monotonic()
        for state in self.types.values():
            if state.subscribed and (held := self._held_until(state, now)) is not None:
                soonest = held if soonest is None else min(soonest, held)
        return soonest

    @property
    def stuck(self) -> bool:
        """Did not complete its first sync in time (first_sync.py), and has not since."""
        return self.stuck_since is not None and self.first_synced_at is None

    def first_sync_missing(self) -> tuple[str, ...]:
        """What its first sync still lacks, e.g. "never asked for LDS"; empty once done."""
        if self.first_synced_at is not None or self.snapshot is None:
            return ()
        return first_sync.missing(self.types, self._first_sync_expected(self.snapshot))

    def _first_sync_expected(self, snapshot: Snapshot) -> tuple[str, ...]:
        return first_sync.expected_types(
            (url for url, s in self.types.items() if s.subscribed),
            snapshot,
            envoy_on_ads=self._ads and self.node is not None and self.node.user_agent == "envoy",
        )

    def check_first_sync(self) -> None:
        """Mark a first sync done, or run out of time. Part of every event; the shell also
        calls it alone when time passes while it cannot send (a write is in progress), and
        leaves what stopped waiting to `on_tick`."""
        if self.first_synced_at is not None:
            return
        due = self._first_sync_due is not None and self._monotonic() >= self._first_sync_due
        if self.snapshot is None:
            if due:
                self._first_sync_due = None  # nothing to sync: judged once a snapshot comes
            return
        expected = self._first_sync_expected(self.snapshot)
        if not first_sync.missing(self.types, expected):
            self.first_synced_at = self._clock()
            self._first_sync_due = None
        elif due:
            self._first_sync_due = None
            if first_sync.stuck(self.started_empty, self.types, expected):
                self.stuck_since = self._clock()

    def _assign(self, snapshot: Snapshot | None) -> None:
        if snapshot != self.snapshot:
            if self.snapshot is None and self.first_synced_at is None and self.node is not None:
                # Nothing was there to sync: the first sync's time starts now.
                self._first_sync_due = self._monotonic() + self._first_sync_timeout
            self.snapshot = snapshot
            self.assigned_at = self._clock()

    @property
    def group(self) -> str | None:
        return self.node.group if self.node else None

    def synced(self) -> bool:
        """ACKed every type it subscribed to, on the snapshot it is assigned."""
        snapshot = self.snapshot
        if snapshot is None:
            return False
        subscribed = False
        for state in self.types.values():
            if not state.subscribed:
                continue
            if (
                state.awaiting_ack
                or state.acked_version != snapshot.of_type(state.type_url).version
            ):
                return False
            subscribed = True
        return subscribed

    def warming(self) -> bool:
        """Sent resources the client ACKs only once they warm, and it has not ACKed yet."""
        return any(
            s.awaiting_ack for url, s in self.types.items() if url in ordering.WARMS_BEFORE_ACK
        )

    def rejection(self) -> str | None:
        """Envoy's error text if it NACKed a type of the snapshot it is assigned."""
        if self.snapshot is None:
            return None
        for state in self.types.values():
            current = self.snapshot.of_type(state.type_url).version
            if state.nacked_version == current and state.acked_version != current:
                return state.nack_error or "NACK without error text"
        return None

    def _learn_node(self, request: Request) -> None:
        if self.node is None:
            if not request.HasField("node") or not request.node.id:
                raise RemoteProtocolError(
                    "the first request of a stream must carry a Node with an id", "no_node"
                )
            node = NodeInfo.from_node(request.node)
            if self._certificate is not None:
                node = replace(node, trust=self._certificate.admit(node.id, node.group))
            self.node = node
            self._assign(self._resolve(self.node))
        elif request.HasField("node") and request.node.id and request.node.id != self.node.id:
            raise RemoteProtocolError(
                f"node id changed mid-stream from {self.node.id!r} to {request.node.id!r}",
                "node_changed",
            )

    def _state_for(self, type_url: str) -> TypeState | None:
        """The type's state, created on its first request; None for a type ADS ignores."""
        if not type_url and len(self._allowed) == 1:
            type_url = self._allowed[0]
        state = self.types.get(type_url)
        if state is None:
            if type_url not in self._allowed:
                if self._ads:
                    return None
                if type_url in resources.BY_URL:
                    raise RemoteProtocolError(
                        f"type_url {type_url!r} is not served on this stream", "wrong_service"
                    )
                raise RemoteProtocolError(f"unsupported type_url {type_url!r}", "unsupported_type")
            state = self.types[type_url] = TypeState(type_url)
        return state

    def _may_hold_back(self) -> bool:
        """Whether `_held_until` can give a time for any type: only a subscription the client
        is yet to change, or an unACKed type others wait for, holds one back. (Cheaper than
        asking it for each type, which needs the time.)"""
        return any(
            state.subscription_due_by is not None
            or (state.unacked_since is not None and state.type_url in ordering.HOLD_OTHERS_BACK)
            for state in self.types.values()
        )

    def _held_until(self, state: TypeState, now: float) -> float | None:
        """When `state`'s type stops waiting for the types ordering.WAITS_FOR names, or None
        if it is not waiting."""
        due_by = state.subscription_due_by
        latest = due_by if due_by is not None and due_by > now else None
        for blocker_url in ordering.blockers(state.type_url):
            blocker = self.types.get(blocker_url)
            if blocker is None or blocker.unacked_since is None:
                continue
            deadline = blocker.unacked_since + self._warming_timeout
            if deadline > now and (latest is None or deadline > latest):
                latest = deadline
        return latest

    def _send_due(self) -> list[Send]:
        sends: list[Send] = []
        snapshot = self.snapshot
        if snapshot is None:
            return sends
        times: tuple[float, float] | None = None  # (now, tick), read once something is due
        for type_url in _ADS_TYPE_URLS:
            state = self.types.get(type_url)
            if state is None or not state.subscribed:
                continue
            current = snapshot.of_type(type_url)
            names = names_to_send(state)
            if not state.refresh and _holds_sent(state, current, names):
                continue  # holds it already, or NACKed exactly this: never resend in a loop
            if times is None:
                times = (self._clock(), self._monotonic())
            if self._held_until(state, times[1]):
                continue
            send = self._send(state, current, names, *times)
            if send is not None:
                sends.append(send)
        return sends

    def _send(
        self,
        state: TypeState,
        current: TypeResources,
        names: frozenset[str] | None,
        now: float,
        tick: float,
    ) -> Send | None:
        """Bring the client to `current` of `names`. `now` stamps what the status shows;
        `tick` (monotonic) starts deadlines."""
        state.refresh = False
        epoch = self._epoch()
        sent_in_epoch = self._nonces_in_epoch if epoch == self._nonce_epoch else 0
        nonce = sys.intern(f"{epoch}.{sent_in_epoch + 1}")  # one object fleet-wide
        previous = state.sent_resources
        encoded = self._encode(state, current, names, nonce)
        state.sent_version = current.version
        state.sent_names = names
        state.sent_resources = current
        if encoded is None:  # nothing differs for this client: it holds what is current
            if not state.awaiting_ack or names == frozenset():  # (or asks for nothing)
                state.awaiting_ack = False
                state.unacked_since = None
                state.acked_version = current.version
                state.acked_at = now
            return None
        self._nonce_epoch, self._nonces_in_epoch = epoch, sent_in_epoch + 1
        state.latest_nonce = nonce
        if not state.awaiting_ack:
            state.unacked_since = tick
        state.awaiting_ack = True
        state.sent_at = now
        self._refresh_dependents(state.type_url, previous, current, tick)
        payload, removed = encoded
        return Send(state.type_url, current.version, nonce, names, payload, removed)

    def _dependent(self, type_url: str) -> TypeState | None:
        """The state of the type whose names a response of `type_url` decides (EDS for CDS,
        RDS for LDS: ordering.SUBSCRIBES_AFTER), if the client has it."""
        dependent_url = ordering.SUBSCRIBES_AFTER.get(type_url)
        return self.types.get(dependent_url) if dependent_url else None

    def _refresh_dependents(
        self, type_url: str, previous: TypeResources | None, current: TypeResources, tick: float
    ) -> None:
        """Resources added or changed by this response get what they need to warm again;
        names the client does not ask for yet, it will ask for at once: wait for that."""
        dependent = self._dependent(type_url)
        if previous is None or dependent is None or not dependent.subscribed:
            return  # the client asks for what its new resources need when it first gets them
        if type_url in ordering.RECREATED_ON_CHANGE:
            names = added_or_changed_references(previous, current, dependent.type_url)
            if names:
                self._refresh(dependent, names)
        if dependent.wildcard:
            return
        sent_names = names_to_send(self.types[type_url])
        before = references(previous, sent_names, dependent.type_url)
        after = references(current, sent_names, dependent.type_url)
        if changes_subscription(before, after, dependent.names):
            dependent.subscription_due_by = tick + ordering.SUBSCRIPTION_GRACE_SECONDS


class SotwStream(XdsStream):
    """State of the world: every response carries every resource the client asked for."""

    protocol = "sotw"
    __slots__ = ()

    def _acked_version(self, state: TypeState, request: Request) -> str:
        assert isinstance(request, discovery_pb2.DiscoveryRequest)
        version = request.version_info
        return state.sent_version if version == state.sent_version else version  # (shared)

    def _initial(self, state: TypeState, request: Request) -> None:
        assert isinstance(request, discovery_pb2.DiscoveryRequest)
        if request.version_info:
            self.started_empty = False

    def _subscribe(self, state: TypeState, request: Request) -> None:
        assert isinstance(request, discovery_pb2.DiscoveryRequest)
        names = requested_names("resource_names", request.resource_names, request.ByteSize)
        if not state.subscribed:
            state.subscribed = True
            state.legacy_wildcard = not names and resources.resource_type(state.type_url).wildcard
        elif names:
            state.legacy_wildcard = False
        asks_for_all = WILDCARD in names
        state.wildcard = state.legacy_wildcard or asks_for_all
        state.names = shared_names(names - {WILDCARD}) if asks_for_all else names  # (shared)

    def _adopt(self, state: TypeState, request: Request) -> None:
        """A reconnecting client reports the version it holds; on a wildcard subscription,
        if that is current, it is treated as sent and ACKed, so it is not pushed again."""
        assert isinstance(request, discovery_pb2.DiscoveryRequest)
        if not request.version_info or self.snapshot is None or not state.wildcard:
            return
        current = self.snapshot.of_type(state.type_url)
        if current.version == request.version_info:
            state.sent_version = state.acked_version = request.version_info
            state.sent_names = None
            state.sent_resources = current
            state.acked_at = self._clock()

    def _refresh(self, state: TypeState, names: frozenset[str]) -> None:
        if state.wildcard or not names.isdisjoint(state.names):
            state.refresh = True

    def _reports_held(self, request: Request) -> bool:
        assert isinstance(request, discovery_pb2.DiscoveryRequest)
        return bool(request.version_info)

    def _encode(
        self, state: TypeState, current: TypeResources, names: frozenset[str] | None, nonce: str
    ) -> tuple[bytes, tuple[str, ...]] | None:
        if names == frozenset():
            return None  # asks for nothing: Envoy does not ACK an empty response to that
        entries = current.entries_for(names)
        return wire.sotw_response(current.version, state.type_url, nonce, entries), ()
