"""examples/config, as shipped, on a real Envoy: host/path routing, IPv6, SSH with PROXY
protocol in and out, and per-route rate limits."""

from __future__ import annotations

import http.client
import http.server
import re
import shutil
import socket
import struct
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

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


class RecordingRateLimitService(rls_pb2_grpc.RateLimitServiceServicer):
    """A rate-limit service on a free loopback port: records each request's domain and
    descriptors, and answers OVER_LIMIT for the routes in `over_limit`."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, list[dict[str, str]]]] = []
        self.over_limit: set[str] = set()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        rls_pb2_grpc.add_RateLimitServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def ShouldRateLimit(self, request, context):
        descriptors = [{e.key: e.value for e in d.entries} for d in request.descriptors]
        self.requests.append((request.domain, descriptors))
        routes = {d.get("route") for d in descriptors}
        code = rls_pb2.RateLimitResponse.OK
        if routes & self.over_limit:
            code = rls_pb2.RateLimitResponse.OVER_LIMIT
        return rls_pb2.RateLimitResponse(overall_code=code)

    def stop(self) -> None:
        self.server.stop(grace=None).wait(timeout=5)


class ForwardedFor(http.server.ThreadingHTTPServer):
    """A loopback HTTP backend that records the X-Forwarded-For of each request."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        seen = self.seen

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append(self.headers.get("X-Forwarded-For", ""))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def raw_get(port: int, host: str, proxy_line: bytes = b"") -> bytes:
    """The status line of a GET sent on a new connection, after `proxy_line` if any."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(proxy_line + f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        return client.makefile("rb").readline().rstrip()


def test_http_takes_the_client_address_from_a_proxy_header_into_the_global_limit(
    control_plane, upstream, start_envoy, tmp_path
) -> None:
    web, static, api = upstream("web"), upstream("static"), ForwardedFor()
    limiter = RecordingRateLimitService()
    try:
        http_port = free_port()
        ports = example_ports(http_port, web=web.port, api=api.port, static=static.port)
        ports[8089] = limiter.port
        config = copy_with_ports(tmp_path / "config", ports)
        control_plane.xdsctl("publish", str(config), "--message", "examples")
        start_envoy("edge-1", "edge", control_plane.xds_port)
        header = b"PROXY TCP4 %s 127.0.0.1 %d %d\r\n" % (
            CLIENT_BEHIND_BALANCER[0].encode(),
            CLIENT_BEHIND_BALANCER[1],
            http_port,
        )

        wait_for(lambda: raw_get(http_port, "api.example.com", header).endswith(b" 200 OK"))
        assert api.seen[-1] == CLIENT_BEHIND_BALANCER[0]
        assert limiter.requests[-1] == (
            "edge",
            [{"route": "api_read", "remote_address": CLIENT_BEHIND_BALANCER[0]}],
        )
        # Without a PROXY header the connection's own peer counts (in X-Forwarded-For, Envoy
        # puts the host's address for a loopback peer).
        assert raw_get(http_port, "api.example.com").endswith(b" 200 OK")
        assert api.seen[-1] not in ("", CLIENT_BEHIND_BALANCER[0])
        assert limiter.requests[-1][1] == [{"route": "api_read", "remote_address": "127.0.0.1"}]

        limiter.over_limit.add("api_read")
        assert raw_get(http_port, "api.example.com", header).endswith(b" 429 Too Many Requests")
        assert raw_get(http_port, "www.example.com", header).endswith(b" 200 OK")
        assert limiter.requests[-1][1] == [
            {"route": "web_read", "remote_address": CLIENT_BEHIND_BALANCER[0]}
        ]
    finally:
        limiter.stop()
        api.stop()
