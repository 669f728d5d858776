"""A TCP proxy for HTTP/2 (gRPC) that cuts a large call off after the server has handled it.

Each connection is forwarded both ways, frame by frame. On a connection whose client sent at
least `min_request_bytes` of DATA (a Publish carrying config, not a small read), the first
HEADERS frame the server sends on a stream (its answer: a gRPC server sends it once the
handler has returned) is not forwarded; the proxy closes both sides instead. So the server
did the work, and the client never hears about it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Self

from tests.integration.harness import free_port

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS = 0x0, 0x1
_FRAME_HEADER = 9


class CutOffProxy:
    def __init__(self, upstream: str, min_request_bytes: int) -> None:
        host, port = upstream.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._min_request_bytes = min_request_bytes
        self.port = free_port()
        self.cut = threading.Event()  # set once a call was cut off
        self.connections = 0  # accepted so far
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._sockets: list[socket.socket] = [self._listener]
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Self:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        with self._lock:
            for sock in self._sockets:
                _close(sock)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            server = socket.create_connection(self._upstream, timeout=10)
            server.settimeout(None)
            with self._lock:
                self._sockets += [client, server]
            sent = [0]  # DATA bytes the client sent on this connection
            threading.Thread(
                target=self._pump, args=(client, server, sent, True), daemon=True
            ).start()
            threading.Thread(
                target=self._pump, args=(server, client, sent, False), daemon=True
            ).start()

    def _pump(
        self, source: socket.socket, sink: socket.socket, sent: list[int], from_client: bool
    ) -> None:
        buffer = b""
        preface_left = len(_PREFACE) if from_client else 0
        try:
            while chunk := source.recv(65536):
                buffer += chunk
                if preface_left:
                    taken = min(preface_left, len(buffer))
                    sink.sendall(buffer[:taken])
                    buffer, preface_left = buffer[taken:], preface_left - taken
                while len(buffer) >= _FRAME_HEADER:
                    length = int.from_bytes(buffer[:3], "big")
                    if len(buffer) < _FRAME_HEADER + length:
                        break
                    kind = buffer[3]
                    stream = int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
                    frame, buffer = (
                        buffer[: _FRAME_HEADER + length],
                        buffer[_FRAME_HEADER + length :],
                    )
                    if from_client and kind == _DATA:
                        sent[0] += length
                    if (
                        not from_client
                        and kind == _HEADERS
                        and stream
                        and sent[0] >= self._min_request_bytes
                    ):
                        self.cut.set()
                        raise ConnectionAbortedError("cut off")
                    sink.sendall(frame)
        except OSError:
            pass
        finally:
            _close(source)
            _close(sink)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
