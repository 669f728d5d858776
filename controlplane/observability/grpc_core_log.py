"""gRPC core's own log lines, read so that TLS handshake refusals are logged and counted.

A client refused during the TLS handshake (no certificate, or one from another CA) never
reaches Python: gRPC core writes a line to file descriptor 2 and closes the connection.
`install()` makes fd 2 a pipe read by a thread that passes every byte on to the real stderr
unchanged and tells its subscribers of each handshake failure. Python's `sys.stderr` is
pointed at the real stderr directly, so Python's own output never goes through the pipe.
Only `xdsctl serve` installs it; without it, subscribers are simply never called.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import sys
import threading
from collections.abc import Callable

HandshakeListener = Callable[[str, str], None]  # (reason label, gRPC core's error text)

_HANDSHAKE_FAILED = re.compile(rb"Handshake failed with (?:fatal )?error (\S+): (.*)")
# gRPC core's error text -> a bounded metric label
_REASONS = (
    (b"PEER_DID_NOT_RETURN_A_CERTIFICATE", "no_client_certificate"),
    (b"CERTIFICATE_VERIFY_FAILED", "untrusted_certificate"),
    (b"CERTIFICATE_EXPIRED", "untrusted_certificate"),
    (b"WRONG_VERSION_NUMBER", "not_tls"),
    (b"HTTP_REQUEST", "not_tls"),
)
MAX_LINE_BYTES = 64 << 10  # a longer "line" is passed on but not parsed
EXIT_DRAIN_SECONDS = 1.0

_listeners: list[HandshakeListener] = []
_installed = False


def subscribe(listener: HandshakeListener) -> None:
    _listeners.append(listener)


def unsubscribe(listener: HandshakeListener) -> None:
    if listener in _listeners:
        _listeners.remove(listener)


def install() -> None:
    """Read fd 2 from here on (once per process)."""
    global _installed
    if _installed:
        return
    real_stderr = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    sys.stderr.flush()
    sys.stderr = open(real_stderr, "w", buffering=1, closefd=False)  # noqa: SIM115
    pump = threading.Thread(
        target=_pump, args=(read_end, real_stderr), name="grpc-core-log", daemon=True
    )
    pump.start()
    atexit.register(_restore, real_stderr, pump)
    _installed = True


def _restore(real_stderr: int, pump: threading.Thread) -> None:
    """At exit: fd 2 is the real stderr again, and what is still in the pipe is passed on."""
    os.dup2(real_stderr, 2)  # the pipe's last writer is gone: the pump reads to its end
    pump.join(timeout=EXIT_DRAIN_SECONDS)


def _pump(read_end: int, real_stderr: int) -> None:
    pending = b""
    while chunk := os.read(read_end, 65536):
        _write_all(real_stderr, chunk)
        pending += chunk
        *lines, pending = pending.split(b"\n")
        if len(pending) > MAX_LINE_BYTES:
            pending = b""
        for line in lines:
            parse_line(line)


def parse_line(line: bytes) -> None:
    """Tell the subscribers if `line` is gRPC core's report of a failed TLS handshake."""
    match = _HANDSHAKE_FAILED.search(line)
    if match is None:
        return
    text = match.group(2)
    reason = next((label for marker, label in _REASONS if marker in text), "handshake_failed")
    for listener in list(_listeners):
        with contextlib.suppress(Exception):  # a listener's bug must not stop stderr
            listener(reason, text.decode(errors="replace")[:1024])


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            written = os.write(fd, data)
        except OSError:
            return
        data = data[written:]
