"""examples/config, as shipped, on a real Envoy: host/path routing, IPv6, SSH with PROXY v2."""

from __future__ import annotations

import re
import shutil
import socket
import threading
from pathlib import Path

from tests.integration.harness import REPO, free_port, http_get, wait_for

PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


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


def test_example_edge_routes_by_host_and_path_over_ipv4_and_ipv6(
    control_plane, upstream, start_envoy, tmp_path
) -> None:
    web, api, static = upstream("web"), upstream("api"), upstream("static")
    ssh = FirstBytes()
    http_port, ssh_port = free_port(), free_port()
    config = copy_with_ports(
        tmp_path / "config",
        {
            10080: http_port,
            10022: ssh_port,
            8081: web.port,
            8082: api.port,
            8083: static.port,
            2222: ssh.port,
        },
    )
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
        client.sendall(b"SSH-2.0-test\r\n")
        wait_for(lambda: ssh.received, timeout=10, what="PROXY header at the SSH upstream")
    assert ssh.received.startswith(PROXY_V2_SIGNATURE)
    ssh.close()

    _, listeners = envoy.admin("/listeners")
    assert sorted(line.split("::", 1)[0] for line in listeners.split()) == [
        "edge_http",
        "edge_http_ipv6",
        "edge_ssh",
    ]
    assert envoy.cluster_names() >= {"web", "api", "static", "ssh_bastion"}
