"""A minimal ADS client that behaves like an Envoy that accepts everything: it subscribes to
CDS and LDS and ACKs every response. For tests that need nodes but not traffic."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2

from controlplane.resources import CLUSTER, LISTENER

ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"


class AckingNode:
    def __init__(
        self,
        xds_port: int,
        node_id: str,
        group: str,
        metadata: dict[str, str] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """`credentials`: TLS to xdscp (default plaintext)."""
        self.acked: dict[str, str] = {}  # type URL -> version
        self._requests: queue.Queue[discovery_pb2.DiscoveryRequest | None] = queue.Queue()
        target = f"127.0.0.1:{xds_port}"
        self._channel = (
            grpc.secure_channel(target, credentials)
            if credentials is not None
            else grpc.insecure_channel(target)
        )
        node = base_pb2.Node(id=node_id, cluster=group)
        node.metadata.CopyFrom(
            struct_pb2.Struct(
                fields={k: struct_pb2.Value(string_value=v) for k, v in (metadata or {}).items()}
            )
        )
        self._requests.put(discovery_pb2.DiscoveryRequest(type_url=CLUSTER, node=node))
        self._requests.put(discovery_pb2.DiscoveryRequest(type_url=LISTENER))
        call = self._channel.stream_stream(
            ADS,
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
        )
        self._responses = call(self._iterate(), timeout=300)
        self._thread = threading.Thread(target=self._ack_forever, daemon=True)
        self._thread.start()

    def _iterate(self) -> Iterator[discovery_pb2.DiscoveryRequest]:
        while (request := self._requests.get()) is not None:
            yield request

    def _ack_forever(self) -> None:
        try:
            for response in self._responses:
                self.acked[response.type_url] = response.version_info
                self._requests.put(
                    discovery_pb2.DiscoveryRequest(
                        type_url=response.type_url,
                        version_info=response.version_info,
                        response_nonce=response.nonce,
                    )
                )
        except grpc.RpcError:
            pass  # closed

    def close(self) -> None:
        self._requests.put(None)
        self._responses.cancel()
        self._channel.close()
        self._thread.join(timeout=5)
