"""Encoding DiscoveryResponses from pre-serialized resource entries, once per distinct response.

A protobuf message may be encoded as the concatenation of its fields in any order, so a
response is a small header (version, type, nonce) followed by resource entries that each
snapshot serialized once. No resource is re-encoded per stream, and a response is encoded
once however many streams send it: streams number their nonces alike (stream.py), so a push
to a fleet is the same bytes on every stream, and writing it copies nothing per stream here.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from controlplane.caches import ByteBoundedCache

CONTROL_PLANE_ID = "xdscp"
_CONTROL_PLANE = base_pb2.ControlPlane(identifier=CONTROL_PLANE_ID)

# Keyed by everything the bytes are made of (the entries by value: snapshots share them).
# A response stays while there is room: a push's stragglers and the nodes that connect in
# the same epoch are sent the same bytes. What is left when the fleet moves on is at most
# RESPONSES_KEPT_BYTES each; a response over an eighth of it is encoded per stream instead.
RESPONSES_KEPT_BYTES = 32 << 20
_SOTW: ByteBoundedCache[tuple[str, str, str, bytes], bytes] = ByteBoundedCache(
    "sotw_responses", RESPONSES_KEPT_BYTES
)
_DELTA: ByteBoundedCache[tuple[str, str, str, bytes, tuple[str, ...]], bytes] = ByteBoundedCache(
    "delta_responses", RESPONSES_KEPT_BYTES
)


def sotw_response(version: str, type_url: str, nonce: str, entries: bytes) -> bytes:
    key = (version, type_url, nonce, entries)
    payload = _SOTW.get(key)
    if payload is None:
        header = discovery_pb2.DiscoveryResponse(
            version_info=version, type_url=type_url, nonce=nonce, control_plane=_CONTROL_PLANE
        )
        payload = _SOTW.put(
            key, header.SerializeToString() + entries, _size(entries, version, type_url, nonce)
        )
    return payload


def delta_response(
    system_version: str, type_url: str, nonce: str, entries: bytes, removed: tuple[str, ...]
) -> bytes:
    key = (system_version, type_url, nonce, entries, removed)
    payload = _DELTA.get(key)
    if payload is None:
        header = discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=system_version,
            type_url=type_url,
            nonce=nonce,
            removed_resources=removed,
            control_plane=_CONTROL_PLANE,
        )
        size = _size(entries, system_version, type_url, nonce, *removed)
        payload = _DELTA.put(key, header.SerializeToString() + entries, size)
    return payload


def _size(entries: bytes, *texts: str) -> int:
    """A response and its key: the entries twice, as the key may be all that keeps them."""
    return 2 * len(entries) + 2 * sum(map(len, texts)) + 200
