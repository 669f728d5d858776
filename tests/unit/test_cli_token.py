"""Where xdsctl finds the admin token, and what it says when it finds none."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from controlplane import app
from controlplane.cli import client
from controlplane.cli.client import CommandError
from controlplane.cli.main import build_parser, package_version


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("XDSCTL_TOKEN", raising=False)
    monkeypatch.delenv("XDSCTL_TOKEN_FILE", raising=False)
    monkeypatch.chdir(tmp_path)


def _args(token_file: Path | None = None) -> argparse.Namespace:
    return argparse.Namespace(token_file=token_file)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_no_token_anywhere_names_every_place_tried(tmp_path: Path) -> None:
    assert client._token(_args()) is None
    message = client.no_token_hint()
    for place in (
        "--token-file",
        "XDSCTL_TOKEN ",
        "XDSCTL_TOKEN_FILE",
        str(tmp_path / ".xdscp/admin-token"),
        str(tmp_path / ".xdscp/admin-read-token"),
    ):
        assert place in message


def test_default_token_files_are_the_ones_serve_creates_beside_its_default_store() -> None:
    config = app.Config()
    defaults = tuple(path.absolute() for path in client.DEFAULT_TOKEN_FILES)
    assert (config.token_path.absolute(), config.read_token_path.absolute()) == defaults


def test_sources_in_order_flag_env_token_env_file_write_default_read_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    read_default = _write(tmp_path / ".xdscp/admin-read-token", "read-default\n")
    assert client._token(_args()) == "read-default"  # the read token alone serves reads
    _write(tmp_path / ".xdscp/admin-token", "write-default\n")
    assert client._token(_args()) == "write-default"
    monkeypatch.setenv("XDSCTL_TOKEN_FILE", str(_write(tmp_path / "env-file", "from-env-file")))
    assert client._token(_args()) == "from-env-file"
    monkeypatch.setenv("XDSCTL_TOKEN", "from-env")
    assert client._token(_args()) == "from-env"
    assert client._token(_args(read_default)) == "read-default"  # the flag wins


@pytest.mark.parametrize("source", ["flag", "env"])
def test_a_named_token_file_that_is_missing_or_empty_is_an_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    _write(tmp_path / ".xdscp/admin-token", "would-be-found")
    for path, why in (
        (tmp_path / "missing", "does not exist"),
        (_write(tmp_path / "e", " \n"), "empty"),
    ):
        if source == "env":
            monkeypatch.setenv("XDSCTL_TOKEN_FILE", str(path))
            args = _args()
        else:
            args = _args(path)
        with pytest.raises(CommandError, match=why) as refused:
            client._token(args)
        assert str(path) in str(refused.value)


def test_version_flag_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["--version"])
    assert done.value.code == 0
    printed = capsys.readouterr().out.strip()
    assert printed == f"xdsctl {package_version()}"
    assert package_version() != "unknown"  # the package is installed in the test venv


def test_a_call_after_its_command_ended_opens_no_channel() -> None:
    """xdsctl publish reads the stable in a thread it may not wait for (a refusal of the
    files does not): a call that thread makes after the command ended is refused, rather
    than opening a channel nobody closes."""
    import argparse

    from controlplane.cli import client

    args = argparse.Namespace(
        server="127.0.0.1:1", tls_ca=None, tls_cert=None, tls_key=None, tls_server_name=None
    )
    shared = client._SharedChannels()
    shared.channel(args)
    shared.close()
    with pytest.raises(client.CommandError, match="the command has ended"):
        shared.channel(args)
