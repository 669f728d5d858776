"""The traffic checks' Prometheus client against a real Prometheus (the answer shapes it must
read) and against a hostile HTTP server (the limits it must keep)."""

from __future__ import annotations

import http.server
import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from controlplane.rollout.traffic import MAX_ANSWER_BYTES, PrometheusClient, TrafficError, render
from tests.integration.harness import Prometheus
from tests.unit.test_traffic_gate import example_traffic


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    server = Prometheus(tmp_path_factory.mktemp("prometheus"), {}).start()
    yield server
    server.stop()


@pytest.mark.parametrize(
    ("query", "value"),
    [
        ("vector(0.25)", 0.25),
        ("scalar(vector(3))", 3.0),
        ("vector(1) / vector(0)", math.inf),
        ("vector(0) / vector(0)", None),  # NaN: a ratio with no traffic is no data
        ('up{job="nothing-scraped"}', None),  # an empty vector: no data
    ],
)
def test_real_prometheus_answers_give_one_value_or_no_data(
    prometheus: Prometheus, query: str, value: float | None
) -> None:
    assert PrometheusClient(prometheus.url, 5).query(query) == value


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("sum(", "HTTP 400 from http://127.0.0.1:"),
        ("sum(", "bad_data: "),  # Prometheus' own reason
        ('vector(1) or label_replace(vector(2), "a", "b", "", "")', "returned 2 series"),
        ('"text"', "returned a 'string'"),
    ],
)
def test_real_prometheus_answers_that_are_not_one_number_are_errors(
    prometheus: Prometheus, query: str, message: str
) -> None:
    with pytest.raises(TrafficError) as caught:
        PrometheusClient(prometheus.url, 5).query(query)
    assert message in str(caught.value)


def test_the_example_policy_queries_are_valid_promql(
    prometheus: Prometheus, tmp_path: Path
) -> None:
    traffic = example_traffic(tmp_path)
    assert traffic is not None
    client = PrometheusClient(prometheus.url, 5)
    for check in traffic.checks:
        query = render(check.query, canaries=["edge-1.a"], group="edge", window_seconds=10)
        assert client.query(query) is None, query  # parsed and run; nothing scraped yet


Handler = Callable[[http.server.BaseHTTPRequestHandler], None]


@pytest.fixture
def hostile() -> Iterator[Callable[[Handler], str]]:
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(answer: Handler) -> str:
        class Server(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                # Read the form first: closing with it unread would reset the connection.
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                answer(self)

            def log_message(self, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Server)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_a_redirect_is_not_followed(hostile) -> None:  # type: ignore[no-untyped-def]
    followed = threading.Event()

    def elsewhere(request: http.server.BaseHTTPRequestHandler) -> None:
        followed.set()

    target = hostile(elsewhere)

    def redirect(request: http.server.BaseHTTPRequestHandler) -> None:
        request.send_response(307)
        request.send_header("Location", f"{target}/api/v1/query")
        request.send_header("Content-Length", "0")
        request.end_headers()

    with pytest.raises(TrafficError, match="HTTP 307 from"):
        PrometheusClient(hostile(redirect), 2).query("up")
    assert not followed.is_set()


def test_an_answer_over_the_size_limit_is_refused(hostile) -> None:  # type: ignore[no-untyped-def]
    def huge(request: http.server.BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.end_headers()
        chunk = b" " * 65536
        try:
            for _ in range(MAX_ANSWER_BYTES // len(chunk) + 2):
                request.wfile.write(chunk)
        except OSError:
            pass  # the client hung up, as it should

    with pytest.raises(TrafficError, match=f"over {MAX_ANSWER_BYTES} bytes"):
        PrometheusClient(hostile(huge), 5).query("up")


def test_an_answer_dripping_slower_than_the_timeout_is_cut_off(hostile) -> None:  # type: ignore[no-untyped-def]
    def drip(request: http.server.BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.end_headers()
        try:
            for _ in range(100):
                request.wfile.write(b" ")
                request.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass

    # Each byte comes well within the socket timeout; only the deadline for the whole
    # exchange stops it (without it, 10 s of spaces would end in "not JSON").
    with pytest.raises(TrafficError, match="longer than timeout_seconds"):
        PrometheusClient(hostile(drip), 1).query("up")


def test_an_unreachable_prometheus_is_an_error_naming_the_url() -> None:
    with pytest.raises(TrafficError, match=r"cannot reach http://127\.0\.0\.1:9/api/v1/query"):
        PrometheusClient("http://127.0.0.1:9", 2).query("up")
