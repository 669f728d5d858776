import pytest

from controlplane import resources
from controlplane.snapshot import ConsistencyError, Snapshot
from tests import factories


def test_same_config_gives_same_version_regardless_of_order() -> None:
    items = [
        (resources.CLUSTER, factories.cluster("web")),
        (resources.ENDPOINT, factories.endpoints("web")),
    ]
    assert Snapshot.from_messages(items).version == Snapshot.from_messages(reversed(items)).version


def test_version_is_a_pinned_content_hash() -> None:
    # Pinned: the version must not depend on the machine, the process or the hash seed.
    # b0c2b29e110510c6 was computed once; a change here changes every stored version.
    assert factories.edge_snapshot().version == "b0c2b29e110510c6"
    assert factories.edge_snapshot(prefix="/v2").version != "b0c2b29e110510c6"


def test_each_type_has_its_own_version() -> None:
    before = factories.edge_snapshot()
    after = factories.edge_snapshot(prefix="/v2")  # only the routes differ
    changed = {url for url, v in before.type_versions().items() if after.type_versions()[url] != v}
    assert changed == {resources.ROUTE}


def test_resources_are_serialized_once_and_round_trip() -> None:
    snapshot = factories.edge_snapshot()
    web = snapshot.resources(resources.CLUSTER)["web"]
    assert web.message() == factories.cluster("web")
    rebuilt = Snapshot.from_serialized(
        (r.type_url, r.name, r.body) for r in snapshot.all_resources()
    )
    assert rebuilt.version == snapshot.version
    assert (
        rebuilt.of_type(resources.CLUSTER).wire_entries
        == snapshot.of_type(resources.CLUSTER).wire_entries
    )


def test_dangling_references_are_each_named() -> None:
    with pytest.raises(ConsistencyError) as caught:
        Snapshot.from_messages(
            [
                (resources.CLUSTER, factories.cluster("web")),
                (resources.LISTENER, factories.listener("http", "missing_routes")),
            ]
        )
    text = str(caught.value)
    assert 'cluster "web" references endpoint "web"' in text
    assert 'listener "http" references route "missing_routes"' in text
    assert len(caught.value.dangling) == 2


def test_missing_sds_secret_is_dangling() -> None:
    from envoy.config.core.v3 import base_pb2
    from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2

    context = tls_pb2.UpstreamTlsContext(
        common_tls_context=tls_pb2.CommonTlsContext(
            tls_certificate_sds_secret_configs=[
                secret_pb2.SdsSecretConfig(name="edge-cert", sds_config=factories.ADS)
            ]
        )
    )
    cluster = factories.cluster("web")
    cluster.transport_socket.CopyFrom(
        base_pb2.TransportSocket(name="tls", typed_config=factories._any(context))
    )
    with pytest.raises(ConsistencyError, match='references secret "edge-cert"'):
        Snapshot.from_messages(
            [(resources.CLUSTER, cluster), (resources.ENDPOINT, factories.endpoints("web"))]
        )


def _with_secrets() -> Snapshot:
    return Snapshot.from_messages(
        [
            (resources.CLUSTER, factories.tls_cluster("web", "web-client-cert")),
            (resources.ENDPOINT, factories.endpoints("web")),
            (resources.SECRET, factories.secret("web-client-cert")),
            (resources.SECRET, factories.secret("unused-key")),
        ]
    )


def test_a_node_of_the_owning_group_is_served_only_the_secrets_its_config_references() -> None:
    snapshot = _with_secrets()
    served = snapshot.as_served(owner=True)
    assert set(served.resources(resources.SECRET)) == {"web-client-cert"}
    assert served.version == snapshot.version  # the same snapshot, as status and gate see it
    assert served.resources(resources.CLUSTER) == snapshot.resources(resources.CLUSTER)
    assert snapshot.as_served(owner=True) is served  # built once


def test_a_node_falling_back_on_another_groups_config_is_served_no_secrets() -> None:
    served = _with_secrets().as_served(owner=False)
    assert dict(served.resources(resources.SECRET)) == {}
    assert set(served.resources(resources.CLUSTER)) == {"web"}


def test_a_snapshot_without_secrets_is_served_as_it_is() -> None:
    snapshot = factories.edge_snapshot()
    assert snapshot.as_served(owner=False) is snapshot
