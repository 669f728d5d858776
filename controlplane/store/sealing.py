"""Encryption at rest of the secrets in the store (`xdsctl serve --store-key-file FILE`).

Only Secret resources are sealed. Everything else stays plain, so history, diff and
versions work unchanged: a snapshot's version hashes the plaintext, the same with a key or
without one.

- The key file holds 32 bytes, raw or in standard base64 (44 characters; a trailing newline
  is allowed), and is readable and writable by its owner only. `create_key_file` writes one.
- Two keys are derived from it with HKDF-SHA256: one for AES-256-GCM, one for HMAC-SHA256.
- A sealed blob is stored under the HMAC of its plaintext, so a secret kept by many
  snapshots is stored once, and its id tells nothing to a reader without the key. Its bytes
  are a random 96-bit nonce, then the ciphertext and tag, with the blob id as associated
  data: a sealed value copied into another row does not open.
- A keyed store keeps a check value (a GCM tag made with the key), so a wrong key is refused
  when the store opens rather than at the first read of a secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from controlplane.resources import SECRET
from controlplane.snapshot import Resource
from controlplane.store import StoreError

KEY_BYTES = 32
KEY_BASE64_CHARS = 44
NONCE_BYTES = 12
KEY_FILE_FORMAT = "32 bytes, raw or base64 (44 characters)"
_ASSOCIATED_DATA_PREFIX = b"xdscp store sealed blob v1\x00"
_KEY_CHECK = b"xdscp store key check v1"


class KeyFileError(StoreError):
    """The key file is missing, malformed, or open to others."""


class SealError(StoreError):
    """A sealed value does not open: another key, another row, or altered bytes."""


def read_key_file(path: Path) -> bytes:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        data = path.read_bytes()
    except OSError as error:
        raise KeyFileError(
            f"store key file {path}: {error.strerror}; it must hold {KEY_FILE_FORMAT}"
        ) from None
    if mode & 0o077:
        raise KeyFileError(
            f"store key file {path} has mode {mode:04o}: it must not be readable or writable "
            f"by group or other (chmod 600 {path})"
        )
    key = _decode_key(data)
    if key is None:
        raise KeyFileError(
            f"store key file {path} holds {len(data)} bytes that are not a key: it must hold "
            f"{KEY_FILE_FORMAT} (create one with `xdsctl store-key create FILE`)"
        )
    return key


def _decode_key(data: bytes) -> bytes | None:
    if len(data) == KEY_BYTES:
        return data
    text = data.rstrip(b"\r\n")
    if len(text) != KEY_BASE64_CHARS:
        return None
    try:
        key = base64.b64decode(text, validate=True)
    except binascii.Error:
        return None
    return key if len(key) == KEY_BYTES else None


def create_key_file(path: Path) -> None:
    """Write a new random key, in base64, to a new file of mode 0600; never overwrite."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; a store key is never overwritten") from None
    except OSError as error:
        raise KeyFileError(f"cannot create store key file {path}: {error.strerror}") from None
    with os.fdopen(fd, "wb") as file:
        file.write(base64.b64encode(os.urandom(KEY_BYTES)) + b"\n")
        file.flush()
        os.fsync(file.fileno())


class Sealer:
    """Seals and opens the store's secret blobs with one key."""

    def __init__(self, key: bytes, *, source: str = "the store key") -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a store key is {KEY_BYTES} bytes, not {len(key)}")
        self.source = source  # where the key came from, for error messages
        self._aead = AESGCM(_derive(key, b"xdscp store: AES-256-GCM"))
        self._id_key = _derive(key, b"xdscp store: blob id")

    @classmethod
    def from_key_file(cls, path: Path) -> Sealer:
        return cls(read_key_file(path), source=str(path))

    def seal(self, body: bytes) -> tuple[str, bytes]:
        """(blob id, sealed bytes) of a plaintext body."""
        blob_id = hmac.new(self._id_key, body, hashlib.sha256).hexdigest()
        nonce = os.urandom(NONCE_BYTES)
        return blob_id, nonce + self._aead.encrypt(nonce, body, _associated_data(blob_id))

    def open(self, blob_id: str, sealed: bytes) -> bytes:
        nonce, ciphertext = sealed[:NONCE_BYTES], sealed[NONCE_BYTES:]
        try:
            return self._aead.decrypt(nonce, ciphertext, _associated_data(blob_id))
        except InvalidTag:
            raise SealError(
                f"sealed blob {blob_id} does not open with {self.source} "
                "(another key, a value moved from another row, or altered bytes)"
            ) from None

    def check_value(self) -> bytes:
        """Bytes stored with a keyed store, by which `matches` knows the key again."""
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, b"", _KEY_CHECK)

    def matches(self, check_value: bytes) -> bool:
        try:
            self._aead.decrypt(check_value[:NONCE_BYTES], check_value[NONCE_BYTES:], _KEY_CHECK)
        except InvalidTag:
            return False
        return True


class StoreSealing:
    """What a store backend does with its key, or with none: which bodies it seals, how it
    opens them, and the key check. `name` names the store in errors."""

    def __init__(self, sealer: Sealer | None, name: str) -> None:
        self.sealer = sealer
        self.name = name

    def blob(self, resource: Resource) -> tuple[str, bytes, bool]:
        """(id, stored bytes, sealed?) of a resource's body: a secret is sealed if we can."""
        if self.sealer is not None and resource.type_url == SECRET:
            blob_id, sealed = self.sealer.seal(resource.body)
            return blob_id, sealed, True
        return hashlib.sha256(resource.body).hexdigest(), resource.body, False

    def plaintext(self, blob_id: str, body: bytes, sealed: bool) -> bytes:
        if not sealed:
            return body
        if self.sealer is None:  # only rows copied in from a keyed store: see check_key
            raise StoreError(f"{self.name}: blob {blob_id} is sealed and the store has no key")
        try:
            return self.sealer.open(blob_id, body)
        except SealError as error:
            raise StoreError(f"{self.name}: {error}") from None

    def check_key(self, stored: bytes | None) -> bytes | None:
        """A keyed store opens only with its key; the first key given to a store is its key.
        `stored`: the store's check value, if it has one. Returns the check value to store
        now (the first key), or None."""
        if stored is None:
            return self.sealer.check_value() if self.sealer is not None else None
        if self.sealer is None:
            raise StoreError(
                f"{self.name} keeps its secrets encrypted: start xdsctl serve with "
                "--store-key-file FILE, the key it was first opened with"
            )
        if not self.sealer.matches(stored):
            raise StoreError(
                f"--store-key-file {self.sealer.source} is not the key of {self.name}: "
                "its secrets were encrypted with another key"
            )
        return None


def _derive(key: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=purpose).derive(key)


def _associated_data(blob_id: str) -> bytes:
    return _ASSOCIATED_DATA_PREFIX + blob_id.encode()
