"""The store's files on disk: readable by their owner only, from their first byte.

A directory xdscp creates for the store is mode 0700. The database file is created 0600
before SQLite opens it, and SQLite (on Unix) gives each file it makes beside the database
(-wal, -shm, -journal) the database file's mode, so none of them is ever wider. A store file
found with group or other permission bits is tightened to 0600 at open, with a warning.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import structlog

log = structlog.get_logger("store")

FILE_MODE = 0o600
DIRECTORY_MODE = 0o700
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


def prepare(path: Path) -> None:
    """Make the database at `path` ready for SQLite to open: its directory exists, the file
    exists, and neither it nor SQLite's files beside it are open to group or other."""
    _make_directories(path.parent)
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT, FILE_MODE))  # an existing file is kept
    for file in (path, *(path.with_name(path.name + suffix) for suffix in SQLITE_SIDE_FILES)):
        _tighten(file)


def open_owner_only(path: Path) -> int:
    """A read-write descriptor of `path`, created 0600 (in 0700 directories) if missing and
    tightened to 0600 if it was open to group or other."""
    _make_directories(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    _tighten(path)
    return fd


def _make_directories(directory: Path) -> None:
    """Like `mkdir -p`, but every directory made is 0700 (Path.mkdir gives `mode` only to
    the last one)."""
    missing: list[Path] = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for made in reversed(missing):
        made.mkdir(mode=DIRECTORY_MODE, exist_ok=True)


def _tighten(file: Path) -> None:
    try:
        mode = stat.S_IMODE(file.stat().st_mode)
    except FileNotFoundError:
        return
    if mode & 0o077:
        file.chmod(FILE_MODE)
        log.warning(
            "store file was open to group or other; tightened to 0600",
            file=str(file),
            old_mode=f"{mode:04o}",
        )
