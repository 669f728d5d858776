"""Fresh probe: a throwaway Envoy that starts from nothing on a candidate snapshot.

Why: a config change can work on every running Envoy and still stop every *freshly started*
Envoy from ever becoming ready (a running Envoy keeps its old listener while a new one warms
forever; a fresh Envoy's server init waits for that warming and never goes LIVE). Canaries
that were already running cannot see this, so the canary gate starts one Envoy from nothing.

How `run_probe` works:

1. A fresh temp dir (named after the probe's node id) holds a generated bootstrap
   (`probe_bootstrap`, a pure function), the Envoy log, and two Unix sockets: `admin.sock`
   (Envoy's admin, so the probe needs no TCP port) and, with a check, `check.sock`.
2. Envoy starts with node id `xdscp-probe-<group>-<8 hex>`, node.cluster = the group and
   node metadata marking it as a probe (the gate treats it as a canary and serves it the
   candidate). CDS and LDS come over ADS from xdscp, over TCP or the Unix socket.
3. Ready means both: xdscp's view says the node ACKed every type it was sent (`is_synced`),
   and Envoy's own `GET /ready` answers 200 `LIVE`. Both are polled until
   `ready_timeout_seconds`; an early exit of Envoy fails at once with its log tail.
4. The optional HTTP check goes to `check.sock`, a static listener in the bootstrap whose
   tcp_proxy forwards to the candidate listener's own address (0.0.0.0 -> 127.0.0.1,
   :: -> ::1), so the request is answered by the candidate's listener, filter chain and routes.
5. Envoy is always stopped (SIGTERM, then SIGKILL) and the temp dir removed, also when the
   caller cancels `run_probe`.

Isolation (`isolate_network`): Envoy runs in a network namespace of its own
(`unshare --net`, loopback brought up, needs root or CAP_SYS_ADMIN). The candidate's listener
ports then cannot collide with Envoys already running on the host, and the check reaches
exactly the probe's listener: Unix sockets are files, so `check.sock`, `admin.sock` and
xdscp's xDS socket cross the namespace boundary, while the tcp_proxy inside the namespace
connects to the namespace's own loopback. The same isolation means the probe reaches no
upstream and no DNS server: a check should exercise something the listener answers itself
(e.g. a `direct_response` route). Without isolation, a check on a port another Envoy on the
host also listens on (Envoy binds listeners with SO_REUSEPORT) may be answered by that Envoy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from controlplane import resources
from controlplane.snapshot import Snapshot

PROBE_METADATA: Mapping[str, str] = MappingProxyType({"xdscp.probe": "true"})
XDS_CLUSTER = "xdscp"  # as in deploy/envoy/bootstrap-ads.yaml: a candidate may name it
CHECK_NAME = "xdscp_probe_check"  # the check's static listener and cluster
POLL_SECONDS = 0.15
REQUEST_TIMEOUT_SECONDS = 2.0  # one admin or check request
CHECK_TIMEOUT_SECONDS = 5.0  # the check's retries on connection failures, at least this long
STOP_TIMEOUT_SECONDS = 5.0  # SIGTERM -> SIGKILL, and SIGKILL -> reaped
PREFLIGHT_TIMEOUT_SECONDS = 5.0
VERSION_TIMEOUT_SECONDS = 10.0  # `envoy --version` at start-up
LOG_TAIL_LINES = 20  # of the probe Envoy's log, in a failed probe's report
LOG_TAIL_BYTES = 4096  # at most this much of it (the log's end; longer lines are cut)
MAX_SOCKET_PATH = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
_NETNS_SHIM = 'ip link set lo up && exec "$0" "$@"'
_TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


@dataclass(frozen=True)
class HttpCheck:
    listener: str  # name of a Listener in the candidate
    path: str = "/"
    host: str = ""  # Host header; empty: the listener's address
    expect_status: int = 200


@dataclass(frozen=True)
class ProbeConfig:
    envoy_binary: Path  # absolute: the probe runs in a temp dir of its own
    ready_timeout_seconds: float = 30.0
    isolate_network: bool = False  # own network namespace; xDS then goes over the Unix socket
    check: HttpCheck | None = None

    def __post_init__(self) -> None:
        _require_absolute("envoy_binary", self.envoy_binary)


@dataclass(frozen=True)
class XdsEndpoint:
    tcp: tuple[str, int] | None = None  # host, port
    unix_socket: Path | None = None  # absolute: Envoy resolves it from its own directory

    def __post_init__(self) -> None:
        if self.unix_socket is not None:
            _require_absolute("unix_socket", self.unix_socket)


def _require_absolute(name: str, path: Path) -> None:
    if not path.is_absolute():
        raise ValueError(f"the probe's {name} must be an absolute path, not {path}")


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    node_id: str
    reason: str  # "ready", or why not
    seconds: float
    log_tail: str  # last lines of the probe Envoy's log
    pid: int | None = None  # the probe Envoy's process (gone by the time this is returned)
    workdir: Path | None = None  # its temp dir (removed by the time this is returned)

    def report(self) -> str:
        """The reason, and for a failure the end of Envoy's log (bounded: LOG_TAIL_BYTES)."""
        if self.ok or not self.log_tail:
            return self.reason
        return f"{self.reason}\nenvoy log (last lines):\n{self.log_tail}"


class ProbeSetupError(ValueError):
    """The probe cannot be set up as asked (e.g. the check names no listener with a port)."""


@dataclass(frozen=True)
class _Paths:
    workdir: Path

    @property
    def bootstrap(self) -> Path:
        return self.workdir / "bootstrap.json"

    @property
    def log(self) -> Path:
        return self.workdir / "envoy.log"

    @property
    def admin_socket(self) -> Path:
        return self.workdir / "admin.sock"

    @property
    def check_socket(self) -> Path:
        return self.workdir / "check.sock"


# --- bootstrap (pure) ---------------------------------------------------------------------


def new_node_id(group: str) -> str:
    return f"xdscp-probe-{group}-{secrets.token_hex(4)}"


def check_target(candidate: Snapshot, listener_name: str) -> tuple[str, int]:
    """Where the candidate listener `listener_name` listens, as reachable over loopback."""
    listener = candidate.resources(resources.LISTENER).get(listener_name)
    if listener is None:
        raise ProbeSetupError(f"check listener {listener_name!r} is not in the candidate")
    address = listener.message().address  # type: ignore[attr-defined]
    if not address.HasField("socket_address") or not address.socket_address.port_value:
        raise ProbeSetupError(
            f"check listener {listener_name!r} has no socket address with a port_value"
        )
    host = address.socket_address.address
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return host, address.socket_address.port_value


def probe_bootstrap(
    config: ProbeConfig,
    *,
    node_id: str,
    group: str,
    metadata: Mapping[str, str],
    candidate: Snapshot,
    xds: XdsEndpoint,
    workdir: Path,
) -> dict[str, Any]:
    """The probe Envoy's bootstrap. Raises ProbeSetupError if it cannot be built."""
    paths = _Paths(workdir)
    _require_socket_path(paths.admin_socket)
    static: dict[str, list[dict[str, Any]]] = {"clusters": [_xds_cluster(config, xds)]}
    if config.check is not None:
        host, port = check_target(candidate, config.check.listener)
        _require_socket_path(paths.check_socket)
        static["clusters"].append(_static_cluster(CHECK_NAME, _socket_address(host, port)))
        static["listeners"] = [_check_listener(paths.check_socket)]
    return {
        "node": {"id": node_id, "cluster": group, "metadata": dict(metadata)},
        "admin": {"address": _pipe(paths.admin_socket)},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [
                    {
                        "envoy_grpc": {
                            "cluster_name": XDS_CLUSTER,
                            "retry_policy": {
                                "retry_back_off": {"base_interval": "0.1s", "max_interval": "0.5s"}
                            },
                        }
                    }
                ],
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": static,
    }


def _require_socket_path(path: Path) -> None:
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ProbeSetupError(f"Unix socket path longer than {MAX_SOCKET_PATH} bytes: {path}")


def _pipe(path: Path) -> dict[str, Any]:
    return {"pipe": {"path": str(path)}}


def _socket_address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _xds_address(config: ProbeConfig, xds: XdsEndpoint) -> dict[str, Any]:
    if config.isolate_network or xds.tcp is None:
        if xds.unix_socket is None:
            raise ProbeSetupError("isolate_network needs xDS on a Unix socket (xdscp --xds-socket)")
        _require_socket_path(xds.unix_socket)
        return _pipe(xds.unix_socket)
    return _socket_address(*xds.tcp)


def _xds_cluster(config: ProbeConfig, xds: XdsEndpoint) -> dict[str, Any]:
    cluster = _static_cluster(XDS_CLUSTER, _xds_address(config, xds))
    cluster["typed_extension_protocol_options"] = {
        _HTTP_OPTIONS: {
            "@type": "type.googleapis.com/" + _HTTP_OPTIONS,
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
    return cluster


def _static_cluster(name: str, address: dict[str, Any]) -> dict[str, Any]:
    endpoint = {"endpoint": {"address": address}}
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [endpoint]}]},
    }


def _check_listener(path: Path) -> dict[str, Any]:
    proxy = {"@type": _TCP_PROXY, "stat_prefix": CHECK_NAME, "cluster": CHECK_NAME}
    return {
        "name": CHECK_NAME,
        "address": _pipe(path),
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": proxy}]}
        ],
    }


def envoy_command(config: ProbeConfig, paths: _Paths) -> list[str]:
    """argv of the probe Envoy, wrapped in `unshare --net` when isolating."""
    envoy = [
        str(config.envoy_binary),
        "-c",
        str(paths.bootstrap),
        "--use-dynamic-base-id",
        "--concurrency",
        "1",
        "-l",
        "warning",
        "--drain-time-s",
        "1",
    ]
    if not config.isolate_network:
        return envoy
    # unshare and sh exec in place: the pid we get is Envoy's, and SIGTERM reaches it.
    return ["unshare", "--net", "--", "sh", "-c", _NETNS_SHIM, *envoy]


# --- running it ---------------------------------------------------------------------------


async def run_probe(
    config: ProbeConfig,
    *,
    group: str,
    candidate: Snapshot,
    xds: XdsEndpoint,
    is_synced: Callable[[str], bool],
    metadata: Mapping[str, str] = PROBE_METADATA,
) -> ProbeResult:
    """Start a fresh Envoy on `candidate`; ok when it is synced, LIVE and passes the check.

    `is_synced(node_id)` is called on the event loop: it must be quick and must not block.
    """
    started = time.monotonic()
    node_id = new_node_id(group)

    def result(
        reason: str | None, log_tail: str = "", pid: int | None = None, workdir: Path | None = None
    ) -> ProbeResult:
        seconds = round(time.monotonic() - started, 3)
        ok = reason is None
        return ProbeResult(ok, node_id, reason or "ready", seconds, log_tail, pid, workdir)

    problem = _preflight_problem(config) or (
        await _isolation_problem() if config.isolate_network else None
    )
    if problem:
        return result(problem)
    paths = _Paths(Path(tempfile.mkdtemp(prefix=f"{node_id}-")).absolute())
    process: asyncio.subprocess.Process | None = None
    try:
        try:
            bootstrap = probe_bootstrap(
                config,
                node_id=node_id,
                group=group,
                metadata=metadata,
                candidate=candidate,
                xds=xds,
                workdir=paths.workdir,
            )
        except ProbeSetupError as error:
            return result(str(error), workdir=paths.workdir)
        paths.bootstrap.write_text(json.dumps(bootstrap, indent=2))
        process = await _start(config, paths)
        deadline = started + config.ready_timeout_seconds
        reason = await _wait_ready(config, process, paths, node_id, is_synced, deadline)
        if reason is None and config.check is not None:
            target = check_target(candidate, config.check.listener)
            reason = await _run_check(config.check, target, paths, process, deadline)
        return result(reason, _log_tail(paths.log), process.pid, paths.workdir)
    finally:
        try:
            if process is not None:
                await _stop(process)
        finally:
            shutil.rmtree(paths.workdir, ignore_errors=True)


def envoy_binary_problem(binary: Path) -> str | None:
    """Why `binary` cannot serve as the probe's Envoy (missing, not executable, or its
    `--version` fails within VERSION_TIMEOUT_SECONDS), or None. Blocks: run at start-up."""
    if not binary.is_file():
        return "no such file" if not binary.exists() else "not a regular file"
    if not os.access(binary, os.X_OK):
        return "not executable"
    try:
        ran = subprocess.run(
            [str(binary), "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=VERSION_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"`--version` did not finish within {VERSION_TIMEOUT_SECONDS:g}s"
    except OSError as error:
        return f"cannot run it: {error.strerror or error}"
    if ran.returncode != 0:
        output = (ran.stderr or ran.stdout).decode(errors="replace").strip()[-500:]
        return f"`--version` exited with {ran.returncode}" + (f": {output}" if output else "")
    return None


def _preflight_problem(config: ProbeConfig) -> str | None:
    if not os.access(config.envoy_binary, os.X_OK):
        return f"envoy binary {config.envoy_binary} is missing or not executable"
    if config.isolate_network:
        missing = [tool for tool in ("unshare", "ip") if shutil.which(tool) is None]
        if missing:
            return f"isolate_network needs {' and '.join(missing)} on PATH (util-linux, iproute2)"
    return None


def network_isolation_problem() -> str | None:
    """Why a probe cannot get a network namespace of its own here (start-up check), or None.
    Call it where no event loop runs."""
    missing = [tool for tool in ("unshare", "ip") if shutil.which(tool) is None]
    if missing:
        return f"needs {' and '.join(missing)} on PATH (util-linux, iproute2)"
    return asyncio.run(_isolation_problem())


async def _isolation_problem() -> str | None:
    """Why a network namespace cannot be made here, or None if it can."""
    try:
        process = await asyncio.create_subprocess_exec(
            "unshare",
            "--net",
            "--",
            "sh",
            "-c",
            "ip link set lo up",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as error:
        return f"isolate_network: cannot run unshare: {error}"
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), PREFLIGHT_TIMEOUT_SECONDS)
    except TimeoutError:
        return "isolate_network: unshare --net did not finish"
    finally:
        await _stop(process)
    if process.returncode != 0:
        detail = stderr.decode(errors="replace").strip()
        return (
            f"isolate_network: unshare --net failed (needs root or CAP_SYS_ADMIN), "
            f"exit {process.returncode}: {detail}"
        )
    return None


async def _start(config: ProbeConfig, paths: _Paths) -> asyncio.subprocess.Process:
    with paths.log.open("ab") as log:
        return await asyncio.create_subprocess_exec(
            *envoy_command(config, paths),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            cwd=paths.workdir,
        )


async def _wait_ready(
    config: ProbeConfig,
    process: asyncio.subprocess.Process,
    paths: _Paths,
    node_id: str,
    is_synced: Callable[[str], bool],
    deadline: float,
) -> str | None:
    """None once synced and LIVE; else why not (exited, or not there by the deadline)."""
    state = "no answer on the admin socket"
    while True:
        if process.returncode is not None:
            return _exit_reason(process, paths)
        budget = min(REQUEST_TIMEOUT_SECONDS, max(deadline - time.monotonic(), POLL_SECONDS))
        state = await _server_state(paths.admin_socket, budget) or state
        if state == "LIVE" and is_synced(node_id):  # asked only once LIVE: it may cost more
            return None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        await _sleep_unless_exited(process, min(POLL_SECONDS, remaining))
    timeout = f"{config.ready_timeout_seconds:g}s"
    if state != "LIVE":
        waiting = await _unready_init_targets(paths.admin_socket)
        detail = f"; waiting for: {', '.join(waiting)}" if waiting else ""
        return f"not LIVE after {timeout} (server state: {state}{detail})"
    return f"LIVE but not synced after {timeout} (xdscp saw no ACK of every type it sent)"


async def _sleep_unless_exited(process: asyncio.subprocess.Process, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(process.wait(), seconds)


async def _server_state(admin_socket: Path, timeout: float) -> str | None:
    """Envoy's server state from `GET /ready` (LIVE, INITIALIZING, ...), None if no answer."""
    try:
        _, body = await _http_over_unix(admin_socket, "/ready", "localhost", timeout, True)
    except (OSError, TimeoutError, ValueError):
        return None
    return body.strip() or None


async def _unready_init_targets(admin_socket: Path) -> list[str]:
    """What Envoy's init managers still wait for (`GET /init_dump`), best effort."""
    try:
        _, body = await _http_over_unix(admin_socket, "/init_dump", "localhost", 1.0, True)
        dumps = json.loads(body).get("unready_targets_dumps", [])
        return [str(name) for dump in dumps for name in dump.get("target_names", [])]
    except (OSError, TimeoutError, ValueError, AttributeError):
        return []


async def _run_check(
    check: HttpCheck,
    target: tuple[str, int],
    paths: _Paths,
    process: asyncio.subprocess.Process,
    deadline: float,
) -> str | None:
    """None if the listener answers the expected status; retries connection failures only."""
    host, port = target
    host_header = check.host or (f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    what = f"check {check.listener} GET {check.path}"
    check_deadline = max(deadline, time.monotonic() + CHECK_TIMEOUT_SECONDS)
    while True:
        if process.returncode is not None:
            return _exit_reason(process, paths)
        try:
            status, _ = await _http_over_unix(
                paths.check_socket, check.path, host_header, REQUEST_TIMEOUT_SECONDS
            )
        except (OSError, TimeoutError, ValueError) as error:
            if time.monotonic() >= check_deadline:
                return f"{what} failed: {_describe(error)}"
            await _sleep_unless_exited(process, POLL_SECONDS)
            continue
        if status == check.expect_status:
            return None
        return f"{what} returned {status}, expected {check.expect_status}"


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__


async def _http_over_unix(
    socket_path: Path, path: str, host: str, timeout: float, read_body: bool = False
) -> tuple[int, str]:
    """One HTTP/1.1 GET over a Unix socket: (status, body if asked). Raises on any failure."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_unix_connection(str(socket_path))
        try:
            request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
            writer.write(request.encode())
            await writer.drain()
            status = _parse_status(await reader.readline())
            body = b""
            if read_body:  # Connection: close, so the response ends at EOF
                head, _, body = (await reader.read()).partition(b"\r\n\r\n")
                if b"transfer-encoding: chunked" in head.lower():
                    body = _dechunk(body)
            return status, body.decode(errors="replace")
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def _parse_status(line: bytes) -> int:
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise ValueError(f"no HTTP status line (got {line[:80]!r})")
    return int(parts[1])


def _dechunk(data: bytes) -> bytes:
    """The payload of a chunked HTTP/1.1 body (Envoy's admin answers chunked)."""
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out


def _exit_reason(process: asyncio.subprocess.Process, paths: _Paths) -> str:
    """How Envoy exited, with its last log line (the report adds the rest of the tail)."""
    code = process.returncode
    how = f"signal {-code}" if code is not None and code < 0 else str(code)
    tail = _log_tail(paths.log, lines=1)
    return f"envoy exited with {how}: {tail}" if tail else f"envoy exited with {how}"


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES, limit: int = LOG_TAIL_BYTES) -> str:
    """The last `lines` lines of the file, at most `limit` bytes of its end; reads no more."""
    try:
        with path.open("rb") as file:
            file.seek(max(0, file.seek(0, os.SEEK_END) - limit))
            data = file.read(limit)
    except OSError:
        return ""
    text = data.decode(errors="replace").strip()
    return "\n".join(text.splitlines()[-lines:])


async def _stop(process: asyncio.subprocess.Process) -> None:
    """SIGTERM, wait, SIGKILL, wait; never raises but CancelledError (after a SIGKILL)."""
    try:
        await _signal_and_wait(process, signal.SIGTERM)
        await _signal_and_wait(process, signal.SIGKILL)
    except BaseException:
        _signal(process, signal.SIGKILL)  # cancelled while stopping: do not leave it running
        raise


async def _signal_and_wait(process: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    if process.returncode is None:
        _signal(process, sig)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT_SECONDS)


def _signal(process: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
