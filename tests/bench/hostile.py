"""Hostile xDS clients against xdscp while a healthy one is synced: numbers, never pass/fail.

    python -m tests.bench.hostile [--streams 50] [--workdir DIR]

Starts `xdsctl serve --log-level info` (tests/integration/harness.py), publishes the bench
config (tests/bench/config.py), connects one healthy ADS client that ACKs everything, then
runs each hostile case in turn, `--streams` hostile streams at a time from a thread pool.
For each case it prints:
- the worst and median `/healthz` latency seen while the case ran (polled every 20 ms from
  a process of its own; the hostile requests are built before the case starts);
- the server's RSS before the case, its peak during it, and after it (streams closed);
- the bytes the server wrote to its log during the case;
- how the hostile streams ended (gRPC status codes).
Then, after the server's periodic release (controlplane/memory.py), the settled RSS.
At the end the healthy client must receive the next publish: the exit status is 0 if it
did and every case ran, whatever the figures are.
"""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.synchronize
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2

from controlplane import memory
from controlplane.resources import CLUSTER, ENDPOINT
from controlplane.xds import limits
from tests.bench.config import write_config
from tests.integration.ads_client import AckingNode
from tests.integration.harness import XdsControlPlane, http_get, wait_for

ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
POLL_SECONDS = 0.02
STREAM_TIMEOUT_SECONDS = 60.0
SETTLE_SECONDS = 2 * memory.TRIM_INTERVAL_SECONDS + 2  # two releases


def _request(**fields: object) -> discovery_pb2.DiscoveryRequest:
    return discovery_pb2.DiscoveryRequest(**fields)  # type: ignore[arg-type]


def _node(i: int, **fields: object) -> base_pb2.Node:
    return base_pb2.Node(id=f"hostile-{i}", cluster="bench", **fields)  # type: ignore[arg-type]


def _nan_metadata() -> struct_pb2.Struct:
    metadata = struct_pb2.Struct()
    metadata["n"] = float("nan")
    return metadata


def names_at_limit(i: int) -> list[bytes]:
    names = [f"hostile-{i}-{k}" for k in range(limits.MAX_NAMES_PER_REQUEST)]
    return [_request(type_url=ENDPOINT, resource_names=names, node=_node(i)).SerializeToString()]


def names_over_limit(i: int) -> list[bytes]:
    names = [f"h{k}" for k in range(limits.MAX_NAMES_PER_REQUEST + 1)]
    return [_request(type_url=ENDPOINT, resource_names=names, node=_node(i)).SerializeToString()]


def nan_metadata(i: int) -> list[bytes]:
    node = _node(i, metadata=_nan_metadata())
    return [_request(type_url=CLUSTER, node=node).SerializeToString()]


def malformed(i: int) -> list[bytes]:
    return [b"\xff\xff\xff" * (i + 1)]


def oversized(i: int) -> list[bytes]:
    name = "x" * 4000
    count = limits.MAX_REQUEST_BYTES // 4000 + 10
    return [_request(type_url=ENDPOINT, resource_names=[name] * count).SerializeToString()]


@dataclass(frozen=True)
class Case:
    name: str
    streams: int  # how many hostile streams in all
    requests: Callable[[int], list[bytes]] | None = None  # what each stream sends
    nacks: int = 0  # instead: subscribe to CDS, then NACK it this many times


def cases(streams: int) -> list[Case]:
    return [
        Case(
            f"{streams} streams x {limits.MAX_NAMES_PER_REQUEST:,} names", streams, names_at_limit
        ),
        Case("names over the limit", streams * 4, names_over_limit),
        Case("NaN in node.metadata", streams * 4, nan_metadata),
        Case("malformed bytes", streams * 20, malformed),
        Case("messages over 16 MiB", 10, oversized),
        Case("one node NACKing 375 times with 60 KiB texts", 1, nacks=375),
    ]


class Watch:
    """Polls /healthz and the server's RSS from a process of its own while a case runs, so
    that the hostile clients' threads (and this process's GIL) do not delay the polls."""

    def __init__(self, plane: XdsControlPlane) -> None:
        assert plane.process is not None
        context = multiprocessing.get_context("spawn")  # no fork: this process runs gRPC
        self._stop = context.Event()
        self._results: multiprocessing.Queue[tuple[list[float], int]] = context.Queue()
        self._process = context.Process(
            target=_watch,
            args=(plane.http_port, plane.process.pid, self._stop, self._results),
            daemon=True,
        )
        self.latencies: list[float] = []
        self.peak_rss_kib = 0

    def __enter__(self) -> Watch:
        self._process.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.latencies, self.peak_rss_kib = self._results.get(timeout=30)
        self._process.join(timeout=10)


def _watch(
    http_port: int,
    pid: int,
    stop: multiprocessing.synchronize.Event,
    results: multiprocessing.Queue[tuple[list[float], int]],
) -> None:
    url = f"http://127.0.0.1:{http_port}/healthz"
    latencies: list[float] = []
    peak = 0
    while not stop.is_set():
        started = time.perf_counter()
        status, _ = http_get(url, timeout=10)
        if status == 200:
            latencies.append(time.perf_counter() - started)
        peak = max(peak, _rss_of(pid))
        time.sleep(POLL_SECONDS)
    results.put((latencies, peak))


def rss_kib(plane: XdsControlPlane) -> int:
    assert plane.process is not None
    return _rss_of(plane.process.pid)


def _rss_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def run_stream(channel: grpc.Channel, payloads: list[bytes]) -> str:
    """Send `payloads` on one ADS stream; how it ended (a gRPC status code name)."""
    call = channel.stream_stream(ADS, request_serializer=None, response_deserializer=None)
    responses = call(iter(payloads), timeout=STREAM_TIMEOUT_SECONDS)
    try:
        for _ in responses:
            return "answered"
        return "OK"
    except grpc.RpcError as error:
        return error.code().name  # type: ignore[no-any-return]
    finally:
        responses.cancel()


def nack_flood(channel: grpc.Channel, count: int) -> str:
    """One node subscribes to CDS, then NACKs the response `count` times."""
    text = "e" * (60 << 10)
    queue: list[discovery_pb2.DiscoveryRequest] = []
    ready = threading.Event()

    def requests() -> Iterator[bytes]:
        yield _request(type_url=CLUSTER, node=_node(0)).SerializeToString()
        ready.wait(STREAM_TIMEOUT_SECONDS)
        for request in queue:
            yield request.SerializeToString()

    call = channel.stream_stream(ADS, request_serializer=None, response_deserializer=None)
    responses = call(requests(), timeout=STREAM_TIMEOUT_SECONDS)
    try:
        first = discovery_pb2.DiscoveryResponse.FromString(next(responses))
        nack = _request(
            type_url=CLUSTER,
            response_nonce=first.nonce,
            error_detail=status_pb2.Status(code=13, message=text),
        )
        queue.extend([nack] * count)
        ready.set()
        time.sleep(1.0)  # let the server read them
        return "NACKed"
    except grpc.RpcError as error:
        return error.code().name  # type: ignore[no-any-return]
    finally:
        responses.cancel()


def run_case(plane: XdsControlPlane, case: Case, parallel: int) -> dict[str, object]:
    before = rss_kib(plane)
    log_before = plane.log_path.stat().st_size
    ends: Counter[str] = Counter()
    # Built before the case starts: the clients only send bytes while it is measured.
    payloads = [case.requests(i) for i in range(case.streams)] if case.requests else []
    with Watch(plane) as watch, grpc.insecure_channel(f"127.0.0.1:{plane.xds_port}") as channel:
        started = time.perf_counter()
        if payloads:
            with ThreadPoolExecutor(parallel) as pool:
                for end in pool.map(lambda p: run_stream(channel, p), payloads):
                    ends[end] += 1
        else:
            ends[nack_flood(channel, case.nacks)] += 1
        seconds = time.perf_counter() - started
        time.sleep(1.0)  # the server settles; streams are closed
    return {
        "case": case.name,
        "seconds": seconds,
        "healthz_max_ms": 1000 * max(watch.latencies, default=float("nan")),
        "healthz_p50_ms": 1000 * statistics.median(watch.latencies or [float("nan")]),
        "rss_before_mib": before / 1024,
        "rss_peak_mib": max(watch.peak_rss_kib, before) / 1024,
        "rss_after_mib": rss_kib(plane) / 1024,
        "log_bytes": plane.log_path.stat().st_size - log_before,
        "ends": dict(ends),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=50, help="hostile streams at a time")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="xdscp-hostile-"))
    plane = XdsControlPlane(workdir, "--log-level", "info").start()
    healthy: AckingNode | None = None
    try:
        plane.xdsctl("publish", str(write_config(workdir / "v1")), "--group", "bench")
        healthy = AckingNode(plane.xds_port, "healthy-1", "bench")
        wait_for(lambda: len(healthy.acked) == 2, timeout=30, what="the healthy client synced")
        print(f"hostile cases against xdscp (pid {plane.process.pid}), {args.streams} at a time")  # type: ignore[union-attr]
        print(f"{'case':52} {'s':>6} {'healthz max':>11} {'p50':>6} {'RSS before':>10} "
              f"{'peak':>6} {'after':>6} {'log bytes':>10}  ends")  # fmt: skip
        for case in cases(args.streams):
            row = run_case(plane, case, args.streams)
            print(
                f"{row['case']:52} {row['seconds']:6.1f} {row['healthz_max_ms']:9.1f}ms "
                f"{row['healthz_p50_ms']:4.1f}ms {row['rss_before_mib']:8.1f}Mi "
                f"{row['rss_peak_mib']:6.1f} {row['rss_after_mib']:6.1f} "
                f"{row['log_bytes']:10,}  {row['ends']}",
                flush=True,
            )
        time.sleep(SETTLE_SECONDS)  # the server releases caches and trims memory
        print(f"RSS {SETTLE_SECONDS:.0f} s after the last case: {rss_kib(plane) / 1024:.1f} MiB")
        before = dict(healthy.acked)
        plane.xdsctl("publish", str(write_config(workdir / "v2", variant="v2")), "--group", "bench")
        wait_for(
            lambda: healthy.acked.get(CLUSTER) not in (None, before[CLUSTER]),
            timeout=30,
            what="the healthy client got the next publish",
        )
        print("the healthy client got the next publish: OK")
        return 0
    finally:
        if healthy is not None:
            healthy.close()
        plane.stop()


if __name__ == "__main__":
    sys.exit(main())
