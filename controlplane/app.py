"""Wiring only: build the store, the xDS and admin servers, the HTTP endpoint; run; drain."""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog

from controlplane import resources
from controlplane.admin.http import HttpEndpoint
from controlplane.admin.service import AdminService
from controlplane.admin.v1 import admin_pb2_grpc
from controlplane.publish import Publisher
from controlplane.store.sqlite import SQLiteStore
from controlplane.xds.cache import ActiveSnapshots
from controlplane.xds.fleet import Fleet
from controlplane.xds.server import XdsServer

log = structlog.get_logger("app")

DEFAULT_STORE = Path(".xdscp") / "xdscp.db"


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Address:
        """'127.0.0.1:18000', '[::1]:18000' or ':18000' (every interface)."""
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"address {text!r} is not HOST:PORT")
        return cls(host.strip("[]") or "0.0.0.0", int(port))

    def grpc_target(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Config:
    xds_address: Address = Address("127.0.0.1", 18000)
    admin_address: Address = Address("127.0.0.1", 18001)
    http_address: Address = Address("127.0.0.1", 18002)
    store_path: Path = DEFAULT_STORE
    drain_seconds: float = 5.0
    # xDS on a Unix socket too: reachable from a probe Envoy in its own network namespace.
    xds_socket: Path | None = None


class BindError(RuntimeError):
    pass


class ControlPlane:
    """Owns the lifecycle: start, serve until told to stop, drain with a timeout."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = SQLiteStore(config.store_path)
        self.active = ActiveSnapshots()
        self.fleet = Fleet()
        self.active.subscribe(self.fleet.wake_all)
        self.publisher = Publisher(self.store, self.active)
        self.ready = False
        # so_reuseport off: a second xdscp on the same port must fail, not split the fleet.
        self._xds = grpc.aio.server(
            handlers=XdsServer(self.active, self.fleet).handlers(),
            options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 64 << 20)],
        )
        self._admin = grpc.aio.server(
            options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 256 << 20)]
        )
        admin_pb2_grpc.add_AdminServicer_to_server(
            AdminService(self.publisher, self.store, self.fleet), self._admin
        )
        self._http = HttpEndpoint(
            {
                "/healthz": lambda: (200, "text/plain", b"ok\n"),
                "/readyz": lambda: (
                    (200, "text/plain", b"ready\n")
                    if self.ready
                    else (503, "text/plain", b"not ready\n")
                ),
            }
        )

    async def start(self) -> None:
        resources.load_all_descriptors()
        loaded = await asyncio.to_thread(self.publisher.load_stable)
        for server, address in (
            (self._xds, self.config.xds_address),
            (self._admin, self.config.admin_address),
        ):
            try:
                server.add_insecure_port(address.grpc_target())
            except RuntimeError as error:
                raise BindError(f"cannot listen on {address.grpc_target()}: {error}") from None
            if server is self._xds and self.config.xds_socket is not None:
                self._add_unix_socket(self.config.xds_socket)
            await server.start()
        http = self.config.http_address
        try:
            await self._http.start(http.host, http.port)
        except OSError as error:
            raise BindError(f"cannot listen on {http.grpc_target()}: {error.strerror}") from None
        self.ready = True
        log.info(
            "serving",
            xds=self.config.xds_address.grpc_target(),
            xds_socket=str(self.config.xds_socket or ""),
            admin=self.config.admin_address.grpc_target(),
            http=self.config.http_address.grpc_target(),
            store=str(self.config.store_path),
            groups_loaded=loaded,
        )

    def _add_unix_socket(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)  # a stale socket from a previous run
        try:
            self._xds.add_insecure_port(f"unix:{path.resolve()}")
        except RuntimeError as error:
            raise BindError(f"cannot listen on unix:{path}: {error}") from None

    async def stop(self) -> None:
        """Stop taking work, end xDS streams (Envoys reconnect elsewhere), finish admin calls."""
        self.ready = False
        log.info("draining", grace_seconds=self.config.drain_seconds, streams=len(self.fleet))
        self.fleet.close_all()
        await asyncio.gather(
            self._xds.stop(self.config.drain_seconds), self._admin.stop(self.config.drain_seconds)
        )
        await self._http.stop()
        self.store.close()
        log.info("stopped")


async def run(config: Config) -> None:
    plane = ControlPlane(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await plane.start()
    except BaseException:
        await plane.stop()
        raise
    try:
        await stop.wait()
    finally:
        await plane.stop()
