"""Wiring only: build the store, the xDS and admin servers, the HTTP endpoint; run; drain."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import secrets
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog

from controlplane import memory, resources, tls
from controlplane.admin import limits as admin_limits
from controlplane.admin.auth import AdminTokens, RoleInterceptor
from controlplane.admin.http import HttpEndpoint
from controlplane.admin.service import MUTATING_METHODS, AdminService, asks_for_secrets
from controlplane.admin.v1 import admin_pb2_grpc
from controlplane.observability import grpc_core_log
from controlplane.observability.fleet_view import ControlPlaneView
from controlplane.observability.metrics import CONTENT_TYPE, Metrics
from controlplane.replicas.replica import Replica
from controlplane.rollout.controller import RolloutController
from controlplane.rollout.policy import RolloutPolicy
from controlplane.rollout.probe import XdsEndpoint
from controlplane.store import SnapshotStore
from controlplane.store.lock import StoreLock
from controlplane.store.pg_url import DatabaseUrl, redact
from controlplane.store.postgres import PostgresStore
from controlplane.store.sealing import Sealer
from controlplane.store.sqlite import SQLiteStore
from controlplane.xds.assignments import Assignments
from controlplane.xds.evidence import FleetEvidence
from controlplane.xds.first_sync import DEFAULT_FIRST_SYNC_TIMEOUT_SECONDS
from controlplane.xds.fleet import Fleet
from controlplane.xds.limits import MAX_REQUEST_BYTES
from controlplane.xds.ordering import DEFAULT_WARMING_TIMEOUT_SECONDS
from controlplane.xds.server import KEEPALIVE_OPTIONS, LogRateLimit, XdsServer

log = structlog.get_logger("app")

DEFAULT_STORE = Path(".xdscp") / "xdscp.db"
HANDSHAKE_LOG_INTERVAL_SECONDS = 1.0  # per reason: a flood of bad clients is one line a second
REPLICA_ID = re.compile(r"[A-Za-z0-9._-]{1,63}")
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

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False  # a host name: it may resolve to anything


@dataclass(frozen=True)
class Config:
    xds_address: Address = Address("127.0.0.1", 18000)
    admin_address: Address = Address("127.0.0.1", 18001)
    http_address: Address = Address("127.0.0.1", 18002)
    store_path: Path = DEFAULT_STORE
    # --store postgresql://...: the store is this database, and store_path is unused.
    database: DatabaseUrl | None = None
    # Tokens and the xDS Unix socket: beside the SQLite file, or here (default .xdscp)
    # when the store is a database.
    state_dir: Path | None = None
    # With a database: this replica's name among those sharing it (default: host name and 6
    # random hex digits).
    replica_id: str | None = None
    drain_seconds: float = 5.0
    # How long listeners and routes wait for Envoy to ACK (warm) the clusters sent before them.
    warming_timeout: float = DEFAULT_WARMING_TIMEOUT_SECONDS
    # How long a node starting empty may take to ACK every type it is served (first_sync.py).
    first_sync_timeout: float = DEFAULT_FIRST_SYNC_TIMEOUT_SECONDS
    # xDS on a Unix socket too: reachable from a probe Envoy in its own network namespace.
    xds_socket: Path | None = None
    policies: dict[str, RolloutPolicy] = field(default_factory=dict)
    admin_token_file: Path | None = None  # write role; default: admin-token beside the store
    admin_read_token_file: Path | None = None  # default: admin-read-token beside the store
    store_key_file: Path | None = None  # seal the store's secrets with this key
    # TLS on the xDS and admin ports (one certificate); a client CA makes a port mTLS.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    xds_client_ca: Path | None = None  # mTLS on xDS: node identity from the certificate
    admin_client_ca: Path | None = None
    trust_domain: str | None = None  # of the SPIFFE IDs and DNS names nodes present
    allow_plaintext: bool = False  # plaintext on a non-loopback address (warned at start)

    def __post_init__(self) -> None:
        """Make the store and socket paths absolute, once (the probe's Envoy runs in a
        directory of its own); refuse combinations that would serve less securely than
        they read."""
        object.__setattr__(self, "store_path", Path(os.path.abspath(self.store_path)))
        if self.state_dir is not None and self.database is None:
            raise ValueError(
                "--state-dir is for a database --store: with a SQLite file, tokens and the "
                "socket sit beside it"
            )
        if self.replica_id is not None and self.database is None:
            raise ValueError("--replica-id is for a database --store: SQLite has one server")
        if self.replica_id is not None and not REPLICA_ID.fullmatch(self.replica_id):
            raise ValueError(
                f"--replica-id {self.replica_id[:80]!r}: 1 to 63 letters, digits, '.', '_' or '-'"
            )
        if self.database is not None and self.replica_id is None:
            replica = f"{socket.gethostname()[:56]}-{secrets.token_hex(3)}"
            object.__setattr__(self, "replica_id", re.sub(r"[^A-Za-z0-9._-]", "-", replica))
        state_dir = self.state_dir or DEFAULT_STORE.parent
        object.__setattr__(self, "state_dir", Path(os.path.abspath(state_dir)))
        if self.xds_socket is not None:
            object.__setattr__(self, "xds_socket", Path(os.path.abspath(self.xds_socket)))
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_cert is None and (self.xds_client_ca or self.admin_client_ca):
            raise ValueError("a client CA (mTLS) needs --tls-cert and --tls-key")
        if (self.xds_client_ca is None) != (self.trust_domain is None):
            raise ValueError(
                "--tls-client-ca and --trust-domain go together: node identity is read from "
                "client certificates in that trust domain"
            )
        if self.tls_cert is None and not self.allow_plaintext:
            for flag, address in (
                ("--xds-address", self.xds_address),
                ("--admin-address", self.admin_address),
            ):
                if not address.is_loopback:
                    raise ValueError(
                        f"{flag} {address.grpc_target()} is not a loopback address: serve it "
                        "with TLS (--tls-cert, --tls-key) or allow plaintext explicitly "
                        "(--allow-plaintext)"
                    )

    @property
    def local_dir(self) -> Path:
        """Where this server's own files go: tokens and the xDS Unix socket."""
        if self.database is None:
            return self.store_path.parent
        assert self.state_dir is not None  # made absolute in __post_init__
        return self.state_dir

    @property
    def store_name(self) -> str:
        """The store as logs show it: the file, or the URL without its password."""
        return str(self.store_path) if self.database is None else redact(self.database.url)

    @property
    def mtls(self) -> bool:
        return self.xds_client_ca is not None

    @property
    def unix_socket(self) -> Path | None:
        """--xds-socket, or one beside the store when a probe runs in its own namespace."""
        isolated = any(
            p.fresh_probe is not None and p.fresh_probe.isolate_network
            for p in self.policies.values()
        )
        # With TLS on xDS the probe (which has no certificate) uses the Unix socket.
        probes = any(p.fresh_probe is not None for p in self.policies.values())
        if self.xds_socket is None and (isolated or (self.tls_cert is not None and probes)):
            return self.local_dir / "xds.sock"
        return self.xds_socket

    @property
    def token_path(self) -> Path:
        return self.admin_token_file or self.local_dir / "admin-token"

    @property
    def read_token_path(self) -> Path:
        return self.admin_read_token_file or self.local_dir / "admin-read-token"


class BindError(RuntimeError):
    pass


class ControlPlane:
    """Owns the lifecycle: start, serve until told to stop, drain with a timeout."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.store_lock, self.store = _open_store(config)
        self.assignments = Assignments()
        self.fleet = Fleet()
        self.assignments.subscribe(self.fleet.wake_all)
        self.metrics = Metrics()
        self.evidence = FleetEvidence(self.fleet, self.assignments, config.replica_id or "")
        self.controller = RolloutController(
            self.store,
            self.assignments,
            self.fleet,
            config.policies,
            metrics=self.metrics,
            evidence=self.evidence,
        )
        self.replica: Replica | None = None
        if isinstance(self.store, PostgresStore):
            assert config.replica_id is not None  # set in Config.__post_init__
            self.replica = Replica(
                config.replica_id, self.store, self.controller, self.evidence, self.metrics
            )
        self.metrics.watch(
            ControlPlaneView(self.fleet, self.assignments, self.store, self.controller)
        )
        self.ready = False
        self._trimmer: asyncio.Task[None] | None = None
        self.bound: dict[str, Address] = {}
        self.tls: dict[str, tls.ReloadingServerCredentials] = {}
        if config.tls_cert is not None and config.tls_key is not None:
            for port, client_ca in (
                ("xds", config.xds_client_ca),
                ("admin", config.admin_client_ca),
            ):
                files = tls.TlsFiles(config.tls_cert, config.tls_key, client_ca)
                self.tls[port] = tls.ReloadingServerCredentials(
                    files, port, self.metrics.tls_loaded
                )
        self._handshake_log = LogRateLimit(HANDSHAKE_LOG_INTERVAL_SECONDS)
        self._handshake_log_lock = threading.Lock()
        grpc_core_log.subscribe(self._handshake_failed)
        # so_reuseport off: a second xdscp on the same port must fail, not split the fleet.
        self._xds = grpc.aio.server(
            handlers=XdsServer(
                self.assignments,
                self.fleet,
                self.metrics,
                warming_timeout=config.warming_timeout,
                first_sync_timeout=config.first_sync_timeout,
                trust_domain=config.trust_domain,
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
                RoleInterceptor(
                    AdminTokens.load(config.token_path, config.read_token_path),
                    MUTATING_METHODS,
                    asks_for_secrets,
                    self.metrics.admin_refused,
                )
            ],
            options=[("grpc.so_reuseport", 0), *admin_limits.GRPC_OPTIONS],
        )
        admin_pb2_grpc.add_AdminServicer_to_server(
            AdminService(
                self.controller,
                self.store,
                self.fleet,
                self.assignments,
                evidence=self.evidence,
                commands=self.replica.commands if self.replica is not None else None,
            ),
            self._admin,
        )
        self._http = HttpEndpoint(
            {
                "/healthz": lambda: (200, "text/plain", b"ok\n"),
                "/readyz": self._readiness,
                "/metrics": lambda: (200, CONTENT_TYPE, self.metrics.exposition()),
            }
        )

    def _readiness(self) -> tuple[int, str, bytes]:
        if not self.ready:
            return 503, "text/plain", b"not ready\n"
        body = self.replica.readiness() if self.replica is not None else "ready\n"
        return 200, "text/plain", body.encode()

    async def start(self) -> None:
        """Bind (port 0 picks a free port; `self.bound` says which), load what the store
        holds, then serve."""
        resources.load_all_descriptors()
        xds = self._bind_grpc(self._xds, self.config.xds_address, self.tls.get("xds"))
        if self.config.unix_socket is not None:
            self._add_unix_socket(self.config.unix_socket)
        admin = self._bind_grpc(self._admin, self.config.admin_address, self.tls.get("admin"))
        self.controller.probe_xds = XdsEndpoint(
            # With TLS on xDS the probe (which has no certificate) uses the Unix socket.
            tcp=None if "xds" in self.tls else (_LOOPBACK.get(xds.host, xds.host), xds.port),
            unix_socket=self.config.unix_socket,
        )
        if self.replica is not None:
            await self.replica.start()  # as leader or follower; it runs the controller
        else:
            await self.controller.load()
        await self._xds.start()
        await self._admin.start()
        if self.config.unix_socket is not None:
            self.config.unix_socket.chmod(0o600)  # only this user may claim to be anyone
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
        if self.replica is None:
            self.controller.start()
        self._trimmer = asyncio.create_task(memory.release_periodically(self.fleet.names_in_use))
        self.ready = True
        log.info(
            "serving",
            xds_socket=str(self.config.unix_socket or ""),
            store=self.config.store_name,
            replica=self.config.replica_id or "",
            groups=self.assignments.groups(),
            rollout_policies=sorted(self.config.policies),
            admin_token_file=str(self.config.token_path),
            tls={port: str(c.files.cert) for port, c in self.tls.items()},
            mtls=[port for port, c in self.tls.items() if c.requires_client_certificate],
            trust_domain=self.config.trust_domain or "",
            **{name: address.grpc_target() for name, address in self.bound.items()},
        )
        for name, address in (("xds", xds), ("admin", admin)):
            if name not in self.tls and not address.is_loopback:
                log.warning(
                    "plaintext on a non-loopback address: anyone who can reach it is trusted",
                    port=name,
                    address=address.grpc_target(),
                )

    def _handshake_failed(self, reason: str, error: str) -> None:
        """Told by gRPC core's log (a thread of its own) of a TLS handshake it refused."""
        self.metrics.handshake_failures.labels(reason).inc()
        with self._handshake_log_lock:
            suppressed = self._handshake_log.allow(reason, time.monotonic())
        if suppressed is not None:
            log.warning("tls handshake refused", reason=reason, error=error, suppressed=suppressed)

    @staticmethod
    def _bind_grpc(
        server: grpc.aio.Server,
        address: Address,
        credentials: tls.ReloadingServerCredentials | None,
    ) -> Address:
        try:
            if credentials is None:
                port = server.add_insecure_port(address.grpc_target())
            else:
                port = server.add_secure_port(address.grpc_target(), credentials.credentials())
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
        grpc_core_log.unsubscribe(self._handshake_failed)
        if self._trimmer is not None:
            self._trimmer.cancel()
        log.info("draining", grace_seconds=self.config.drain_seconds, streams=len(self.fleet))
        if self.replica is not None:
            await self.replica.stop()
        else:
            await self.controller.stop()
        self.fleet.close_all()
        await asyncio.gather(
            self._xds.stop(self.config.drain_seconds), self._admin.stop(self.config.drain_seconds)
        )
        await self._http.stop()
        self.store.close()  # a PostgreSQL store's server lock goes with its connection
        if self.store_lock is not None:
            self.store_lock.release()
        log.info("stopped")


def _open_store(config: Config) -> tuple[StoreLock | None, SnapshotStore]:
    """The store `config` names, held by this server alone (see lock.py, postgres.py)."""
    key_file = config.store_key_file
    sealer = Sealer.from_key_file(key_file) if key_file else None
    if config.database is not None:
        from controlplane.store.postgres import PostgresStore  # psycopg only when used

        return None, PostgresStore(config.database, sealer=sealer)
    lock = StoreLock.acquire(config.store_path)  # one server per store
    try:
        return lock, SQLiteStore(config.store_path, sealer=sealer)
    except BaseException:
        lock.release()
        raise


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
