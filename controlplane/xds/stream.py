"""xDS streams as sans-IO state machines: the rules both protocols share, and state of the world.

One stream object per gRPC stream (ADS, or one per-type service). The shell feeds it requests
(`receive`) and snapshot changes (`on_snapshot`); each call returns the responses to send, as
bytes already encoded. It never touches a socket or a clock it was not given.

`XdsStream` holds every rule state-of-the-world and delta share; `SotwStream` (here) and
`delta.DeltaStream` add only how a protocol reads subscriptions and encodes responses.

Rules kept here and nowhere else:
- The Node comes from the first request; a stream without one is refused.
- Every response has its own nonce. A request whose nonce is not the type's latest is stale
  and ignored. A request with no nonce is an initial request (or a resubscription).
- A request answering the latest nonce is a NACK when `error_detail` is set, else an ACK.
- One response per type is in flight at a time; a new snapshot waits for the ACK or NACK.
- ADS order: a type is held while an earlier type (CDS, EDS, LDS, RDS, SDS) awaits its ACK,
  so clusters and endpoints are in place before the listeners and routes that use them.
- A version the client NACKed is not sent again unless what it asks for changes.
- A client that already holds the current version (reconnect) is not sent it again.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import json_format

from controlplane import resources
from controlplane.resources import ADS_ORDER
from controlplane.snapshot import Snapshot, TypeResources
from controlplane.store import DEFAULT_GROUP
from controlplane.xds import wire

WILDCARD = "*"


class RemoteProtocolError(Exception):
    """The client broke the protocol. The shell ends the stream with INVALID_ARGUMENT.

    `reason` is a short fixed word for metrics; the message is for humans.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class RequestKind(enum.Enum):
    INITIAL = "initial"  # no nonce: first request for a type, or a resubscription
    STALE = "stale"  # answers a response that is no longer the latest: ignored
    ACK = "ack"
    NACK = "nack"
    UPDATE = "update"  # names the latest nonce, already ACKed: only the subscription changes


@dataclass(frozen=True)
class Send:
    """Action: write `payload` (an encoded DiscoveryResponse) to the stream."""

    type_url: str
    version: str
    nonce: str
    resource_names: frozenset[str] | None  # None: every resource of the type
    payload: bytes
    removed: tuple[str, ...] = ()  # delta: names the client is told to drop


@dataclass(slots=True)
class TypeState:
    """What one stream asked for and was sent, for one type. Read by the fleet view."""

    type_url: str
    subscribed: bool = False
    names: frozenset[str] = frozenset()
    wildcard: bool = False
    latest_nonce: str | None = None
    awaiting_ack: bool = False
    sent_version: str | None = None
    sent_names: frozenset[str] | None = None
    sent_at: float | None = None
    acked_version: str | None = None
    acked_at: float | None = None
    nacked_version: str | None = None
    nack_error: str | None = None
    nacked_at: float | None = None
    stale_requests: int = 0
    # Delta only: what the client holds (name -> resource version), and what it will hold
    # once it ACKs the response in flight.
    client_versions: dict[str, str] = field(default_factory=dict)
    pending_versions: dict[str, str] | None = None
    # (type version, names) when client_versions is exactly that version's resources for
    # those names: then the diff to the next version is the same for every such client.
    held_key: tuple[str, frozenset[str] | None] | None = None
    pending_key: tuple[str, frozenset[str] | None] | None = None
    legacy_wildcard: bool = False


@dataclass(frozen=True)
class NodeInfo:
    id: str
    group: str
    build_version: str
    user_agent: str
    metadata: dict[str, object] = field(default_factory=dict)

    @classmethod
    def from_node(cls, node: base_pb2.Node) -> NodeInfo:
        build = node.user_agent_version
        if node.HasField("user_agent_build_version"):
            v = node.user_agent_build_version.version
            build = f"{v.major_number}.{v.minor_number}.{v.patch}"
        return cls(
            id=node.id,
            group=node.cluster or DEFAULT_GROUP,
            build_version=build,
            user_agent=node.user_agent_name,
            metadata=json_format.MessageToDict(node.metadata),
        )


Request = discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest


_SHARED_NAME_SETS: dict[frozenset[str], frozenset[str]] = {}
_SHARED_NAME_SETS_LIMIT = 4096


def shared_names(names: frozenset[str]) -> frozenset[str]:
    """One object for each distinct subscription: a fleet asks for the same names over and
    over, and thousands of streams need not each keep their own copy."""
    shared = _SHARED_NAME_SETS.get(names)
    if shared is None:
        if len(_SHARED_NAME_SETS) >= _SHARED_NAME_SETS_LIMIT:
            _SHARED_NAME_SETS.clear()
        shared = _SHARED_NAME_SETS[names] = names
    return shared


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


class XdsStream:
    """The protocol core both state-of-the-world and delta streams run on."""

    protocol = ""

    def __init__(
        self,
        stream_id: int,
        resolve: Callable[[NodeInfo], Snapshot | None],
        *,
        types: Iterable[str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`resolve(node)` gives the snapshot a node should hold; `types` limits the stream
        to those type URLs (a per-type service), default every type (ADS)."""
        self.stream_id = stream_id
        self._resolve = resolve
        self._clock = clock
        allowed = tuple(types) if types is not None else tuple(t.type_url for t in ADS_ORDER)
        self._allowed = allowed
        self.types: dict[str, TypeState] = {}  # created on a type's first request
        self.node: NodeInfo | None = None
        self.snapshot: Snapshot | None = None
        self.assigned_at: float | None = None  # when `snapshot` became this stream's
        self.started_at = clock()
        # Fresh: the client held nothing when it connected (a new Envoy, not a reconnect).
        self.started_empty = True
        self._nonce_counter = 0

    def receive(self, request: Request) -> tuple[RequestKind, TypeState, list[Send]]:
        """Take one request; return what it was, the type's state after it, and what to send."""
        self._learn_node(request)
        state = self._state_for(request.type_url)
        kind = classify(state, request)
        now = self._clock()
        if kind is RequestKind.STALE:
            state.stale_requests += 1
            return kind, state, []
        if kind is RequestKind.NACK:
            state.awaiting_ack = False
            state.nacked_version = state.sent_version
            state.nack_error = request.error_detail.message
            state.nacked_at = now
            state.pending_versions = None
        elif kind is RequestKind.ACK:
            state.awaiting_ack = False
            state.acked_version = self._acked_version(state, request)
            state.acked_at = now
            if state.pending_versions is not None:
                state.client_versions, state.pending_versions = state.pending_versions, None
                state.held_key, state.pending_key = state.pending_key, None
        if kind is RequestKind.INITIAL:
            self._initial(state, request)
        self._subscribe(state, request)
        if kind is RequestKind.INITIAL:
            self._adopt(state, request)
        # An ACK or NACK may release types held behind this one in ADS order.
        return kind, state, self._send_due()

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

    def _encode(
        self, state: TypeState, current: TypeResources, names: frozenset[str] | None, nonce: str
    ) -> tuple[bytes, tuple[str, ...]] | None:
        """The response bringing the client to `current` and the names it removes, or None
        if the client holds `current` already."""
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------

    def on_snapshot(self, snapshot: Snapshot | None) -> list[Send]:
        self._assign(snapshot)
        return self._send_due()

    def _assign(self, snapshot: Snapshot | None) -> None:
        if snapshot != self.snapshot:
            self.snapshot = snapshot
            self.assigned_at = self._clock()

    @property
    def group(self) -> str | None:
        return self.node.group if self.node else None

    def synced(self) -> bool:
        """ACKed every type it subscribed to, on the snapshot it is assigned."""
        if self.snapshot is None:
            return False
        subscribed = [s for s in self.types.values() if s.subscribed]
        return bool(subscribed) and all(
            not s.awaiting_ack and s.acked_version == self.snapshot.of_type(s.type_url).version
            for s in subscribed
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
            self.node = NodeInfo.from_node(request.node)
            self._assign(self._resolve(self.node))
        elif request.HasField("node") and request.node.id and request.node.id != self.node.id:
            raise RemoteProtocolError(
                f"node id changed mid-stream from {self.node.id!r} to {request.node.id!r}",
                "node_changed",
            )

    def _state_for(self, type_url: str) -> TypeState:
        if not type_url and len(self._allowed) == 1:
            type_url = self._allowed[0]
        state = self.types.get(type_url)
        if state is None:
            if type_url not in self._allowed:
                if type_url in resources.BY_URL:
                    raise RemoteProtocolError(
                        f"type_url {type_url!r} is not served on this stream", "wrong_service"
                    )
                raise RemoteProtocolError(f"unsupported type_url {type_url!r}", "unsupported_type")
            state = self.types[type_url] = TypeState(type_url)
        return state

    @staticmethod
    def _names_to_send(state: TypeState) -> frozenset[str] | None:
        return None if state.wildcard else state.names

    def _send_due(self) -> list[Send]:
        sends: list[Send] = []
        for resource_type in ADS_ORDER:
            state = self.types.get(resource_type.type_url)
            if state is None or not state.subscribed:
                continue
            if state.awaiting_ack:
                break  # later types wait for this one: make before break
            send = self._send_if_changed(state)
            if send is not None:
                sends.append(send)
                break
        return sends

    def _send_if_changed(self, state: TypeState) -> Send | None:
        if self.snapshot is None:
            return None
        current = self.snapshot.of_type(state.type_url)
        names = self._names_to_send(state)
        if state.sent_version == current.version and state.sent_names == names:
            return None  # holds it already, or NACKed exactly this: never resend in a loop
        nonce = str(self._nonce_counter + 1)
        encoded = self._encode(state, current, names, nonce)
        if encoded is None:  # nothing differs for this client: it holds what is current
            state.sent_version = state.acked_version = current.version
            state.sent_names = names
            state.acked_at = self._clock()
            return None
        self._nonce_counter += 1
        state.latest_nonce = nonce
        state.awaiting_ack = True
        state.sent_version = current.version
        state.sent_names = names
        state.sent_at = self._clock()
        payload, removed = encoded
        return Send(
            state.type_url,
            current.version,
            nonce,
            names,
            payload,
            removed,
        )


class SotwStream(XdsStream):
    """State of the world: every response carries every resource the client asked for."""

    protocol = "sotw"

    def _acked_version(self, state: TypeState, request: Request) -> str:
        assert isinstance(request, discovery_pb2.DiscoveryRequest)
        return request.version_info

    def _initial(self, state: TypeState, request: Request) -> None:
        assert isinstance(request, discovery_pb2.DiscoveryRequest)
        if request.version_info:
            self.started_empty = False

    def _subscribe(self, state: TypeState, request: Request) -> None:
        assert isinstance(request, discovery_pb2.DiscoveryRequest)
        names = frozenset(request.resource_names)
        state.subscribed = True
        state.wildcard = WILDCARD in names or (
            not names and resources.resource_type(state.type_url).wildcard
        )
        state.names = shared_names(names - {WILDCARD})

    def _adopt(self, state: TypeState, request: Request) -> None:
        """A reconnecting client reports the version it holds; if that is current, it is
        treated as sent and ACKed, so it is not pushed again."""
        assert isinstance(request, discovery_pb2.DiscoveryRequest)
        if not request.version_info or self.snapshot is None:
            return
        if self.snapshot.of_type(state.type_url).version == request.version_info:
            state.sent_version = state.acked_version = request.version_info
            state.sent_names = self._names_to_send(state)
            state.acked_at = self._clock()

    def _encode(
        self, state: TypeState, current: TypeResources, names: frozenset[str] | None, nonce: str
    ) -> tuple[bytes, tuple[str, ...]] | None:
        entries = current.entries_for(names)
        return wire.sotw_response(current.version, state.type_url, nonce, entries), ()
