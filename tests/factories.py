"""Small Envoy resources for unit tests: an EDS cluster, its endpoints, a listener, routes,
secrets, and a real key pair (from certgen)."""

from __future__ import annotations

from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2

from controlplane import certgen, resources
from controlplane.snapshot import Snapshot

ADS = config_source_pb2.ConfigSource(
    ads=config_source_pb2.AggregatedConfigSource(),
    resource_api_version=config_source_pb2.ApiVersion.V3,
)


def _any(message) -> any_pb2.Any:  # type: ignore[no-untyped-def]
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def cluster(name: str) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS)
    c.connect_timeout.FromSeconds(1)
    c.eds_cluster_config.eds_config.CopyFrom(ADS)
    return c


def endpoints(name: str, port: int = 8080) -> endpoint_pb2.ClusterLoadAssignment:
    address = address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)
    )
    lb = endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(address=address)
    )
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[lb])],
    )


def listener(name: str, route_name: str, port: int = 10000) -> listener_pb2.Listener:
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=name,
        rds=hcm_pb2.Rds(route_config_name=route_name, config_source=ADS),
        http_filters=[hcm_pb2.HttpFilter(name="router", typed_config=_any(router_pb2.Router()))],
    )
    return listener_pb2.Listener(
        name=name,
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)
        ),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[listener_components_pb2.Filter(name="hcm", typed_config=_any(manager))]
            )
        ],
    )


def routes(name: str, cluster_name: str, prefix: str = "/") -> route_pb2.RouteConfiguration:
    route = route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(prefix=prefix),
        route=route_components_pb2.RouteAction(cluster=cluster_name),
    )
    host = route_components_pb2.VirtualHost(name="all", domains=["*"], routes=[route])
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=[host])


def edge_snapshot(
    backend_port: int = 8080, prefix: str = "/", listener_port: int = 10000
) -> Snapshot:
    """Two clusters, their endpoints, one listener and its routes."""
    return Snapshot.from_messages(
        [
            (resources.CLUSTER, cluster("web")),
            (resources.CLUSTER, cluster("api")),
            (resources.ENDPOINT, endpoints("web", backend_port)),
            (resources.ENDPOINT, endpoints("api", 9090)),
            (resources.LISTENER, listener("http", "routes", listener_port)),
            (resources.ROUTE, routes("routes", "web", prefix)),
        ]
    )


def static_cluster(name: str, port: int = 8080) -> cluster_pb2.Cluster:
    """A cluster that names its one endpoint itself: nothing else in a snapshot goes with it."""
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.STATIC)
    c.connect_timeout.FromSeconds(1)
    c.load_assignment.CopyFrom(endpoints(name, port))
    return c


def tls_cluster(name: str, secret_name: str) -> cluster_pb2.Cluster:
    """A cluster whose upstream TLS certificate is the named secret, over ADS."""
    from envoy.config.core.v3 import base_pb2
    from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2

    context = tls_pb2.UpstreamTlsContext(
        common_tls_context=tls_pb2.CommonTlsContext(
            tls_certificate_sds_secret_configs=[
                secret_pb2.SdsSecretConfig(name=secret_name, sds_config=ADS)
            ]
        )
    )
    c = cluster(name)
    c.transport_socket.CopyFrom(base_pb2.TransportSocket(name="tls", typed_config=_any(context)))
    return c


def secret(name: str, key_text: str = "not a real key") -> object:
    from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

    s = secret_pb2.Secret(name=name)
    s.tls_certificate.private_key.inline_string = key_text
    return s


@dataclass(frozen=True)
class KeyPair:
    """A real EC private key and a certificate for it, both PEM text."""

    private_key: str
    certificate: str


def key_pair(common_name: str = "example.test") -> KeyPair:
    issued = certgen.issue(certgen.new_ca(), common_name)
    return KeyPair(private_key=issued.key_pem.decode(), certificate=issued.cert_pem.decode())
