"""Certificates for tests, made with xdsctl certgen's own code, and the flags that use them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc

from controlplane import certgen

TRUST_DOMAIN = "xdscp.test"
SERVER_NAME = "localhost"  # in the server certificate, beside 127.0.0.1


class Pki:
    """A CA with a server certificate for 127.0.0.1/localhost and an xdsctl client one."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        certgen.create(
            directory,
            trust_domain=TRUST_DOMAIN,
            server_names=[SERVER_NAME, "127.0.0.1"],
            admin_client=True,
        )
        self.ca = certgen.Issued.read(directory / "ca.pem", directory / "ca.key")
        self.ca_path = directory / "ca.pem"

    def issue(self, name: str, *uris: str, ca: certgen.Issued | None = None) -> tuple[Path, Path]:
        """A client certificate with these URI SANs; (cert, key) paths."""
        cert, key = self.directory / f"{name}.pem", self.directory / f"{name}.key"
        certgen.issue(ca or self.ca, name, uris=uris).write(cert, key)
        return cert, key

    def node(self, group: str, node_id: str, *, canary: bool = False) -> tuple[Path, Path]:
        uri = certgen.node_uri(TRUST_DOMAIN, group, node_id, canary=canary)
        role = "canary" if canary else "node"
        return self.issue(f"{role}-{group}-{node_id}".replace("*", "any"), uri)

    def credentials(self, cert: Path | None, key: Path | None) -> grpc.ChannelCredentials:
        """gRPC client credentials trusting xdscp's CA, presenting `cert` if given."""
        return grpc.ssl_channel_credentials(
            self.ca_path.read_bytes(),
            key.read_bytes() if key else None,
            cert.read_bytes() if cert else None,
        )

    def serve_args(self, *, admin_mtls: bool = False) -> tuple[str, ...]:
        """`xdsctl serve` flags: TLS on both ports, mTLS with node identity on xDS."""
        args = (
            "--tls-cert", str(self.directory / "server.pem"),
            "--tls-key", str(self.directory / "server.key"),
            "--tls-client-ca", str(self.ca_path),
            "--trust-domain", TRUST_DOMAIN,
        )  # fmt: skip
        return args + (("--admin-client-ca", str(self.ca_path)) if admin_mtls else ())

    def xdsctl_args(self) -> tuple[str, ...]:
        return (
            "--tls-ca", str(self.ca_path),
            "--tls-cert", str(self.directory / "admin-client.pem"),
            "--tls-key", str(self.directory / "admin-client.key"),
        )  # fmt: skip

    def envoy_transport_socket(self, cert: Path, key: Path) -> dict[str, Any]:
        """The xds cluster's TLS: present `cert`, and check xdscp's against the CA."""
        return {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": SERVER_NAME,
                "common_tls_context": {
                    "alpn_protocols": ["h2"],
                    "tls_certificates": [
                        {
                            "certificate_chain": {"filename": str(cert)},
                            "private_key": {"filename": str(key)},
                        }
                    ],
                    "validation_context": {
                        "trusted_ca": {"filename": str(self.ca_path)},
                        "match_typed_subject_alt_names": [
                            {"san_type": "DNS", "matcher": {"exact": SERVER_NAME}}
                        ],
                    },
                },
            },
        }
