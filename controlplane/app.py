"""Wiring only: build the store, the xDS and admin servers, the HTTP endpoint; run; drain."""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog

from controlplane import memory, resources
from controlplane.admin import limits as admin_limits
from controlplane.admin.auth import TokenInterceptor, load_or_create_token
from controlplane.admin.http import HttpEndpoint
from controlplane.admin.service import MUTATING_METHODS, AdminService
from controlplane.admin.v1 import admin_pb2_grpc
from controlplane.observability.fleet_view import ControlPlaneView
from controlplane.observability.metrics import CONTENT_TYPE, Metrics
from controlplane.rollout.controller import RolloutController
from controlplane.rollout.policy import RolloutPolicy
from controlplane.rollout.probe import XdsEndpoint
from controlplane.store.sealing import Sealer
from controlplane.store.sqlite import SQLiteStore
from controlplane.xds.assignments import Assignments
from controlplane.xds.fleet import Fleet
from controlplane.xds.limits import MAX_REQUEST_BYTES
from controlplane.xds.ordering import DEFAULT_WARMING_TIMEOUT_SECONDS
from controlplane.xds.server import KEEPALIVE_OPTIONS, XdsServer

log = structlog.get_logger("app")

DEFAULT_STORE = Path(".xdscp") / "xdscp.db"
_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # a wildcard bind is reached on loopback


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
    # How long listeners and routes wait for Envoy to ACK (warm) the clusters sent before them.
    warming_timeout: float = DEFAULT_WARMING_TIMEOUT_SECONDS
    # xDS on a Unix socket too: reachable from a probe Envoy in its own network namespace.
    xds_socket: Path | None = None
    policies: dict[str, RolloutPolicy] = field(default_factory=dict)
    admin_token_file: Path | None = None  # default: admin-token beside the store
    store_key_file: Path | None = None  # seal the store's secrets with this key

    @property
    def unix_socket(self) -> Path | None:
        """--xds-socket, or one beside the store when a probe runs in its own namespace."""
        isolated = any(
            p.fresh_probe is not None and p.fresh_probe.isolate_network
            for p in self.policies.values()
        )
        if self.xds_socket is None and isolated:
            return self.store_path.parent / "xds.sock"
        return self.xds_socket

    @property
    def token_path(self) -> Path:
        return self.admin_token_file or self.store_path.parent / "admin-token"


class BindError(RuntimeError):
    pass


class ControlPlane:
    """Owns the lifecycle: start, serve until told to stop, drain with a timeout."""

    def __init__(self, config: Config) -> None:
        self.config = config
        key_file = config.store_key_file
        self.store = SQLiteStore(
            config.store_path, sealer=Sealer.from_key_file(key_file) if key_file else None
        )
        self.assignments = Assignments()
        self.fleet = Fleet()
        self.assignments.subscribe(self.fleet.wake_all)
        self.metrics = Metrics()
        self.controller = RolloutController(
            self.store, self.assignments, self.fleet, config.policies, metrics=self.metrics
        )
        self.metrics.watch(
            ControlPlaneView(self.fleet, self.assignments, self.store, self.controller)
        )
        self.ready = False
        self._trimmer: asyncio.Task[None] | None = None
        self.bound: dict[str, Address] = {}
        # so_reuseport off: a second xdscp on the same port must fail, not split the fleet.
        self._xds = grpc.aio.server(
            handlers=XdsServer(
                self.assignments,
                self.fleet,
                self.metrics,
                warming_timeout=config.warming_timeout,
            ).handlers(),
            options=[
                *KEEPALIVE_OPTIONS,
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                # A fleet reconnecting at once (after a restart) must not see its streams
                # cancelled because the default backlog of 1,000 unaccepted calls filled up.
                ("grpc.server.max_pending_requests", 100_000),
            ],
        )
        self._admin = grpc.aio.server(
            interceptors=[
                TokenInterceptor(load_or_create_token(config.token_path), MUTATING_METHODS)
            ],
            options=[("grpc.so_reuseport", 0), *admin_limits.GRPC_OPTIONS],
        )
        admin_pb2_grpc.add_AdminServicer_to_server(
            AdminService(self.controller, self.store, self.fleet), self._admin
        )
        self._http = HttpEndpoint(
            {
                "/healthz": lambda: (200, "text/plain", b"ok\n"),
                "/readyz": lambda: (
                    (200, "text/plain", b"ready\n")
                    if self.ready
                    else (503, "text/plain", b"not ready\n")
                ),
                "/metrics": lambda: (200, CONTENT_TYPE, self.metrics.exposition()),
            }
        )

    async def start(self) -> None:
        """Bind (port 0 picks a free port; `self.bound` says which), then serve."""
        resources.load_all_descriptors()
        await asyncio.to_thread(self.controller.load)
        xds = self._bind_grpc(self._xds, self.config.xds_address)
        if self.config.unix_socket is not None:
            self._add_unix_socket(self.config.unix_socket)
        admin = self._bind_grpc(self._admin, self.config.admin_address)
        await self._xds.start()
        await self._admin.start()
        try:
            http_port = await self._http.start(
                self.config.http_address.host, self.config.http_address.port
            )
        except OSError as error:
            target = self.config.http_address.grpc_target()
            raise BindError(f"cannot listen on {target}: {error.strerror}") from None
        self.bound = {
            "xds": xds,
            "admin": admin,
            "http": Address(self.config.http_address.host, http_port),
        }
        self.controller.probe_xds = XdsEndpoint(
            tcp=(_LOOPBACK.get(xds.host, xds.host), xds.port), unix_socket=self.config.unix_socket
        )
        self.controller.start()
        self._trimmer = asyncio.create_task(memory.release_periodically(self.fleet.names_in_use))
        self.ready = True
        log.info(
            "serving",
            xds_socket=str(self.config.unix_socket or ""),
            store=str(self.config.store_path),
            groups=self.assignments.groups(),
            rollout_policies=sorted(self.config.policies),
            admin_token_file=str(self.config.token_path),
            **{name: address.grpc_target() for name, address in self.bound.items()},
        )

    @staticmethod
    def _bind_grpc(server: grpc.aio.Server, address: Address) -> Address:
        try:
            port = server.add_insecure_port(address.grpc_target())
        except RuntimeError as error:
            raise BindError(f"cannot listen on {address.grpc_target()}: {error}") from None
        return Address(address.host, port)

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
        if self._trimmer is not None:
            self._trimmer.cancel()
        log.info("draining", grace_seconds=self.config.drain_seconds, streams=len(self.fleet))
        await self.controller.stop()
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
