"""A freshly generated EC private key and certificate, as an Envoy Secret, and every form in
which the key could be found in a file that leaks it."""

from __future__ import annotations

import base64
import datetime
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2


@dataclass(frozen=True)
class TlsMaterial:
    key_pem: str
    certificate_pem: str
    key_forms: dict[str, bytes]  # what must not appear in a file: PEM, a PEM line, DER, ...


def generate(common_name: str = "edge.example.com") -> TlsMaterial:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    pkcs8 = serialization.PrivateFormat.PKCS8
    no_password = serialization.NoEncryption()
    key_pem = key.private_bytes(serialization.Encoding.PEM, pkcs8, no_password)
    key_der = key.private_bytes(serialization.Encoding.DER, pkcs8, no_password)
    return TlsMaterial(
        key_pem=key_pem.decode(),
        certificate_pem=certificate.public_bytes(serialization.Encoding.PEM).decode(),
        key_forms={
            "the PEM text": key_pem,
            "a base64 line of the PEM": key_pem.splitlines()[1],
            "the base64 of the DER": base64.b64encode(key_der),
            "the DER": key_der,
            "the private scalar": key.private_numbers().private_value.to_bytes(32, "big"),
        },
    )


def secret(name: str, material: TlsMaterial) -> secret_pb2.Secret:
    return secret_pb2.Secret(
        name=name,
        tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(inline_string=material.certificate_pem),
            private_key=base_pb2.DataSource(inline_string=material.key_pem),
        ),
    )


def secret_yaml(name: str, material: TlsMaterial) -> dict[str, object]:
    """The same Secret in the form `xdsctl publish` reads."""
    return {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
        "name": name,
        "tls_certificate": {
            "certificate_chain": {"inline_string": material.certificate_pem},
            "private_key": {"inline_string": material.key_pem},
        },
    }


def forms_found(data: bytes, material: TlsMaterial) -> list[str]:
    """The forms of the private key that `data` contains."""
    return [form for form, value in material.key_forms.items() if value in data]
