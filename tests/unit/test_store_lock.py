"""The store's owner lock: a second holder is refused by name, a released lock is free."""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

import pytest

from controlplane.store import StoreError
from controlplane.store.lock import StoreLock, lock_path
from controlplane.store.sqlite import SQLiteStore


def test_a_second_holder_is_refused_naming_the_store_the_pid_and_the_lock_file(
    tmp_path: Path,
) -> None:
    store = tmp_path / "xdscp.db"
    first = StoreLock.acquire(store)
    with pytest.raises(StoreError) as caught:
        StoreLock.acquire(store)
    message = str(caught.value)
    assert message.startswith(
        f"store {store} is in use by another xdscp server (pid {os.getpid()}), "
        f"which holds {tmp_path / 'xdscp.db.lock'}: "
    )
    assert "--store" in message
    first.release()
    StoreLock.acquire(store).release()  # free again once released


def test_the_lock_file_is_owner_only_and_made_with_its_directories(tmp_path: Path) -> None:
    store = tmp_path / "new" / "dir" / "xdscp.db"
    lock = StoreLock.acquire(store)
    try:
        assert stat.S_IMODE(lock_path(store).stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700
        assert lock_path(store).read_text() == f"{os.getpid()}\n"
    finally:
        lock.release()
    assert lock_path(store).read_text() == ""


def test_a_lock_file_holding_no_pid_gives_no_pid(tmp_path: Path) -> None:
    store = tmp_path / "xdscp.db"
    lock_path(store).write_text("x" * 10_000)
    with lock_path(store).open("rb") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(StoreError, match=r"in use by another xdscp server, which holds"):
            StoreLock.acquire(store)


def test_the_lock_does_not_stop_readers_of_the_database(tmp_path: Path) -> None:
    store = tmp_path / "xdscp.db"
    SQLiteStore(store).close()
    lock = StoreLock.acquire(store)
    try:
        reader = SQLiteStore(store)
        assert reader.pointers() == {}
        reader.close()
    finally:
        lock.release()
