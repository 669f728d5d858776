"""Certificates for a deployment without a PKI of its own (`xdsctl certgen`), and for tests.

A CA, a server certificate for xdscp's xDS and admin ports, and client certificates for
nodes (with the SPIFFE IDs identity.py reads) and for xdsctl. Keys are ECDSA P-256, written
with mode 0600. Fleets with cert-manager or SPIRE use those instead.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controlplane.xds.identity import CANARY_ROLE, NODE_ROLE, SPIFFE_SCHEME


@dataclass(frozen=True)
class Issued:
    cert_pem: bytes
    key_pem: bytes

    def write(self, cert_path: Path, key_path: Path) -> None:
        cert_path.parent.mkdir(parents=True, exist_ok=True)
        cert_path.write_bytes(self.cert_pem)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.key_pem)
        key_path.chmod(0o600)

    @classmethod
    def read(cls, cert_path: Path, key_path: Path) -> Issued:
        return cls(cert_path.read_bytes(), key_path.read_bytes())


def node_uri(trust_domain: str, group: str, node_id: str, *, canary: bool = False) -> str:
    role = CANARY_ROLE if canary else NODE_ROLE
    return f"{SPIFFE_SCHEME}{trust_domain}/group/{group}/{role}/{node_id}"


def new_ca(common_name: str = "xdscp CA", *, days: int = 3650) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        _builder(name, key, days)
        .issuer_name(name)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
    )  # fmt: skip
    return _issued(builder.sign(key, hashes.SHA256()), key)


def issue(
    ca: Issued,
    common_name: str,
    *,
    dns_names: Iterable[str] = (),
    ip_addresses: Iterable[str] = (),
    uris: Iterable[str] = (),
    days: int = 365,
) -> Issued:
    """A leaf certificate signed by `ca`, for servers and clients alike."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    sans += [x509.UniformResourceIdentifier(u) for u in uris]
    builder = (
        _builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]), key, days)
        .issuer_name(ca_cert.subject)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return _issued(builder.sign(ca_key, hashes.SHA256()), key)  # type: ignore[arg-type]


def _builder(
    subject: x509.Name, key: ec.EllipticCurvePrivateKey, days: int
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # clocks a little behind
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def _issued(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Issued:
    return Issued(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def create(
    directory: Path,
    *,
    trust_domain: str,
    server_names: Iterable[str],
    nodes: Iterable[tuple[str, str, bool]] = (),
    admin_client: bool = False,
    days: int = 365,
) -> list[Path]:
    """Write a CA (kept and reused when DIR already has one), a server certificate and the
    client certificates asked for into `directory`; return the certificate paths written.
    `nodes` are (group, node id or glob, canary)."""
    ca_cert, ca_key = directory / "ca.pem", directory / "ca.key"
    if ca_cert.exists() and ca_key.exists():
        ca = Issued.read(ca_cert, ca_key)
    else:
        ca = new_ca(f"xdscp CA ({trust_domain})")
        ca.write(ca_cert, ca_key)
    written = [ca_cert]
    names = list(server_names)
    ips = [n for n in names if _is_ip(n)]
    dns = [n for n in names if not _is_ip(n)]
    server = issue(ca, dns[0] if dns else "xdscp", dns_names=dns, ip_addresses=ips, days=days)
    server.write(directory / "server.pem", directory / "server.key")
    written.append(directory / "server.pem")
    for group, node_id, canary in nodes:
        uri = node_uri(trust_domain, group, node_id, canary=canary)
        stem = f"{'canary' if canary else 'node'}-{group}-{node_id}".replace("*", "any")
        issue(ca, stem, uris=[uri], days=days).write(
            directory / f"{stem}.pem", directory / f"{stem}.key"
        )
        written.append(directory / f"{stem}.pem")
    if admin_client:
        issue(ca, "xdsctl", days=days).write(
            directory / "admin-client.pem", directory / "admin-client.key"
        )
        written.append(directory / "admin-client.pem")
    return written


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
