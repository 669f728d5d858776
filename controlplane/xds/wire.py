"""Encoding DiscoveryResponses from pre-serialized resource entries.

A protobuf message may be encoded as the concatenation of its fields in any order, so a
response is a small per-stream header (version, type, nonce) followed by resource entries
that each snapshot serialized once. No resource is re-encoded per stream.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

CONTROL_PLANE_ID = "xdscp"
_CONTROL_PLANE = base_pb2.ControlPlane(identifier=CONTROL_PLANE_ID)


def sotw_response(version: str, type_url: str, nonce: str, entries: bytes) -> bytes:
    header = discovery_pb2.DiscoveryResponse(
        version_info=version, type_url=type_url, nonce=nonce, control_plane=_CONTROL_PLANE
    )
    return header.SerializeToString() + entries


def delta_response(
    system_version: str, type_url: str, nonce: str, entries: bytes, removed: list[str]
) -> bytes:
    header = discovery_pb2.DeltaDiscoveryResponse(
        system_version_info=system_version,
        type_url=type_url,
        nonce=nonce,
        removed_resources=removed,
        control_plane=_CONTROL_PLANE,
    )
    return header.SerializeToString() + entries
