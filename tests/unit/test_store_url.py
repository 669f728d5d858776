"""`--store`: a PostgreSQL URL or a SQLite path; a URL shown anywhere has no password; where
a database-backed server keeps its own files."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.app import Config
from controlplane.store.pg_url import DatabaseUrl, StoreUrlError, is_database_url, redact


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:s3cret@db:5432/x", "postgresql://u:***@db:5432/x"),
        ("postgres://u:s3cret@db/x?sslmode=require", "postgres://u:***@db/x?sslmode=require"),
        (
            "postgresql://db/x?user=u&password=s3cret&sslmode=disable",
            "postgresql://db/x?user=u&password=***&sslmode=disable",
        ),
        ("postgresql://u@db/x", "postgresql://u@db/x"),
        ("postgresql://u:@db/x", "postgresql://u:***@db/x"),
    ],
)
def test_redact_hides_the_password_wherever_the_url_holds_it(url: str, shown: str) -> None:
    assert redact(url) == shown
    assert "s3cret" not in repr(DatabaseUrl.parse(url))


def test_a_url_is_described_by_host_port_and_database() -> None:
    parsed = DatabaseUrl.parse("postgresql://u:s3cret@db.internal:6432/xdscp")
    assert parsed.describe() == "db.internal:6432/xdscp"
    assert parsed.hide("auth failed for s3cret") == "auth failed for ***"
    assert DatabaseUrl.parse("postgresql://u@db").describe() == "db:5432/u"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://db/x", True),
        ("POSTGRES://db/x", True),
        ("xdscp.db", False),
        ("/var/lib/xdscp/xdscp.db", False),
        ("./postgresql/xdscp.db", False),
    ],
)
def test_a_database_url_is_told_from_a_path(text: str, expected: bool) -> None:
    assert is_database_url(text) is expected


def test_another_scheme_is_refused_naming_store_without_the_password() -> None:
    with pytest.raises(StoreUrlError, match=r"^--store mysql://u:\*\*\*@db/x: only postgresql://"):
        is_database_url("mysql://u:s3cret@db/x")


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:s3cret@db:notaport/x",
        "postgresql://u:s3cret@db:70000/x",
        "postgresql://u:s3cret@db/x?nosuchoption=1",
        "postgresql://u:s3cret@db/" + "x" * 5000,
    ],
)
def test_a_bad_url_is_refused_naming_store_without_the_password(url: str) -> None:
    with pytest.raises(StoreUrlError, match=r"^--store") as refused:
        DatabaseUrl.parse(url)
    assert "s3cret" not in str(refused.value)


def test_a_database_server_keeps_tokens_and_socket_in_its_state_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    database = DatabaseUrl.parse("postgresql://u:s3cret@db/x")
    default = Config(database=database)
    assert default.token_path == tmp_path / ".xdscp" / "admin-token"
    assert default.store_name == "postgresql://u:***@db/x"
    chosen = Config(database=database, state_dir=Path("run"), xds_socket=None)
    assert chosen.read_token_path == tmp_path / "run" / "admin-read-token"
    assert "s3cret" not in repr(chosen)


def test_state_dir_with_a_sqlite_store_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="--state-dir is for a database --store"):
        Config(store_path=tmp_path / "xdscp.db", state_dir=tmp_path / "run")
    assert Config(store_path=tmp_path / "db" / "x.db").token_path == tmp_path / "db" / "admin-token"
