"""Secrets sealed at rest: key files, what the store's bytes hold, and opening with the key."""

from __future__ import annotations

import base64
import sqlite3
from pathlib import Path

import pytest
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from structlog.testing import capture_logs

from controlplane import resources
from controlplane.snapshot import Snapshot
from controlplane.store import StoreError
from controlplane.store.sealing import KeyFileError, Sealer, create_key_file, read_key_file
from controlplane.store.sqlite import SQLiteStore
from tests import factories, tls_material


@pytest.fixture(scope="module")
def material() -> tls_material.TlsMaterial:
    return tls_material.generate()


def snapshot_with_secret(material: tls_material.TlsMaterial, name: str = "edge-cert") -> Snapshot:
    base = factories.edge_snapshot()
    return Snapshot.from_serialized(
        [
            *((r.type_url, r.name, r.body) for r in base.all_resources()),
            (
                resources.SECRET,
                name,
                resources.serialize(tls_material.secret(name, material)),
            ),
        ]
    )


def key_file(path: Path) -> Path:
    create_key_file(path)
    return path


def sealer(path: Path) -> Sealer:
    return Sealer.from_key_file(path)


def raw_bytes(store_path: Path) -> bytes:
    """Everything on disk: the database and, while it is open, its WAL."""
    wal = store_path.with_name(store_path.name + "-wal")
    return store_path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")


def private_key_of(snapshot: Snapshot, name: str = "edge-cert") -> str:
    secret = snapshot.resources(resources.SECRET)[name].message()
    assert isinstance(secret, secret_pb2.Secret)
    return secret.tls_certificate.private_key.inline_string


# Key files


def test_created_key_file_is_0600_base64_and_reads_back(tmp_path) -> None:
    path = key_file(tmp_path / "store.key")
    assert path.stat().st_mode & 0o777 == 0o600
    text = path.read_bytes()
    assert len(text) == 45 and text.endswith(b"\n")
    assert read_key_file(path) == base64.b64decode(text)


def test_create_refuses_to_overwrite(tmp_path) -> None:
    path = key_file(tmp_path / "store.key")
    before = path.read_bytes()
    with pytest.raises(KeyFileError, match=f"{path} already exists"):
        create_key_file(path)
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    "content", [b"k" * 32, base64.b64encode(b"k" * 32), base64.b64encode(b"k" * 32) + b"\r\n"]
)
def test_key_file_takes_raw_or_base64(tmp_path, content: bytes) -> None:
    path = tmp_path / "store.key"
    path.write_bytes(content)
    path.chmod(0o600)
    assert read_key_file(path) == b"k" * 32


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"k" * 31,
        b"k" * 33,
        base64.b64encode(b"k" * 31),  # 44 characters, 31 bytes
        base64.b64encode(b"k" * 33),
        b"!" * 44,
    ],
)
def test_key_file_of_the_wrong_size_or_form_is_refused(tmp_path, content: bytes) -> None:
    path = tmp_path / "store.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError) as refused:
        read_key_file(path)
    assert str(path) in str(refused.value)
    assert "32 bytes, raw or base64 (44 characters)" in str(refused.value)


def test_missing_key_file_is_refused(tmp_path) -> None:
    path = tmp_path / "nowhere.key"
    with pytest.raises(KeyFileError, match=f"store key file {path}: No such file"):
        read_key_file(path)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o644])
def test_key_file_open_to_group_or_other_is_refused(tmp_path, mode: int) -> None:
    path = key_file(tmp_path / "store.key")
    path.chmod(mode)
    with pytest.raises(KeyFileError) as refused:
        read_key_file(path)
    assert f"store key file {path} has mode {mode:04o}" in str(refused.value)
    assert "must not be readable or writable by group or other" in str(refused.value)


# The store with a key


def test_keyed_store_holds_no_form_of_the_private_key_and_reads_it_back(tmp_path, material) -> None:
    path = tmp_path / "xdscp.db"
    snapshot = snapshot_with_secret(material)
    store = SQLiteStore(path, sealer=sealer(key_file(tmp_path / "store.key")))
    store.publish("edge", snapshot, message="", actor="a")

    assert path.with_name("xdscp.db-wal").stat().st_size > 0
    assert tls_material.forms_found(raw_bytes(path), material) == []
    assert b"edge-cert" in raw_bytes(path)  # names and the rest of the config stay plain
    loaded = store.get(snapshot.version)
    assert loaded is not None and loaded.version == snapshot.version
    assert private_key_of(loaded) == material.key_pem
    store.close()

    assert tls_material.forms_found(raw_bytes(path), material) == []  # after the checkpoint
    reopened = SQLiteStore(path, sealer=sealer(tmp_path / "store.key"))
    loaded = reopened.get(snapshot.version)
    assert loaded is not None and private_key_of(loaded) == material.key_pem
    reopened.close()


def test_without_a_key_the_private_key_is_on_disk(tmp_path, material) -> None:
    """The control for the test above: the search does find a key that is there."""
    path = tmp_path / "xdscp.db"
    store = SQLiteStore(path)
    store.publish("edge", snapshot_with_secret(material), message="", actor="a")
    assert "the PEM text" in tls_material.forms_found(raw_bytes(path), material)
    store.close()


def test_the_version_is_the_same_with_a_key_or_without(tmp_path, material) -> None:
    snapshot = snapshot_with_secret(material)
    plain = SQLiteStore(tmp_path / "plain.db")
    keyed = SQLiteStore(tmp_path / "keyed.db", sealer=sealer(key_file(tmp_path / "store.key")))
    plain_entry = plain.publish("edge", snapshot, message="", actor="a").entry
    keyed_entry = keyed.publish("edge", snapshot, message="", actor="a").entry
    assert plain_entry.version == keyed_entry.version == snapshot.version
    assert keyed.publish("edge", snapshot, message="", actor="a").changed is False
    plain_copy, keyed_copy = plain.get(snapshot.version), keyed.get(snapshot.version)
    assert plain_copy is not None and keyed_copy is not None
    assert [(r.type_url, r.name, r.body) for r in keyed_copy.all_resources()] == [
        (r.type_url, r.name, r.body) for r in plain_copy.all_resources()
    ]
    plain.close()
    keyed.close()


def test_a_secret_kept_by_many_snapshots_is_stored_once(tmp_path, material) -> None:
    path = tmp_path / "xdscp.db"
    store = SQLiteStore(path, sealer=sealer(key_file(tmp_path / "store.key")))
    first = snapshot_with_secret(material)
    second = Snapshot.from_serialized(
        [
            *((r.type_url, r.name, r.body) for r in first.all_resources()),
            (resources.CLUSTER, "extra", resources.serialize(factories.static_cluster("extra"))),
        ]
    )
    store.publish("edge", first, message="", actor="a")
    store.publish("edge", second, message="", actor="a")
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM blobs WHERE sealed = 1").fetchone() == (1,)


def test_a_keyed_store_refuses_to_open_without_its_key(tmp_path, material) -> None:
    path = tmp_path / "xdscp.db"
    store = SQLiteStore(path, sealer=sealer(key_file(tmp_path / "store.key")))
    store.publish("edge", snapshot_with_secret(material), message="", actor="a")
    store.close()
    with pytest.raises(
        StoreError, match=f"{path} keeps its secrets encrypted: .* --store-key-file FILE"
    ):
        SQLiteStore(path)


def test_a_keyed_store_refuses_another_key(tmp_path, material) -> None:
    path = tmp_path / "xdscp.db"
    store = SQLiteStore(path, sealer=sealer(key_file(tmp_path / "store.key")))
    store.publish("edge", snapshot_with_secret(material), message="", actor="a")
    store.close()
    other = key_file(tmp_path / "other.key")
    with pytest.raises(StoreError, match=f"--store-key-file {other} is not the key of {path}"):
        SQLiteStore(path, sealer=sealer(other))


def test_a_sealed_value_copied_into_another_row_does_not_open(tmp_path, material) -> None:
    path = tmp_path / "xdscp.db"
    keys = sealer(key_file(tmp_path / "store.key"))
    one, two = snapshot_with_secret(material, "one"), snapshot_with_secret(material, "two")
    store = SQLiteStore(path, sealer=keys)
    store.publish("edge", one, message="", actor="a")
    store.publish("edge", two, message="", actor="a")
    store.close()
    with sqlite3.connect(path) as db:
        blob_of = dict(
            db.execute(
                "SELECT name, blob_hash FROM snapshot_resources WHERE type_url = ?",
                (resources.SECRET,),
            )
        )
        db.execute(
            "UPDATE blobs SET body = (SELECT body FROM blobs WHERE hash = ?) WHERE hash = ?",
            (blob_of["one"], blob_of["two"]),
        )
    store = SQLiteStore(path, sealer=keys)
    assert store.get(one.version) is not None
    with pytest.raises(StoreError, match=f"{path}: sealed blob {blob_of['two']} does not open"):
        store.get(two.version)
    store.close()


def test_plain_secrets_of_an_older_store_stay_readable_and_new_ones_are_sealed(
    tmp_path, material
) -> None:
    """A schema-2 store (before sealing) opened with a key for the first time."""
    path = tmp_path / "xdscp.db"
    old = snapshot_with_secret(material, "old-cert")
    store = SQLiteStore(path)
    store.publish("edge", old, message="", actor="a")
    store.close()
    with sqlite3.connect(path) as db:  # back to schema 2, as xdscp before sealing left it
        db.executescript(
            "ALTER TABLE blobs DROP COLUMN sealed; DROP TABLE store_key; PRAGMA user_version=2;"
        )

    keys = sealer(key_file(tmp_path / "store.key"))
    with capture_logs() as logs:
        store = SQLiteStore(path, sealer=keys)
    assert [(e["event"], e["plaintext_secrets"]) for e in logs] == [
        ("store holds secrets written before it had a key; they stay unencrypted", 1)
    ]
    loaded = store.get(old.version)
    assert loaded is not None and private_key_of(loaded, "old-cert") == material.key_pem
    new = snapshot_with_secret(tls_material.generate(), "new-cert")
    store.publish("edge", new, message="", actor="a")
    store.close()
    with sqlite3.connect(path) as db:
        sealed = dict(
            db.execute(
                "SELECT r.name, b.sealed FROM snapshot_resources r "
                "JOIN blobs b ON b.hash = r.blob_hash WHERE r.type_url = ?",
                (resources.SECRET,),
            )
        )
        assert db.execute("PRAGMA user_version").fetchone() == (3,)
    assert sealed == {"old-cert": 0, "new-cert": 1}
    with pytest.raises(StoreError, match="--store-key-file"):
        SQLiteStore(path)


def test_a_store_of_a_newer_schema_is_refused(tmp_path) -> None:
    path = tmp_path / "xdscp.db"
    SQLiteStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version=99")
    with pytest.raises(StoreError, match="schema version 99 is newer"):
        SQLiteStore(path)
