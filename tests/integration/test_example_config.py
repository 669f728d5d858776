"""examples/config, as shipped, on a real Envoy: host/path routing, IPv6, SSH with PROXY
protocol in and out, and per-route rate limits."""

from __future__ import annotations

import http.client
import re
import shutil
import socket
import struct
import threading
import time
from pathlib import Path

from tests.integration.harness import REPO, free_port, http_get, wait_for

PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
CLIENT_BEHIND_BALANCER = ("203.0.113.7", 40000)  # a documentation address, only ever in a header


def proxy_v2_header(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A PROXY protocol v2 header for a TCP over IPv4 connection, as a load balancer sends it."""
    addresses = socket.inet_aton(source[0]) + socket.inet_aton(destination[0])
    ports = struct.pack("!HH", source[1], destination[1])
    return PROXY_V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", 12) + addresses + ports


def proxy_v2_source(header: bytes) -> tuple[str, int]:
    """The client address a PROXY protocol v2 (TCP over IPv4) header carries."""
    assert header.startswith(PROXY_V2_SIGNATURE) and header[13] == 0x11, header
    return socket.inet_ntoa(header[16:20]), struct.unpack("!H", header[24:26])[0]


def copy_with_ports(destination: Path, ports: dict[int, int]) -> Path:
    """examples/config with its fixed ports swapped for ones free on this machine."""
    shutil.copytree(REPO / "examples/config", destination)
    for path in destination.glob("*.yaml"):
        text = re.sub(
            r"port_value: (\d+)",
            lambda m: f"port_value: {ports[int(m.group(1))]}",
            path.read_text(),
        )
        path.write_text(text)
    return destination


class FirstBytes:
    """A TCP upstream that records the first bytes each connection sends."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(10)
        self.port = self.sock.getsockname()[1]
        self.received = b""
        self._thread = threading.Thread(target=self._accept_one, daemon=True)
        self._thread.start()

    def _accept_one(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(5)
            self.received = conn.recv(64)

    def close(self) -> None:
        self.sock.close()


def example_ports(http_port: int, **upstream_ports: int) -> dict[int, int]:
    """The example's fixed ports mapped onto run-time ones; the rate-limit service's gets a
    free port where nothing listens, so the global limit fails open as when it is down."""
    return {
        10080: http_port,
        10022: upstream_ports.get("ssh", free_port()),
        8081: upstream_ports["web"],
        8082: upstream_ports["api"],
        8083: upstream_ports["static"],
        2222: upstream_ports.get("ssh_bastion", free_port()),
        8089: free_port(),
    }


def test_example_edge_routes_by_host_and_path_over_ipv4_and_ipv6(
    control_plane, upstream, start_envoy, tmp_path
) -> None:
    web, api, static = upstream("web"), upstream("api"), upstream("static")
    ssh = FirstBytes()
    http_port, ssh_port = free_port(), free_port()
    ports = example_ports(
        http_port,
        ssh=ssh_port,
        web=web.port,
        api=api.port,
        static=static.port,
        ssh_bastion=ssh.port,
    )
    config = copy_with_ports(tmp_path / "config", ports)
    control_plane.xdsctl("publish", str(config), "--message", "examples")
    envoy = start_envoy("edge-1", "edge", control_plane.xds_port)

    def through(host: str, path: str, address: str = "127.0.0.1") -> str:
        status, body = http_get(f"http://{address}:{http_port}{path}", headers={"Host": host})
        return body if status == 200 else f"HTTP {status}"

    wait_for(lambda: through("www.example.com", "/") == "backend=web path=/\n", what="web")
    assert through("api.example.com", "/v1/users") == "backend=api path=/v1/users\n"
    assert through("example.com", "/static/app.js") == "backend=static path=/static/app.js\n"
    assert through("anything.test", "/") == "backend=web path=/\n"
    assert through("api.example.com", "/", address="[::1]") == "backend=api path=/\n"

    with socket.create_connection(("127.0.0.1", ssh_port), timeout=5) as client:
        client.sendall(proxy_v2_header(CLIENT_BEHIND_BALANCER, ("127.0.0.1", ssh_port)))
        client.sendall(b"SSH-2.0-test\r\n")
        wait_for(lambda: ssh.received, timeout=10, what="PROXY header at the SSH upstream")
    assert proxy_v2_source(ssh.received) == CLIENT_BEHIND_BALANCER
    ssh.close()

    _, listeners = envoy.admin("/listeners")
    assert sorted(line.split("::", 1)[0] for line in listeners.split()) == [
        "edge_http",
        "edge_http_ipv6",
        "edge_ssh",
    ]
    assert envoy.cluster_names() >= {"web", "api", "static", "ssh_bastion", "ratelimit"}


def test_a_drained_route_answers_429_while_other_routes_keep_their_own_buckets(
    control_plane, upstream, start_envoy, tmp_path
) -> None:
    web, api, static = upstream("web"), upstream("api"), upstream("static")
    http_port = free_port()
    ports = example_ports(http_port, web=web.port, api=api.port, static=static.port)
    config = copy_with_ports(tmp_path / "config", ports)
    control_plane.xdsctl("publish", str(config), "--message", "examples")
    envoy = start_envoy("edge-1", "edge", control_plane.xds_port)
    connection = http.client.HTTPConnection("127.0.0.1", http_port, timeout=5)

    def get(host: str, path: str = "/") -> tuple[int, str]:
        connection.request("GET", path, headers={"Host": host})
        response = connection.getresponse()
        return response.status, response.read().decode()

    wait_for(lambda: get("www.example.com")[0] == 200, what="the web route")
    # Drain the api GET route's bucket; bounded in count and time, whatever the machine's speed.
    answers: list[tuple[int, str]] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(answers) < 5000:
        answers.append(get("api.example.com", "/v1/users"))
        if answers[-1][0] != 200:
            break
    assert answers[-1] == (429, "local_rate_limited"), answers[-3:]
    assert answers[0] == (200, "backend=api path=/v1/users\n")
    assert [get("www.example.com") for _ in range(5)] == [(200, "backend=web path=/\n")] * 5
    connection.close()

    stats = envoy.stats()
    assert int(stats["api_read.http_local_rate_limit.rate_limited"]) >= 1
    assert int(stats["web_read.http_local_rate_limit.rate_limited"]) == 0
    # The global limit asked the (absent) rate-limit service and let the requests through.
    assert int(stats["cluster.api.ratelimit.failure_mode_allowed"]) >= 1
