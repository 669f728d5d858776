"""Every entry of a config directory is read or refused with its path and the reason."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from controlplane.config import ConfigError, inputs, load_directory, yaml_source
from controlplane.config.environments import load_config
from controlplane.config.yaml_source import YamlSourceError, parse_text
from tests.unit.test_config_loader import CLUSTER_WEB, only_problem, problems_of, write

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"

BILLION_LAUGHS = "\n".join(
    [
        'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]',
        *(
            f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]"
            for previous, name in zip("abcdefgh", "bcdefghi", strict=True)
        ),
    ]
)


def honest_clusters(count: int) -> str:
    """`count` STATIC clusters with an endpoint each, written out in full: no aliases."""
    lines = ["resources:"]
    for i in range(count):
        name = f"c{i:06d}"
        lines.append(
            f'- "@type": {CLUSTER}\n'
            f"  name: {name}\n  type: STATIC\n  connect_timeout: 1s\n"
            f"  load_assignment:\n    cluster_name: {name}\n    endpoints:\n"
            f"    - lb_endpoints:\n      - endpoint:\n          address:\n"
            f"            socket_address: {{address: 10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}, "
            "port_value: 8080}"
        )
    return "\n".join(lines) + "\n"


def sparse(path: Path, size: int) -> Path:
    with path.open("wb") as file:
        file.truncate(size)
    return path


@contextmanager
def fails_if_blocked(seconds: int = 10) -> Iterator[None]:
    """Turns a hang (a FIFO opened for reading blocks until a writer comes) into a failure."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"blocked for {seconds} s: was a FIFO opened?")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def refusal(tmp_path: Path, name: str, make: Callable[[Path], object]) -> str:
    """The one problem of a directory holding a good clusters.yaml and what `make` puts at
    `name`."""
    write(tmp_path, "clusters.yaml", CLUSTER_WEB)
    make(tmp_path / name)
    with fails_if_blocked():
        return str(only_problem(tmp_path))


# --- Entries that are not regular files ---------------------------------------------------


def test_dangling_symlink_is_refused_with_its_target(tmp_path: Path) -> None:
    assert refusal(tmp_path, "listeners.yaml", lambda p: p.symlink_to("listeners-v2.yaml")) == (
        f"{tmp_path}/listeners.yaml: dangling symlink (to listeners-v2.yaml, which is missing)"
    )


def test_dangling_symlink_without_a_config_suffix_is_refused_as_it_may_be_a_directory(
    tmp_path: Path,
) -> None:
    assert refusal(tmp_path, "shared", lambda p: p.symlink_to("../shared-config")) == (
        f"{tmp_path}/shared: dangling symlink (to ../shared-config, which is missing)"
    )


def test_symlink_loop_is_refused(tmp_path: Path) -> None:
    write(tmp_path, "clusters.yaml", CLUSTER_WEB)
    (tmp_path / "a.yaml").symlink_to("b.yaml")
    (tmp_path / "b.yaml").symlink_to("a.yaml")
    assert [str(p) for p in problems_of(tmp_path)] == [
        f"{tmp_path}/a.yaml: symlink loop",
        f"{tmp_path}/b.yaml: symlink loop",
    ]


def test_directory_symlink_back_to_an_ancestor_is_refused_as_a_loop(tmp_path: Path) -> None:
    write(tmp_path, "clusters.yaml", CLUSTER_WEB)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "up").symlink_to("..")
    assert str(only_problem(tmp_path)) == (
        f"{tmp_path}/sub/up: symlink loop (leads back to {tmp_path})"
    )


def test_symlinked_files_and_directories_are_read(tmp_path: Path) -> None:
    # A Kubernetes ConfigMap volume: each file is a symlink through a hidden, symlinked dir.
    write(tmp_path, "shared/clusters.yaml", CLUSTER_WEB)
    config = tmp_path / "config"
    config.mkdir()
    (config / "..data").symlink_to(tmp_path / "shared")
    (config / "clusters.yaml").symlink_to("..data/clusters.yaml")
    assert [r.name for r in load_directory(config)] == ["web"]
    (config / "clusters.yaml").unlink()
    (config / "linked").symlink_to(tmp_path / "shared")
    assert [str(r.location) for r in load_directory(config)] == [f"{config}/linked/clusters.yaml:2"]


def test_hidden_entries_are_skipped_even_when_broken(tmp_path: Path) -> None:
    write(tmp_path, "clusters.yaml", CLUSTER_WEB)
    (tmp_path / ".#clusters.yaml").symlink_to("user@host.1234")  # an editor's lock file
    os.mkfifo(tmp_path / ".pipe.yaml")
    assert [r.name for r in load_directory(tmp_path)] == ["web"]


def test_fifo_is_refused_without_being_opened(tmp_path: Path) -> None:
    assert refusal(tmp_path, "listeners.yaml", os.mkfifo) == (
        f"{tmp_path}/listeners.yaml: a FIFO (named pipe), not a regular file (not opened)"
    )
    with fails_if_blocked(), pytest.raises(YamlSourceError, match="FIFO"):
        yaml_source.parse_file(tmp_path / "listeners.yaml")


def test_socket_is_refused(tmp_path: Path) -> None:
    def bind(path: Path) -> None:
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(str(path))  # the socket file stays after close

    assert refusal(tmp_path, "listeners.yaml", bind) == (
        f"{tmp_path}/listeners.yaml: a socket, not a regular file (not opened)"
    )


def test_device_is_refused(tmp_path: Path) -> None:
    assert refusal(tmp_path, "listeners.yaml", lambda p: p.symlink_to("/dev/zero")) == (
        f"{tmp_path}/listeners.yaml: a character device, not a regular file (not opened)"
    )


def test_special_files_without_a_config_suffix_are_skipped(tmp_path: Path) -> None:
    write(tmp_path, "clusters.yaml", CLUSTER_WEB)
    os.mkfifo(tmp_path / "notes")
    assert [r.name for r in load_directory(tmp_path)] == ["web"]


# --- Contents -------------------------------------------------------------------------------


def test_non_utf8_bytes_are_refused_with_their_line_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "clusters.yaml"
    path.write_bytes(CLUSTER_WEB.replace("name: web", "name: w\xe9b").encode("latin-1"))
    assert str(only_problem(tmp_path)) == (
        f"{path}:3: not UTF-8 text: byte 0xe9 at offset 83 (invalid continuation byte)"
    )


def test_crlf_line_ends_read_as_before(tmp_path: Path) -> None:
    (tmp_path / "clusters.yaml").write_bytes(CLUSTER_WEB.replace("\n", "\r\n").encode())
    (resource,) = load_directory(tmp_path)
    assert (resource.name, str(resource.location)) == ("web", f"{tmp_path}/clusters.yaml:2")


# --- Size limits --------------------------------------------------------------------------


def test_file_over_the_size_limit_is_refused_unread(tmp_path: Path) -> None:
    write(tmp_path, "clusters.yaml", CLUSTER_WEB)
    big = sparse(tmp_path / "big.yaml", 50 * 1024 * 1024)  # NUL bytes: would not parse if read
    assert str(only_problem(tmp_path)) == f"{big}: 52,428,800 bytes, over the 32 MiB limit per file"


def test_entry_replaced_by_a_fifo_after_listing_is_refused_unopened_for_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "clusters.yaml", CLUSTER_WEB)
    listed = inputs.inspect(path)
    path.unlink()
    os.mkfifo(path)
    monkeypatch.setattr(inputs, "inspect", lambda path: listed)
    with fails_if_blocked(), pytest.raises(inputs.UnreadableError) as caught:
        inputs.read_text(path)
    assert caught.value.problem.message == "a FIFO (named pipe), not a regular file (not opened)"


def test_directory_over_the_total_limit_is_refused_before_reading_anything(
    tmp_path: Path,
) -> None:
    for name in ("a.yaml", "b.yaml", "c.yaml"):
        sparse(tmp_path / name, 30 * 1024 * 1024)  # each under the limit per file
    (tmp_path / "d.yaml").symlink_to("missing.yaml")
    assert [str(p) for p in problems_of(tmp_path)] == [
        f"{tmp_path}/d.yaml: dangling symlink (to missing.yaml, which is missing)",
        f"{tmp_path}: 94,371,840 bytes in 3 config files, over the 64 MiB limit per directory",
    ]


# --- Aliases and nesting ------------------------------------------------------------------


def test_alias_bomb_is_refused_before_anything_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "clusters.yaml", BILLION_LAUGHS)

    def never(*args: object) -> None:
        raise AssertionError("the bomb was built")

    monkeypatch.setattr(yaml_source._Builder, "__init__", never)
    problem = only_problem(tmp_path)
    assert str(problem) == (
        f"{path}:6: aliases add over 1,000,000 values, the limit per file (alias bomb?)"
    )


def test_large_honest_file_is_not_refused_as_an_alias_bomb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Values written out count nothing toward the alias limit, however many there are.

    The limit is scaled down so that a quick test writes 15 times more values than it; by
    hand, 100,000 such clusters (1.6 million values, 29 MiB) load with the real limit."""
    monkeypatch.setattr(inputs, "MAX_ALIAS_VALUES", 2_000)
    write(tmp_path, "clusters.yaml", honest_clusters(2_000))
    assert len(load_directory(tmp_path)) == 2_000
    aliased = "resources:\n- &c {name: c0}\n" + "- *c\n" * 2_001
    with pytest.raises(YamlSourceError, match="aliases add over 2,000 values"):
        parse_text(aliased)


def test_nesting_deeper_than_the_limit_is_refused(tmp_path: Path) -> None:
    deep = "[" * 101 + "]" * 101
    write(tmp_path, "a.yaml", f"resources: {deep}\n")
    # A surrogate-pair escape: PyYAML refuses it, so the json module reads this file.
    write(tmp_path, "b.json", f'{{"resources": {deep}, "x": "\\ud83d\\ude00"}}\n')
    assert [str(p) for p in problems_of(tmp_path)] == [
        f"{tmp_path}/a.yaml:1: nested deeper than 100 levels, the limit per file",
        f"{tmp_path}/b.json: nested deeper than 100 levels, the limit per file",
    ]
    assert parse_text("[" * 101 + "]" * 101).value is not None  # innermost list: level 100
    with pytest.raises(YamlSourceError, match="nested deeper than 100 levels"):
        parse_text("[" * 102 + "]" * 102)


def test_alias_that_nests_too_deep_is_refused() -> None:
    chain = "a: &a " + "[" * 60 + "]" * 60 + "\nb: " + "[" * 60 + "*a" + "]" * 60 + "\n"
    with pytest.raises(YamlSourceError, match="nested deeper than 100 levels"):
        parse_text(chain)


# --- All or nothing -----------------------------------------------------------------------


def test_every_refused_entry_is_reported_together_and_nothing_loads(tmp_path: Path) -> None:
    write(tmp_path, "clusters.yaml", CLUSTER_WEB)
    (tmp_path / "listeners.yaml").symlink_to("gone.yaml")
    os.mkfifo(tmp_path / "routes.yaml")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "secrets.yaml").write_bytes(b"resources: [\xff]\n")
    with fails_if_blocked(), pytest.raises(ConfigError) as caught:
        load_directory(tmp_path)
    assert [str(p) for p in caught.value.problems] == [
        f"{tmp_path}/listeners.yaml: dangling symlink (to gone.yaml, which is missing)",
        f"{tmp_path}/routes.yaml: a FIFO (named pipe), not a regular file (not opened)",
        f"{tmp_path}/sub/secrets.yaml:1: not UTF-8 text: byte 0xff at offset 12 "
        "(invalid start byte)",
    ]


def test_unreadable_overlay_is_refused_by_its_reason(tmp_path: Path) -> None:
    write(tmp_path, "clusters.yaml", CLUSTER_WEB)
    (tmp_path / "environments").mkdir()
    (tmp_path / "environments" / "prod.yaml").symlink_to("prod-v2.yaml")
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path, "prod")
    assert [str(p) for p in caught.value.problems] == [
        f"{tmp_path}/environments/prod.yaml: dangling symlink (to prod-v2.yaml, which is missing)"
    ]
    assert [r.name for r in load_config(tmp_path).resources] == ["web"]  # no --env: not read
