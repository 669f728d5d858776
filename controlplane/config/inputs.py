"""Which entries of a config directory are read, and reading them within stated limits.

The job: list a config directory's files and read each one as text, so that every entry is
either read or refused with its path and the reason. Names starting with "." are skipped
(`.git`, editor files), as are files without a config suffix (a README). Directories are
walked, symlinked ones too. An entry with a config suffix must be a regular file, or a
symlink to one, holding UTF-8 text within the limits below. A symlink that leads nowhere
(dangling, or a loop) is refused whatever its name: it may have been a directory of config.
A FIFO, socket or device is never opened (opening a FIFO blocks): entries are classified
with `stat` first. Nothing here knows about YAML or Envoy.

Every limit on config input is stated here, and each refusal quotes the limit it broke.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")

_MIB = 1024 * 1024
# Checking costs about 75 bytes of memory and 2.5 µs per byte of YAML (a 29 MiB file of
# 100,000 clusters with endpoints: 2.2 GB, 75 s), so these bound a publish to about 5 GB.
MAX_FILE_BYTES = 32 * _MIB
MAX_DIRECTORY_BYTES = 64 * _MIB  # a directory's base files together (an overlay is one more)
# Values that aliases add beyond what is written ("billion laughs": a few lines of anchors
# that expand to millions of values). Values written out in full are bounded by file size.
MAX_ALIAS_VALUES = 1_000_000
MAX_DEPTH = 100  # nesting of mappings and lists; deeper input would exhaust Python's stack

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


@dataclass(frozen=True)
class InputProblem:
    path: Path
    message: str
    line: int | None = None  # 1-based


class UnreadableError(Exception):
    """A config file that is refused before its text reaches the parser."""

    def __init__(self, problem: InputProblem) -> None:
        super().__init__(problem.message)
        self.problem = problem


@dataclass(frozen=True)
class ConfigFile:
    path: Path
    size: int  # bytes, as `stat` gave it


@dataclass
class Listing:
    files: list[ConfigFile] = field(default_factory=list)  # sorted by their parts
    problems: list[InputProblem] = field(default_factory=list)

    def over_total(self, directory: Path) -> InputProblem | None:
        """A problem if the files together exceed MAX_DIRECTORY_BYTES."""
        total = sum(file.size for file in self.files)
        if total <= MAX_DIRECTORY_BYTES:
            return None
        message = (
            f"{total:,} bytes in {len(self.files)} config files, "
            f"over the {_mib(MAX_DIRECTORY_BYTES)} limit per directory"
        )
        return InputProblem(directory, message)


def config_files(directory: Path, skip: Path | None = None) -> Listing:
    """Config files under `directory` (except the subtree `skip`) and the entries refused."""
    listing = Listing()
    _walk(directory, {_identity(os.stat(directory)): directory}, skip, listing)
    listing.files.sort(key=lambda file: file.path.relative_to(directory).parts)
    return listing


def inspect(path: Path) -> ConfigFile | InputProblem:
    """`path` as a config file: a regular file, or a symlink to one, within MAX_FILE_BYTES."""
    status = _stat(path)
    if isinstance(status, InputProblem):
        return status
    problem = _file_problem(status)
    return ConfigFile(path, status.st_size) if problem is None else InputProblem(path, problem)


def read_text(path: Path) -> str:
    """The UTF-8 text of the config file `path`; raises UnreadableError naming the reason."""
    checked = inspect(path)
    if isinstance(checked, InputProblem):
        raise UnreadableError(checked)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise UnreadableError(InputProblem(path, f"cannot read: {error.strerror}")) from None
    with os.fdopen(fd, "rb") as file:
        # Checked again on the open file: the entry may have been replaced since `inspect`.
        problem = _file_problem(os.fstat(fd))
        data = file.read(MAX_FILE_BYTES + 1) if problem is None else b""
    if problem is None and len(data) > MAX_FILE_BYTES:
        problem = f"over {MAX_FILE_BYTES:,} bytes, the {_mib(MAX_FILE_BYTES)} limit per file"
    if problem is not None:
        raise UnreadableError(InputProblem(path, problem))
    return _decode(path, data)


def _walk(
    folder: Path, ancestors: dict[tuple[int, int], Path], skip: Path | None, listing: Listing
) -> None:
    try:
        with os.scandir(folder) as entries:
            names = sorted(entry.name for entry in entries)
    except OSError as error:
        listing.problems.append(InputProblem(folder, f"cannot list: {error.strerror}"))
        return
    for name in names:
        path = folder / name
        if name.startswith(".") or path == skip:
            continue
        status = _stat(path)
        if isinstance(status, InputProblem):
            listing.problems.append(status)
        elif stat.S_ISDIR(status.st_mode):
            identity = _identity(status)
            if identity in ancestors:
                message = f"symlink loop (leads back to {ancestors[identity]})"
                listing.problems.append(InputProblem(path, message))
            else:
                _walk(path, {**ancestors, identity: path}, skip, listing)
        elif path.suffix.lower() in CONFIG_SUFFIXES:
            problem = _file_problem(status)
            if problem is None:
                listing.files.append(ConfigFile(path, status.st_size))
            else:
                listing.problems.append(InputProblem(path, problem))


def _stat(path: Path) -> os.stat_result | InputProblem:
    """The status of what `path` leads to; a symlink that leads nowhere is a problem."""
    try:
        return os.stat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return InputProblem(path, "symlink loop")
        if os.path.islink(path) and error.errno in (errno.ENOENT, errno.ENOTDIR):
            return InputProblem(
                path, f"dangling symlink (to {os.readlink(path)}, which is missing)"
            )
        return InputProblem(path, f"cannot read: {error.strerror}")


def _file_problem(status: os.stat_result) -> str | None:
    if not stat.S_ISREG(status.st_mode):
        kind = next((name for test, name in _KINDS if test(status.st_mode)), "not a file")
        return f"{kind}, not a regular file (not opened)"
    if status.st_size > MAX_FILE_BYTES:
        return f"{status.st_size:,} bytes, over the {_mib(MAX_FILE_BYTES)} limit per file"
    return None


def _decode(path: Path, data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        byte = data[error.start : error.start + 1].hex()
        message = f"not UTF-8 text: byte 0x{byte} at offset {error.start:,} ({error.reason})"
        raise UnreadableError(InputProblem(path, message, line)) from None
    # Line ends as text-mode reading gives them.
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def _identity(status: os.stat_result) -> tuple[int, int]:
    return status.st_dev, status.st_ino


def _mib(limit: int) -> str:
    return f"{limit // _MIB} MiB"
