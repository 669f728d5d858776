"""ScopedRouteConfiguration, VirtualHost, Runtime and TypedExtensionConfig: stored, referenced,
and served over both protocols; and the delta-versus-SotW bytes benchmark at a small size."""

from __future__ import annotations

import pytest
from envoy.config.core.v3 import base_pb2, config_source_pb2, extension_pb2
from envoy.config.route.v3 import route_components_pb2, scoped_route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.runtime.v3 import rtds_pb2
from google.protobuf import struct_pb2

from controlplane import resources
from controlplane.snapshot import ConsistencyError, Snapshot
from controlplane.xds.delta import DeltaStream
from controlplane.xds.stream import SotwStream
from tests import factories
from tests.bench import delta_bytes

NODE = base_pb2.Node(id="n1", cluster="edge")


def runtime(name: str) -> rtds_pb2.Runtime:
    layer = struct_pb2.Struct()
    layer.update({"health_check.min_interval": 5})
    return rtds_pb2.Runtime(name=name, layer=layer)


def test_scoped_route_must_name_an_existing_route_configuration() -> None:
    scope = scoped_route_pb2.ScopedRouteConfiguration(name="s1", route_configuration_name="routes")
    with pytest.raises(ConsistencyError, match='scoped-route "s1" references route "routes"'):
        Snapshot.from_messages([(resources.SCOPED_ROUTE, scope)])
    ok = Snapshot.from_messages(
        [
            (resources.SCOPED_ROUTE, scope),
            (resources.ROUTE, factories.routes("routes", "web")),
            (resources.CLUSTER, factories.cluster("web")),
            (resources.ENDPOINT, factories.endpoints("web")),
        ]
    )
    assert ok.counts()["scoped-route"] == 1


def test_a_filter_discovering_its_config_over_ads_needs_that_extension_config() -> None:
    listener = factories.listener("http", "routes")
    manager = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
    manager.http_filters.insert(
        0,
        hcm_pb2.HttpFilter(
            name="dynamic_lua",
            config_discovery=config_source_pb2.ExtensionConfigSource(
                config_source=factories.ADS,
                type_urls=["type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"],
            ),
        ),
    )
    listener.filter_chains[0].filters[0].typed_config.Pack(manager)
    base = [
        (resources.LISTENER, listener),
        (resources.ROUTE, factories.routes("routes", "web")),
        (resources.CLUSTER, factories.cluster("web")),
        (resources.ENDPOINT, factories.endpoints("web")),
    ]
    with pytest.raises(ConsistencyError, match='extension-config "dynamic_lua"'):
        Snapshot.from_messages(base)
    config = extension_pb2.TypedExtensionConfig(name="dynamic_lua")
    config.typed_config.Pack(router_pb2.Router())
    assert Snapshot.from_messages([*base, (resources.EXTENSION_CONFIG, config)])


def test_runtime_and_virtual_hosts_are_served_by_name_over_both_protocols() -> None:
    host = route_components_pb2.VirtualHost(
        name="routes/api.example.com", domains=["api.example.com"]
    )
    snapshot = Snapshot.from_messages(
        [
            (resources.RUNTIME, runtime("rtds_layer")),
            (resources.RUNTIME, runtime("other")),
            (resources.VIRTUAL_HOST, host),
        ]
    )
    sotw = SotwStream(1, lambda node: snapshot, types=[resources.RUNTIME])
    [sent] = sotw.receive(
        discovery_pb2.DiscoveryRequest(
            type_url=resources.RUNTIME, resource_names=["rtds_layer"], node=NODE
        )
    )[2]
    response = discovery_pb2.DiscoveryResponse.FromString(sent.payload)
    assert [rtds_pb2.Runtime.FromString(r.value).name for r in response.resources] == ["rtds_layer"]

    delta = DeltaStream(2, lambda node: snapshot, types=[resources.VIRTUAL_HOST])
    [sent] = delta.receive(
        discovery_pb2.DeltaDiscoveryRequest(
            type_url=resources.VIRTUAL_HOST,
            resource_names_subscribe=["routes/api.example.com"],
            node=NODE,
        )
    )[2]
    reply = discovery_pb2.DeltaDiscoveryResponse.FromString(sent.payload)
    assert [r.name for r in reply.resources] == ["routes/api.example.com"]


def test_delta_sends_a_small_fraction_of_the_bytes_when_one_cluster_changes() -> None:
    result = delta_bytes.measure(50)
    assert result.sotw_update == result.sotw_initial  # state of the world resends everything
    assert result.delta_update * 20 < result.sotw_update
