"""TLS for the xDS and admin ports: PEM files given to `serve`, re-read when they change.

gRPC asks for the certificate configuration at every handshake. The files are compared by
inode, size and modification time, so a swap by cert-manager or SPIRE (a rename or a
symlink flip) takes effect for the next connection while open streams keep their own. A
half-written or mismatched set is refused, logged and retried: the last good set stays.
"""

from __future__ import annotations

import datetime
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization

log = structlog.get_logger("tls")

MAX_PEM_BYTES = 1 << 20  # per file: a chain of a few certificates is a few KiB


class TlsError(ValueError):
    """A certificate, key or CA file cannot be used; the message names the file."""


@dataclass(frozen=True)
class TlsFiles:
    cert: Path  # the server's certificate chain, leaf first
    key: Path  # its private key (unencrypted PEM)
    client_ca: Path | None = None  # given: clients must show a certificate it signed (mTLS)

    def paths(self) -> tuple[Path, ...]:
        return (self.cert, self.key) + ((self.client_ca,) if self.client_ca else ())


@dataclass(frozen=True)
class TlsMaterial:
    """One checked, consistent set of the files' contents."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None
    not_after: datetime.datetime  # of the server certificate

    @classmethod
    def load(cls, files: TlsFiles) -> TlsMaterial:
        chain_pem = _read(files.cert)
        key_pem = _read(files.key)
        chain = _certificates(files.cert, chain_pem)
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as error:
            raise TlsError(f"{files.key}: not an unencrypted PEM private key ({error})") from None
        if _public(key.public_key()) != _public(chain[0].public_key()):
            raise TlsError(f"{files.key} is not the private key of the certificate in {files.cert}")
        ca_pem = None
        if files.client_ca is not None:
            ca_pem = _read(files.client_ca)
            _certificates(files.client_ca, ca_pem)
        return cls(chain_pem, key_pem, ca_pem, chain[0].not_valid_after_utc)

    def server_configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.private_key, self.cert_chain)], root_certificates=self.client_ca
        )


class ReloadingServerCredentials:
    """Server credentials for one port whose files are re-read when they change on disk."""

    def __init__(
        self,
        files: TlsFiles,
        port: str,
        on_load: Callable[[str, TlsMaterial | None], None] = lambda port, material: None,
    ) -> None:
        """`on_load(port, material)` is told of every reload: the new material, or None
        when the files changed but could not be used."""
        self.files = files
        self._port = port
        self._on_load = on_load
        self._lock = threading.Lock()  # gRPC may handshake on several threads at once
        self._stamp = _stamp(files)
        self.material = TlsMaterial.load(files)  # start-up: an unusable set is an error
        on_load(port, self.material)

    @property
    def requires_client_certificate(self) -> bool:
        return self.files.client_ca is not None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.material.server_configuration(),
            self._configuration_if_changed,
            require_client_authentication=self.requires_client_certificate,
        )

    def _configuration_if_changed(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC before each handshake: None keeps the current configuration."""
        with self._lock:
            try:
                stamp = _stamp(self.files)
            except OSError as error:
                return self._refuse(stamp=None, error=f"cannot stat: {error}")
            if stamp == self._stamp:
                return None
            try:
                material = TlsMaterial.load(self.files)
            except TlsError as error:
                return self._refuse(stamp, str(error))
            self._stamp, self.material = stamp, material
            log.info(
                "tls files reloaded",
                port=self._port,
                cert=str(self.files.cert),
                not_after=material.not_after.isoformat(),
            )
            self._on_load(self._port, material)
            return material.server_configuration()

    def _refuse(self, stamp: tuple[int, ...] | None, error: str) -> None:
        if stamp is not None:
            self._stamp = stamp  # logged once per change of the files, not per handshake
        log.warning(
            "tls files not reloaded: keeping the last good ones", port=self._port, error=error
        )
        self._on_load(self._port, None)
        return None


def _read(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_PEM_BYTES + 1)
    except OSError as error:
        raise TlsError(f"{path}: {error.strerror}") from None
    if len(data) > MAX_PEM_BYTES:
        raise TlsError(f"{path}: larger than the limit of {MAX_PEM_BYTES:,} bytes")
    return data


def _certificates(path: Path, pem: bytes) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError as error:
        raise TlsError(f"{path}: not PEM certificates ({error})") from None
    return certificates


def _public(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _stamp(files: TlsFiles) -> tuple[int, ...]:
    """Changes whenever any of the files is replaced or rewritten (symlinks followed)."""
    stamp: list[int] = []
    for path in files.paths():
        st = os.stat(path)
        stamp += [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]
    return tuple(stamp)
