"""What one xDS request may ask of the server: stated limits, checked before any work.

A request is untrusted until checked. Each limit is a named constant here and nowhere
else. Counts and sizes are checked before anything is done with a request; the length of
each name as the names are read (`names`, `versions`), so they are read once. A request
over a limit is refused with a RemoteProtocolError (INVALID_ARGUMENT) whose
message names the limit, and whose reason (`limit_...`) labels the metric. gRPC itself
refuses a message over MAX_REQUEST_BYTES before it is parsed (RESOURCE_EXHAUSTED).
With these limits the work one request causes is linear in its size and small.

Texts that reach the log from a client (NACK messages, node ids, metadata) are clipped to
LOG_TEXT_CHARS, with the cut marked.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2

MAX_REQUEST_BYTES = 16 << 20  # a delta reconnect listing 100,000 resources is ~4 MiB
MAX_NAMES_PER_REQUEST = 50_000  # in each of: resource_names, subscribe, unsubscribe, initial;
# at the limit a request costs about 50 ms of the event loop here (2 cores)
MAX_NAME_BYTES = 4096  # one resource name (xdstp:// names are long, not this long)
MAX_NODE_FIELD_BYTES = 1024  # node.id and node.cluster
MAX_METADATA_BYTES = 64 << 10  # node.metadata, serialized
MAX_METADATA_DEPTH = 16  # structs and lists nested in node.metadata
MAX_ERROR_DETAIL_BYTES = 64 << 10  # a NACK's error_detail.message
LOG_TEXT_CHARS = 1024  # client text in one log line, and in `xdsctl status`


class RemoteProtocolError(Exception):
    """The client broke the protocol or a limit. The shell ends the stream with
    INVALID_ARGUMENT.

    `reason` is a short fixed word for metrics; the message is for humans.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def clip(text: str, limit: int = LOG_TEXT_CHARS) -> str:
    """`text`, cut to `limit` characters with the cut marked."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…[{len(text) - limit} more chars]"


def _refuse(what: str, count: int, limit: int, unit: str, reason: str) -> RemoteProtocolError:
    return RemoteProtocolError(
        f"{what}: {count:,} {unit}, over the limit of {limit:,} {unit}", f"limit_{reason}"
    )


def _check_count(what: str, names: object) -> None:
    count = len(names)  # type: ignore[arg-type]
    if count > MAX_NAMES_PER_REQUEST:
        raise _refuse(what, count, MAX_NAMES_PER_REQUEST, "names", "names")


def names(what: str, field: Iterable[str], request_bytes: int) -> frozenset[str]:
    """The names of a request field (already within MAX_NAMES_PER_REQUEST, see
    check_request), each refused if over MAX_NAME_BYTES. Read once: a request's names are
    turned into Python strings one time. `request_bytes`: the size of the request."""
    found = frozenset(field)
    _check_lengths(what, found, request_bytes)
    return found


def _check_lengths(what: str, names: Collection[str], request_bytes: int) -> None:
    if request_bytes <= MAX_NAME_BYTES:
        return  # no name is longer than the request that holds it
    if names and max(map(len, names)) > MAX_NAME_BYTES // 4:  # (a character is 1 to 4 bytes)
        for name in names:
            if (size := len(name.encode())) > MAX_NAME_BYTES:
                raise _refuse(f"{what}: a name", size, MAX_NAME_BYTES, "bytes", "name")


# A request this small reaches no count or size limit (each name or entry takes at least 2
# bytes): only the node it may carry, whose metadata can be too deep, is left to check.
_BELOW_EVERY_LIMIT_BYTES = min(MAX_NAME_BYTES, MAX_ERROR_DETAIL_BYTES, 2 * MAX_NAMES_PER_REQUEST)


def check_request(
    request: discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest,
    size: int | None = None,
) -> None:
    """Refuse a request over a limit, before anything is done with it. `size`: its encoded
    size, when the caller has it (most requests are small: then there is less to look at)."""
    if size is not None and size <= _BELOW_EVERY_LIMIT_BYTES and not request.HasField("node"):
        return
    if len(request.type_url) > MAX_NAME_BYTES:
        raise _refuse("type_url", len(request.type_url), MAX_NAME_BYTES, "chars", "name")
    if isinstance(request, discovery_pb2.DiscoveryRequest):
        _check_count("resource_names", request.resource_names)
    else:
        _check_count("resource_names_subscribe", request.resource_names_subscribe)
        _check_count("resource_names_unsubscribe", request.resource_names_unsubscribe)
        _check_count("initial_resource_versions", request.initial_resource_versions)
    if request.HasField("error_detail"):
        size = len(request.error_detail.message.encode())
        if size > MAX_ERROR_DETAIL_BYTES:
            raise _refuse(
                "error_detail.message", size, MAX_ERROR_DETAIL_BYTES, "bytes", "error_detail"
            )
    if request.HasField("node"):
        check_node(request.node)


def check_node(node: base_pb2.Node) -> None:
    for field in ("id", "cluster"):
        size = len(getattr(node, field).encode())
        if size > MAX_NODE_FIELD_BYTES:
            raise _refuse(f"node.{field}", size, MAX_NODE_FIELD_BYTES, "bytes", "node")
    if node.HasField("metadata"):
        size = node.metadata.ByteSize()
        if size > MAX_METADATA_BYTES:
            raise _refuse("node.metadata", size, MAX_METADATA_BYTES, "bytes", "metadata")
        _check_metadata_values(node.metadata)


def _check_metadata_values(metadata: struct_pb2.Struct) -> None:
    """Depth within MAX_METADATA_DEPTH, and only numbers JSON can carry (no NaN, Infinity)."""
    pending: list[tuple[struct_pb2.Value, int]] = [(value, 1) for value in metadata.fields.values()]
    while pending:
        value, depth = pending.pop()
        if depth > MAX_METADATA_DEPTH:
            raise _refuse("node.metadata", depth, MAX_METADATA_DEPTH, "levels deep", "metadata")
        kind = value.WhichOneof("kind")
        if kind == "number_value" and not _finite(value.number_value):
            raise RemoteProtocolError(
                f"node.metadata holds {value.number_value}, which JSON cannot carry",
                "bad_metadata",
            )
        if kind == "struct_value":
            pending += [(v, depth + 1) for v in value.struct_value.fields.values()]
        elif kind == "list_value":
            pending += [(v, depth + 1) for v in value.list_value.values]


def _finite(number: float) -> bool:
    return number - number == 0.0  # False for NaN and both infinities


def versions(field: Mapping[str, str], request_bytes: int) -> dict[str, str]:
    """A delta request's initial_resource_versions (within MAX_NAMES_PER_REQUEST), each
    name refused if over MAX_NAME_BYTES. `request_bytes`: the size of the request."""
    held = dict(field)
    _check_lengths("initial_resource_versions", held, request_bytes)
    return held
