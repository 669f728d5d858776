"""examples/config loads with the config loader and holds the edge setup the docs describe."""

from __future__ import annotations

from pathlib import Path

from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from controlplane import resources
from controlplane.config import load_directory

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "config"
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def by_type() -> dict[str, list[str]]:
    names: dict[str, list[str]] = {}
    for resource in load_directory(EXAMPLES):
        names.setdefault(resource.type_url, []).append(resource.name)
    return names


def test_examples_load_with_expected_names() -> None:
    assert by_type() == {
        resources.CLUSTER: ["web", "api", "static", "ssh_bastion"],
        resources.ENDPOINT: ["web", "api", "static", "ssh_bastion"],
        resources.LISTENER: ["edge_http", "edge_http_ipv6", "edge_ssh"],
        resources.ROUTE: ["edge_routes"],
    }


def test_example_references_resolve_within_the_examples() -> None:
    loaded = load_directory(EXAMPLES)
    present = {(r.type_url, r.name) for r in loaded}
    wanted = {ref for r in loaded for ref in resources.references(r.message)}
    assert wanted
    assert wanted <= present


def test_http_clusters_idle_out_before_the_backend_keepalive() -> None:
    clusters = [r.message for r in load_directory(EXAMPLES) if r.type_url == resources.CLUSTER]
    http = [c for c in clusters if HTTP_OPTIONS in c.typed_extension_protocol_options]
    assert {c.name for c in http} == {"web", "api", "static"}
    for cluster in http:
        options = http_protocol_options_pb2.HttpProtocolOptions()
        assert cluster.typed_extension_protocol_options[HTTP_OPTIONS].Unpack(options)
        idle = options.common_http_protocol_options.idle_timeout.ToTimedelta()
        backend = cluster.metadata.filter_metadata["xdscp.backend"]
        keepalive = backend.fields["keepalive_timeout"].string_value
        assert keepalive.endswith("s")
        assert idle.total_seconds() < float(keepalive[:-1]), cluster.name
