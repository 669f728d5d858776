"""Redaction of key material, on real Envoy messages: SDS secrets, and TLS contexts written
inline in clusters and listeners (inside Anys and TypedStructs), plus PEM blocks in text."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import json_format
from google.protobuf.message import Message

from controlplane import redaction, resources
from controlplane.redaction import REDACTED, REDACTED_PRIVATE_KEY
from controlplane.snapshot import Snapshot
from tests import factories

TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
KEYS = factories.key_pair()


def parse(type_url: str, fields: dict[str, Any]) -> Message:
    resources.load_all_descriptors()
    return json_format.ParseDict(fields, resources.message_class_for(type_url)())


def redacted(type_url: str, fields: dict[str, Any]) -> dict[str, Any]:
    message = parse(type_url, fields)
    redaction.redact(message)
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def tls_certificate(**extra: Any) -> dict[str, Any]:
    return {
        "certificate_chain": {"inline_string": KEYS.certificate},
        "private_key": {"inline_string": KEYS.private_key},
        **extra,
    }


def test_a_secrets_private_key_and_password_go_and_its_certificate_stays() -> None:
    secret = redacted(
        resources.SECRET,
        {
            "name": "edge",
            "tls_certificate": tls_certificate(password={"inline_bytes": "aHVudGVyMg=="}),
        },
    )
    certificate = secret["tls_certificate"]
    assert certificate["private_key"] == {"inline_string": REDACTED}
    assert certificate["password"] == {"inline_string": REDACTED}
    assert certificate["certificate_chain"] == {"inline_string": KEYS.certificate}
    assert secret["name"] == "edge"


def test_a_secret_named_by_file_or_environment_variable_is_kept() -> None:
    fields = {
        "name": "edge",
        "tls_certificate": {
            "certificate_chain": {"filename": "/etc/tls/edge.crt"},
            "private_key": {"filename": "/etc/tls/edge.key"},
            "password": {"environment_variable": "EDGE_KEY_PASSWORD"},
        },
    }
    message = parse(resources.SECRET, fields)
    assert redaction.redact(message) is False
    assert json_format.MessageToDict(message, preserving_proto_field_name=True) == fields


def test_every_kind_of_secret_material_in_a_secret() -> None:
    pkcs12 = redacted(
        resources.SECRET,
        {"name": "p", "tls_certificate": {"pkcs12": {"inline_bytes": "MIIKZQIBAzCCCi8="}}},
    )
    assert pkcs12["tls_certificate"]["pkcs12"] == {"inline_string": REDACTED}

    generic = redacted(
        resources.SECRET,
        {
            "name": "g",
            "generic_secret": {
                "secret": {"inline_string": "hmac-key"},
                "secrets": {"client_id": {"inline_string": "id"}, "file": {"filename": "/x"}},
            },
        },
    )["generic_secret"]
    assert generic["secret"] == {"inline_string": REDACTED}
    # Map keys are names, not secrets; a file name is where the secret is, not what it is.
    assert generic["secrets"] == {
        "client_id": {"inline_string": REDACTED},
        "file": {"filename": "/x"},
    }

    tickets = redacted(
        resources.SECRET,
        {
            "name": "t",
            "session_ticket_keys": {
                "keys": [{"inline_bytes": "a2V5MQ=="}, {"filename": "/etc/tickets/2"}]
            },
        },
    )
    assert tickets["session_ticket_keys"]["keys"] == [
        {"inline_string": REDACTED},
        {"filename": "/etc/tickets/2"},
    ]

    validation = {"trusted_ca": {"inline_string": KEYS.certificate}}
    ca = redacted(resources.SECRET, {"name": "ca", "validation_context": validation})
    assert ca["validation_context"] == validation  # a CA is public


def test_a_private_key_providers_config_is_hidden_whatever_its_type() -> None:
    provider = {
        "provider_name": "cryptomb",
        "typed_config": {
            "@type": "type.googleapis.com/google.protobuf.StringValue",
            "value": "pin",
        },
    }
    secret = redacted(
        resources.SECRET, {"name": "hsm", "tls_certificate": {"private_key_provider": provider}}
    )
    assert secret["tls_certificate"]["private_key_provider"] == {
        "provider_name": "cryptomb",
        "typed_config": {
            "@type": "type.googleapis.com/google.protobuf.StringValue",
            "value": REDACTED,
        },
    }


def upstream_tls_cluster() -> dict[str, Any]:
    return {
        "name": "api",
        "type": "STATIC",
        "connect_timeout": "1s",
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": TLS + "UpstreamTlsContext",
                "sni": "api.internal",
                "common_tls_context": {"tls_certificates": [tls_certificate()]},
            },
        },
    }


def test_a_clusters_inline_tls_context_loses_its_key_inside_the_any() -> None:
    cluster = redacted(resources.CLUSTER, upstream_tls_cluster())
    context = cluster["transport_socket"]["typed_config"]
    assert context["@type"] == TLS + "UpstreamTlsContext" and context["sni"] == "api.internal"
    [certificate] = context["common_tls_context"]["tls_certificates"]
    assert certificate["private_key"] == {"inline_string": REDACTED}
    assert certificate["certificate_chain"] == {"inline_string": KEYS.certificate}


def test_a_listeners_inline_tls_context_loses_keys_and_ticket_keys() -> None:
    downstream = {
        "@type": TLS + "DownstreamTlsContext",
        "common_tls_context": {"tls_certificates": [tls_certificate()]},
        "session_ticket_keys": {"keys": [{"inline_bytes": "a2V5MQ=="}]},
    }
    listener = redacted(
        resources.LISTENER,
        {
            "name": "https",
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": 443}},
            "filter_chains": [
                {"transport_socket": {"name": "tls", "typed_config": downstream}},
                {
                    "transport_socket": {
                        "name": "tls",
                        "typed_config": {
                            "@type": "type.googleapis.com/xds.type.v3.TypedStruct",
                            "type_url": TLS + "DownstreamTlsContext",
                            "value": {
                                "common_tls_context": {"tls_certificates": [tls_certificate()]}
                            },
                        },
                    }
                },
            ],
        },
    )
    inline, typed_struct = (
        c["transport_socket"]["typed_config"] for c in listener["filter_chains"]
    )
    assert inline["common_tls_context"]["tls_certificates"][0]["private_key"] == {
        "inline_string": REDACTED
    }
    assert inline["session_ticket_keys"]["keys"] == [{"inline_string": REDACTED}]
    [certificate] = typed_struct["value"]["common_tls_context"]["tls_certificates"]
    assert certificate["private_key"] == {"inline_string": REDACTED}
    assert certificate["certificate_chain"] == {"inline_string": KEYS.certificate}


def test_a_grpc_channels_private_key_is_found_without_any_any_on_the_way() -> None:
    ssl = {"private_key": {"inline_string": KEYS.private_key}, "root_certs": {"filename": "/ca"}}
    google_grpc = {
        "target_uri": "xds.internal:443",
        "stat_prefix": "xds",
        "channel_credentials": {"ssl_credentials": ssl},
    }
    cluster = redacted(
        resources.CLUSTER,
        {
            "name": "web",
            "type": "EDS",
            "eds_cluster_config": {
                "eds_config": {
                    "api_config_source": {
                        "api_type": "GRPC",
                        "grpc_services": [{"google_grpc": google_grpc}],
                    }
                }
            },
        },
    )
    [service] = cluster["eds_cluster_config"]["eds_config"]["api_config_source"]["grpc_services"]
    assert service["google_grpc"]["channel_credentials"]["ssl_credentials"] == {
        "private_key": {"inline_string": REDACTED},
        "root_certs": {"filename": "/ca"},
    }


def test_the_fields_envoy_marks_sensitive_cover_what_must_never_be_shown() -> None:
    """Redaction follows Envoy's `sensitive` annotations: they must keep covering these."""
    resources.load_all_descriptors()
    must_hide = {
        "TlsCertificate": ("private_key", "password", "pkcs12"),
        "PrivateKeyProvider": ("typed_config",),
        "GenericSecret": ("secret", "secrets"),
        "TlsSessionTicketKeys": ("keys",),
    }
    for message, fields in must_hide.items():
        descriptor = resources.message_class_for(TLS + message).DESCRIPTOR
        for name in fields:
            assert redaction._is_sensitive(descriptor.fields_by_name[name]), f"{message}.{name}"


def test_a_resource_without_key_material_keeps_its_very_bytes() -> None:
    snapshot = factories.edge_snapshot()
    for resource in snapshot.all_resources():
        assert redaction.redact_body(resource.type_url, resource.body) is resource.body
        assert redaction.redact_resource(resource) is resource
    assert redaction.redact_snapshot(snapshot) is snapshot


def test_redacted_bytes_are_deterministic_and_redacting_again_changes_nothing() -> None:
    cluster = parse(resources.CLUSTER, upstream_tls_cluster())
    resources.canonicalize(cluster)
    body = resources.serialize(cluster)
    once = redaction.redact_body(resources.CLUSTER, body)
    assert once != body and KEYS.private_key.encode() not in once
    assert redaction.redact_body(resources.CLUSTER, body) == once
    assert redaction.redact_body(resources.CLUSTER, once) == once


def test_a_redacted_snapshot_holds_no_key_but_the_same_resources() -> None:
    snapshot = Snapshot.from_messages(
        [
            (resources.SECRET, factories.secret("edge", KEYS.private_key)),
            (resources.CLUSTER, parse(resources.CLUSTER, upstream_tls_cluster())),
        ]
    )
    shown = redaction.redact_snapshot(snapshot)
    assert [(r.type_url, r.name) for r in shown.all_resources()] == [
        (r.type_url, r.name) for r in snapshot.all_resources()
    ]
    assert all(KEYS.private_key.encode() not in r.body for r in shown.all_resources())
    assert KEYS.certificate.encode() in shown.resources(resources.CLUSTER)["api"].body


def test_redacting_what_differs_gives_the_diff_that_redacting_everything_gives() -> None:
    from controlplane.diff import diff_snapshots

    other = factories.key_pair("other.test")
    cluster = parse(resources.CLUSTER, upstream_tls_cluster())
    old = Snapshot.from_messages(
        [
            (resources.SECRET, factories.secret("kept", KEYS.private_key)),
            (resources.SECRET, factories.secret("rotated", KEYS.private_key)),
            (resources.SECRET, factories.secret("dropped", KEYS.private_key)),
            (resources.CLUSTER, cluster),
        ]
    )
    new = Snapshot.from_messages(
        [
            (resources.SECRET, factories.secret("kept", KEYS.private_key)),
            (resources.SECRET, factories.secret("rotated", other.private_key)),
            (resources.SECRET, factories.secret("added", other.private_key)),
            (resources.CLUSTER, cluster),
        ]
    )
    mask = redaction.fingerprint_mask()
    old_shown, new_shown = redaction.redact_differences(old, new, mask)
    assert old_shown is not None
    assert diff_snapshots(old_shown, new_shown) == diff_snapshots(
        redaction.redact_snapshot(old, mask), redaction.redact_snapshot(new, mask)
    )
    assert [r.name for r in old_shown.all_resources()] == ["dropped", "rotated"]
    assert [r.name for r in new_shown.all_resources()] == ["added", "rotated"]
    for shown in (old_shown, new_shown):
        for key in (KEYS.private_key, other.private_key):
            assert all(key.encode() not in r.body for r in shown.all_resources())
    none_shown, everything = redaction.redact_differences(None, new, mask)
    assert none_shown is None
    assert [r.name for r in everything.all_resources()] == ["api", "added", "kept", "rotated"]
    assert all(other.private_key.encode() not in r.body for r in everything.all_resources())


def test_a_fingerprint_tells_values_apart_without_showing_them() -> None:
    mask = redaction.fingerprint_mask()
    first, again, other = mask(b"key one"), mask(b"key one"), mask(b"key two")
    assert first == again != other
    assert first.startswith("[redacted ") and "key" not in first
    assert redaction.fingerprint_mask()(b"key one") != first  # a new key in each process


@pytest.mark.parametrize(
    "kind", ["PRIVATE KEY", "EC PRIVATE KEY", "RSA PRIVATE KEY", "ENCRYPTED PRIVATE KEY"]
)
def test_pem_private_key_blocks_leave_text(kind: str) -> None:
    block = f"-----BEGIN {kind}-----\nMHcCAQEEIB0a\n-----END {kind}-----"
    text = f"NACK: bad config {block} and {block}; cert {KEYS.certificate}"
    scrubbed = redaction.redact_pem_keys(text)
    assert scrubbed == (
        f"NACK: bad config {REDACTED_PRIVATE_KEY} and {REDACTED_PRIVATE_KEY}; "
        f"cert {KEYS.certificate}"
    )


def test_a_real_key_and_a_key_cut_short_leave_text() -> None:
    assert (
        redaction.redact_pem_keys(f"key: {KEYS.private_key}!") == f"key: {REDACTED_PRIVATE_KEY}\n!"
    )
    clipped = "error in " + KEYS.private_key[:80]  # log texts are clipped at a length
    assert redaction.redact_pem_keys(clipped) == f"error in {REDACTED_PRIVATE_KEY}"
    escaped = KEYS.private_key.replace("\n", "\\n")  # as JSON quotes it
    assert redaction.redact_pem_keys(escaped) == REDACTED_PRIVATE_KEY + "\\n"
    assert redaction.redact_pem_keys("no key here") == "no key here"
