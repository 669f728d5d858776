"""The store's owner lock: one server per store file.

Two servers on one SQLite file would each keep their own idea of every group's pointers and
rollouts in memory and serve them, so the fleet would split between two `stable`s. `serve`
therefore takes an exclusive `flock` on a lock file beside the store (`xdscp.db.lock`, mode
0600) before it opens the store, and holds it for its lifetime; the kernel drops it when the
process ends, however it ends, so a crash leaves no stale lock behind. The file holds the
owner's pid, for the message a second server gets. The lock is advisory and on a file of its
own: a reader of the database itself (sqlite3, backups) is never blocked by it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from controlplane.store import StoreError, files

LOCK_SUFFIX = ".lock"
_PID_BYTES = 32  # what is read back of a lock file: a pid, never more
_PID_LIMIT = 2**22  # PID_MAX_LIMIT of 64-bit Linux: no pid reaches it


class StoreLock:
    """Held from `acquire` until `release` (or the process ends)."""

    def __init__(self, store_path: Path, fd: int) -> None:
        self.store_path = store_path
        self.path = lock_path(store_path)
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, store_path: Path) -> StoreLock:
        """Take the lock of the store at `store_path`; StoreError naming the store (and the
        owner's pid, if it wrote one) when another process holds it."""
        path = lock_path(store_path)
        try:
            fd = files.open_owner_only(path)
        except OSError as error:
            raise StoreError(
                f"cannot open the store's lock file {path}: {error.strerror}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_pid(fd)
            os.close(fd)
            by = f" (pid {owner})" if owner is not None else ""
            raise StoreError(
                f"store {store_path} is in use by another xdscp server{by}, which holds {path}: "
                "two servers on one store would disagree on what is stable; stop that one, or "
                "give this one another --store"
            ) from None
        except OSError as error:
            os.close(fd)
            raise StoreError(f"cannot lock {path}: {error.strerror}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(store_path, fd)

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # the pid no longer holds it; the file itself stays
        os.close(fd)  # closing the last descriptor of the file drops the flock


def lock_path(store_path: Path) -> Path:
    return store_path.with_name(store_path.name + LOCK_SUFFIX)


def _read_pid(fd: int) -> int | None:
    """The pid the owner wrote, if the file holds one and nothing else."""
    try:
        text = os.pread(fd, _PID_BYTES, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() and 0 < int(text) < _PID_LIMIT else None
