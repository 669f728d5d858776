"""Sample HTTP backends for the example edge: one tiny server per backend address.

Every GET, HEAD or POST is answered 200 with `backend=NAME address=HOST:PORT path=PATH`, so
a request through Envoy shows which backend it reached. `scripts/serve-example` starts it
with `--config examples/config`: one server for every endpoint of every cluster that a route
sends HTTP to (the SSH bastion and the rate-limit service are not HTTP backends, and no
route names them). SIGINT or SIGTERM stops every server and exits 0.

    python examples/backend.py --config examples/config
    python examples/backend.py api=127.0.0.1:8082 web=127.0.0.1:8081
"""

from __future__ import annotations

import argparse
import http.server
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

MAX_BACKENDS = 64  # a config naming more is refused: this is a sample, not a load generator


class Backend(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, name: str, host: str, port: int) -> None:
        self.name = name
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), Handler)
        self.label = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Handler(http.server.BaseHTTPRequestHandler):
    server: Backend

    def _answer(self, body: bool) -> None:
        text = f"backend={self.server.name} address={self.server.label} path={self.path}\n"
        payload = text.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 <= length <= 1 << 20:
            self.send_error(413, "request body over 1 MiB")
            return
        self.rfile.read(length)
        self._answer(body=True)

    def log_message(self, format: str, *args: object) -> None:
        pass


def routed_backends(config: Path) -> Iterator[tuple[str, str, int]]:
    """(cluster, host, port) of every endpoint of every cluster a route of `config` names."""
    from controlplane import resources
    from controlplane.config.environments import load_environment

    loaded = load_environment(config)
    routed: set[str] = set()
    for resource in loaded:
        if resource.type_url != resources.ROUTE:
            continue
        for host in resource.message.virtual_hosts:
            for route in host.routes:
                if route.route.cluster:
                    routed.add(route.route.cluster)
                routed.update(c.name for c in route.route.weighted_clusters.clusters)
    for resource in loaded:
        if resource.type_url != resources.ENDPOINT or resource.name not in routed:
            continue
        for locality in resource.message.endpoints:
            for lb_endpoint in locality.lb_endpoints:
                address = lb_endpoint.endpoint.address.socket_address
                yield resource.name, address.address, address.port_value


def parse_pair(text: str) -> tuple[str, str, int]:
    name, _, address = text.partition("=")
    host, _, port = address.rpartition(":")
    if not name or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: want NAME=HOST:PORT")
    return name, host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="serve every routed backend of this config")
    parser.add_argument("backends", nargs="*", type=parse_pair, metavar="NAME=HOST:PORT")
    args = parser.parse_args(argv)
    wanted = list(args.backends)
    if args.config is not None:
        wanted += sorted(set(routed_backends(args.config)))
    if not wanted:
        parser.error("no backends: give --config DIR or NAME=HOST:PORT")
    if len(wanted) > MAX_BACKENDS:
        parser.error(f"{len(wanted)} backends, over the limit of {MAX_BACKENDS}")
    servers: list[Backend] = []
    try:
        for name, host, port in wanted:
            servers.append(Backend(name, host, port))
    except OSError as error:
        print(f"backend.py: cannot listen on {host}:{port} for {name}: {error}", file=sys.stderr)
        for server in servers:
            server.server_close()
        return 1
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print("backends: " + ", ".join(f"{s.name}={s.label}" for s in servers), flush=True)
    while not stop.wait(1):
        pass
    for server in servers:
        server.shutdown()
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
