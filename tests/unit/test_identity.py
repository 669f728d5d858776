import pytest

from controlplane.xds.identity import Certificate, IdentityRefused, grants

DOMAIN = "example.org"


def _certificate(*uris: str, dns: tuple[str, ...] = ()) -> Certificate:
    return Certificate(DOMAIN, uris, dns)


@pytest.mark.parametrize(
    ("san", "node_id", "group", "canary"),
    [
        ("spiffe://example.org/group/edge/node/edge-1", "edge-1", "edge", False),
        ("spiffe://example.org/group/edge/node/*", "edge-7", "edge", False),
        ("spiffe://example.org/group/*/node/edge-1", "edge-1", "web", False),
        ("spiffe://example.org/group/edge/canary/edge-c1", "edge-c1", "edge", True),
        ("spiffe://example.org/group/edge/canary/edge-c?", "edge-c2", "edge", True),
    ],
)
def test_a_spiffe_id_grants_the_node_id_and_group_it_names(san, node_id, group, canary) -> None:
    trust = _certificate(san).admit(node_id, group)
    assert trust.certified
    assert trust.canary is canary


def test_a_dns_name_grants_node_dot_group_dot_trust_domain() -> None:
    assert _certificate(dns=("edge-1.edge.example.org",)).admit("edge-1", "edge").certified
    assert _certificate(dns=("*.edge.example.org",)).admit("edge-9", "edge").certified
    with pytest.raises(IdentityRefused):
        _certificate(dns=("edge-1.edge.example.org",)).admit("edge-1", "web")


@pytest.mark.parametrize(
    ("node_id", "group"),
    [("edge-2", "edge"), ("edge-1", "web"), ("edge-1", "default")],
)
def test_a_claim_the_certificate_does_not_grant_is_refused(node_id, group) -> None:
    with pytest.raises(IdentityRefused) as refused:
        _certificate("spiffe://example.org/group/edge/node/edge-1").admit(node_id, group)
    assert refused.value.reason == "claim_mismatch"
    assert "spiffe://example.org/group/edge/node/edge-1" in str(refused.value)


@pytest.mark.parametrize(
    "san",
    [
        "spiffe://other.org/group/edge/node/edge-1",  # another trust domain
        "spiffe://example.org/ns/edge/sa/edge-1",  # another layout (istio's)
        "spiffe://example.org/group/edge/admin/edge-1",  # no such role
        "spiffe://example.org/group/edge/node/edge-1/extra",
        "spiffe://example.org/group//node/edge-1",
        "https://example.org/group/edge/node/edge-1",
    ],
)
def test_sans_of_other_forms_grant_nothing(san) -> None:
    with pytest.raises(IdentityRefused) as refused:
        _certificate(san).admit("edge-1", "edge")
    assert refused.value.reason == "no_identity"


def test_dns_names_of_other_shapes_grant_nothing() -> None:
    assert (
        grants(DOMAIN, (), ("edge.example.org", "a.b.edge.example.org", "x.edge.other.org")) == []
    )


def test_canary_needs_a_matching_canary_grant() -> None:
    certificate = _certificate(
        "spiffe://example.org/group/edge/node/*", "spiffe://example.org/group/edge/canary/c1"
    )
    assert certificate.admit("c1", "edge").canary
    assert not certificate.admit("c2", "edge").canary


def test_no_certificate_in_the_auth_context_means_none() -> None:
    assert Certificate.from_auth_context(DOMAIN, {}) is None
    assert Certificate.from_auth_context(DOMAIN, {"transport_security_type": [b"ssl"]}) is None
    context = {
        "x509_pem_cert": [b"PEM"],
        "peer_uri": [b"spiffe://example.org/group/edge/node/n1"],
        "peer_dns": [b"n1.edge.example.org"],
    }
    certificate = Certificate.from_auth_context(DOMAIN, context)
    assert certificate == Certificate(
        DOMAIN, ("spiffe://example.org/group/edge/node/n1",), ("n1.edge.example.org",)
    )
