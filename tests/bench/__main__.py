"""Benchmark xdscp with a fleet of simulated Envoys, against a floor measured in the same run.

    python -m tests.bench --nodes 1000 [--protocol sotw|delta] [--clusters 200]
                          [--idle-nodes 10000] [--replicas 2] [--profile PATH] [--json PATH]

Starts `xdsctl serve` (tests/integration/harness.py), publishes a generated config (v1),
connects N simulated Envoys (tests/bench/fleet.py) over state of the world or delta, and
measures, each step bounded by --wait-timeout:

- connect storm: from starting the N streams until every node ACKed every type of v1;
- push: publishing v2 (a group without a rollout policy goes straight to stable) until
  every node ACKed v2;
- rollback: `xdsctl rollback --group bench --to <v1>`: the seconds it prints, the command's
  wall time, and the simulator's own view;
- push and rollback again for --rounds rounds (v3, v4, ...: the same change each time);
  the headline takes the median of the rounds;
- control-plane RSS: empty, with v1 published, idle with N streams, and per stream;
- CPU seconds of the server during each step, and per push per node (CPU of the push step /
  (nodes x types the push changed)); a step's CPU is counted from its start until the
  server is quiet again, so that the last ACKs it reads count (wait_until_quiet).

Each step is timed from the command's start and from the first push seen (the first
response any node received after the step began; the "fan-out": pushing to N streams and
collecting their ACKs), with per-node p50/p99/max from node-side ACK timestamps.

Then the same simulator code drives the floor (tests/bench/floor.py, unless --no-floor): a
minimal grpc.aio server in its own process that answers with the same pre-serialized bytes
and reads the ACKs; its "publish" is a line on a pipe. The headline is xdscp's fan-out time
divided by the floor's. --servers floor (or xdscp) measures one of them only.

--idle-nodes N starts a fresh server, connects N streams in batches (--ramp-batch) that
subscribe CDS, EDS, LDS and RDS, waits until every one is synced and reports the server's
RSS and KiB per stream (xdscp, then the floor). --nodes 0 runs only that.

--replicas N starts a throwaway PostgreSQL (Debian's, as tests/integration/postgres.py) and
measures xdscp twice on it, each on a fresh database: one replica, then N replicas (the
first one leads; publish, rollback and status go through it) with the simulated nodes
spread evenly over their xDS ports. It reports convergence and CPU per push per node (summed
over the replica processes, and with PostgreSQL's CPU added) of N against one, as ratios
measured in the same run. The floor still runs unless --no-floor.

--profile PATH runs `py-spy record` on xdscp during the push and rollback steps (PATH.svg: a
flame graph; PATH.json: speedscope; anything else: collapsed stacks, summarized in the
report), and on the floor into PATH with "-floor" before the suffix.

It prints numbers against the issue's targets. Everything it starts is stopped at the end,
also on an error or Ctrl-C. Exit status: 0 when every step converged, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.bench import config as bench_config
from tests.bench.fleet import (
    CDS,
    EDS,
    LDS,
    PROTOCOLS,
    RDS,
    FleetCount,
    SimulatedFleet,
    WaitResult,
)

REPO = Path(__file__).resolve().parents[2]
SHORT = {CDS: "CDS", EDS: "EDS", LDS: "LDS", RDS: "RDS"}
ROLLBACK_LINE = re.compile(r"(\d+)/(\d+) nodes ACKed (\S+) in ([\d.]+)s")
SECTIONS = (
    "== setup ==",
    "== connect storm ==",
    "== push v2 ==",
    "== rollback convergence ==",
    "== control-plane memory ==",
)
HEADLINE = "== headline =="
REPLICAS_SECTION = "== replicas =="
FLOOR_SECTION = "== floor (minimal grpc.aio server, same bytes) =="
IDLE_SECTION = "== idle streams memory =="
PROFILE_SECTION = "== profile (py-spy) =="
# Issue 15's targets. Counted the way an operator counts: from pressing enter.
TARGETS = {
    "publish_to_converged_seconds": 1.0,  # from the start of `xdsctl publish`, 1,000 nodes
    "publish_command_seconds": 0.3,  # `xdsctl publish` alone, the bench's config
    "rollback_seconds": 1.0,  # as `xdsctl rollback` prints it
    "cpu_ratio": 1.3,  # CPU per push per node against the floor's, update and rollback
    "per_stream_kib": 20.0,  # idle memory per stream
}
SERVER_STOP_SECONDS = 15.0
FLOOR_START_SECONDS = 60.0
FLOOR_COMMAND_SECONDS = 30.0
PROFILER_START_SECONDS = 15.0
PROFILER_STOP_SECONDS = 60.0
# A step's CPU is counted until the server is quiet again (wait_until_quiet).
QUIET_WINDOW_SECONDS = 0.1
QUIET_TIMEOUT_SECONDS = 5.0
# Each replica holds 2 connections; tests/integration/postgres.py allows 50.
MAX_REPLICAS = 8


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--nodes", type=int, default=1000, help="simulated Envoys (0: only --idle-nodes)"
    )
    parser.add_argument("--protocol", choices=PROTOCOLS, default="sotw")
    parser.add_argument("--clusters", type=int, default=200, help="EDS clusters in the config")
    parser.add_argument("--listeners", type=int, default=20, help="listeners (one RDS each)")
    parser.add_argument(
        "--endpoints", type=int, default=4, help="endpoints per cluster (snapshot size)"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="simulator processes (default: CPU count)"
    )
    parser.add_argument("--channels-per-worker", type=int, default=4)
    parser.add_argument("--group", default="bench")
    parser.add_argument(
        "--server-log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="xdsctl serve --log-level (default info, as `xdsctl serve`; the test harness uses debug)",
    )
    parser.add_argument(
        "--servers",
        default="xdscp,floor",
        help="which servers to measure, in order (default: xdscp,floor)",
    )
    parser.add_argument(
        "--no-floor", action="store_true", help="skip the floor (same as --servers xdscp)"
    )
    parser.add_argument(
        "--floor-style",
        choices=("direct", "queue"),
        default="direct",
        help="the floor's handler shape (see tests/bench/floor.py; default direct)",
    )
    parser.add_argument(
        "--idle-nodes",
        type=int,
        default=0,
        help="also measure RSS with this many idle synced streams (fresh servers)",
    )
    parser.add_argument(
        "--ramp-batch",
        type=int,
        default=1000,
        help="idle streams are connected this many at a time, each batch synced before the next",
    )
    parser.add_argument(
        "--idle-settle", type=float, default=3.0, help="seconds idle before reading RSS"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="py-spy record xdscp (and the floor) during push and rollback into this file",
    )
    parser.add_argument("--profile-rate", type=int, default=100, help="py-spy samples/s")
    parser.add_argument(
        "--profile-native",
        action="store_true",
        help="py-spy --native: also sample C/Cython frames (gRPC core, protobuf); slower",
    )
    parser.add_argument(
        "--wait-timeout", type=float, default=300.0, help="bound on each fleet-wide wait (s)"
    )
    parser.add_argument("--rollback-timeout", type=float, default=120.0)
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="update + rollback rounds per server; the headline takes each figure's median",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=0,
        help="N >= 2: also run N xdscp replicas on one PostgreSQL, the nodes spread over "
        "them, against one replica on the same PostgreSQL (default 0: one xdscp on SQLite)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep files here (default: temp)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if args.no_floor:
        args.servers = [s for s in args.servers if s != "floor"]
    if not args.servers or set(args.servers) - {"xdscp", "floor"}:
        build_parser().error("--servers takes xdscp, floor or both")
    if args.nodes < 0 or args.idle_nodes < 0 or (args.nodes == 0 and args.idle_nodes == 0):
        build_parser().error("need --nodes > 0 or --idle-nodes > 0")
    if args.replicas:
        if args.replicas < 2 or args.replicas > MAX_REPLICAS:
            build_parser().error(f"--replicas takes 2 to {MAX_REPLICAS} (PostgreSQL's connections)")
        if args.nodes == 0 or "xdscp" not in args.servers:
            build_parser().error("--replicas compares against xdscp: needs --nodes and xdscp")
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        workdir, cleanup = args.workdir, False
    else:
        workdir, cleanup = Path(tempfile.mkdtemp(prefix="xdscp-bench-")), True
    try:
        results = run(args, workdir)
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 130
    finally:
        if cleanup:
            shutil.rmtree(workdir, ignore_errors=True)
    print(render(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return 0 if results["ok"] else 1


# -- the servers ------------------------------------------------------------------------------


class XdscpServer:
    """`xdsctl serve` through the integration harness; publish and rollback with xdsctl.

    With `database` (a PostgresServer) it runs `replicas` replicas of it on a fresh database
    there (tests/integration/replicas.py: shared tokens, r1 leads); publish, rollback and
    status go through r1, and the simulated nodes spread over every replica's xDS port."""

    def __init__(
        self,
        workdir: Path,
        args: argparse.Namespace,
        dirs: dict[str, Path],
        *,
        database: Any = None,
        replicas: int = 1,
    ) -> None:
        from tests.integration.harness import XdsControlPlane
        from tests.integration.replicas import Replicas

        self.name = "xdscp" if replicas == 1 else "replicas"
        self.args = args
        self.dirs = dirs
        self.database = database
        serve_args = ("--log-level", args.server_log_level)
        workdir.mkdir(parents=True, exist_ok=True)
        self.replicas: Replicas | None = None
        if database is not None:
            url = database.create_database()
            self.replicas = Replicas(workdir, url, replicas, *serve_args)
            self.planes = list(self.replicas.planes.values())
        else:
            self.planes = [XdsControlPlane(workdir, *serve_args)]
            self.planes[0].workdir.mkdir(parents=True, exist_ok=True)
        self.plane = self.planes[0]
        self.pids: list[int] = []
        self.xds_targets: list[str] = []

    def start(self) -> None:
        if self.replicas is not None:
            self.replicas.start()
        else:
            self.plane.start()
        for plane in self.planes:
            assert plane.process is not None
            self.pids.append(plane.process.pid)
            self.xds_targets.append(f"127.0.0.1:{plane.xds_port}")

    def database_pids(self) -> list[int] | None:
        return None if self.database is None else postgres_pids(self.database)

    def publish(self, variant: str) -> dict[str, Any]:
        started = time.time()
        out = self.plane.xdsctl(
            "publish", str(self.dirs[variant]), "--group", self.args.group
        ).stdout.strip()
        return {"command_wall_seconds": round(time.time() - started, 3), "published": out}

    def rollback(self, version: str) -> dict[str, Any]:
        started = time.time()
        out = rollback(self.plane, self.args.group, version, self.args.rollback_timeout)
        out["command_wall_seconds"] = round(time.time() - started, 3)
        return out

    def view(self, version: str) -> dict[str, Any]:
        return server_view(self.plane, self.args.group, version)

    def log(self) -> dict[str, Any]:
        return server_log(self.plane)

    def follower_lags(self) -> list[dict[str, Any]]:
        """For each time another replica logged following a pointer move of the bench's
        group: seconds since the leader stored the move (its history entry's time, taken in
        the move's transaction; one machine, one clock), and whether the move's notification
        had arrived by then."""
        answer = json.loads(
            self.plane.xdsctl("snapshots", "--group", self.args.group, "--json").stdout
        )
        moves = sorted((e["created_at"], e["version"]) for e in answer.get("entries", []))
        lags = []
        for name, plane in self.replicas.planes.items() if self.replicas else ():
            if plane is self.plane:
                continue
            for event in plane.log_events():
                if event.get("event") != "followed the leader":
                    continue
                if event.get("group") != self.args.group:
                    continue
                at = datetime.fromisoformat(event["timestamp"]).timestamp()
                stored = [t for t, v in moves if v == event["stable"] and t <= at]
                if stored:
                    lags.append(
                        {
                            "replica": name,
                            "version": event["stable"],
                            "seconds": round(at - stored[-1], 4),
                            "notified": event["notified"],
                        }
                    )
        return lags

    def stop(self) -> None:
        for plane in self.planes:
            with contextlib.suppress(BaseException):
                plane.stop()
            process = plane.process
            if process is not None and process.poll() is None:  # the harness gave up
                process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(5)


class FloorServer:
    """tests/bench/floor.py in its own process; publish is a line on its stdin."""

    name = "floor"

    def __init__(self, workdir: Path, dirs: dict[str, Path], style: str = "direct") -> None:
        self.workdir = workdir
        self.style = style
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.dirs = dirs
        self.order = list(dirs)  # variant names in the floor's argument order
        self.process: subprocess.Popen[bytes] | None = None
        self.pids: list[int] = []
        self.xds_targets: list[str] = []
        self._buffer = b""

    def start(self) -> None:
        with (self.workdir / "floor.log").open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.bench.floor",
                    "--style",
                    self.style,
                    *(str(self.dirs[v]) for v in self.order),
                ],
                cwd=REPO,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                bufsize=0,
            )
        self.pids = [self.process.pid]
        words = self._line(FLOOR_START_SECONDS).split()
        if words[:1] != ["serving"]:
            raise RuntimeError(f"floor did not start: {' '.join(words)!r}")
        self.xds_targets = [f"127.0.0.1:{int(words[1])}"]

    def database_pids(self) -> list[int] | None:
        return None

    def publish(self, variant: str) -> dict[str, Any]:
        started = time.time()
        words = self._command(f"publish {self.order.index(variant)}").split()
        if words[:1] != ["published"]:
            raise RuntimeError(f"floor publish failed: {' '.join(words)!r}")
        return {"command_wall_seconds": round(time.time() - started, 3)}

    def rollback(self, version: str) -> dict[str, Any]:
        out = self.publish("v1")
        out["exit_code"] = 0
        return out

    def stats(self) -> dict[str, Any]:
        return json.loads(self._command("stats"))

    def _command(self, line: str) -> str:
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        return self._line(FLOOR_COMMAND_SECONDS)

    def _line(self, timeout: float) -> str:
        assert self.process is not None and self.process.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"floor did not answer within {timeout:g}s")
                if selector.select(min(left, 0.5)):
                    chunk = os.read(self.process.stdout.fileno(), 65536)
                    if not chunk:
                        raise RuntimeError(
                            f"floor exited ({self.process.poll()}); see {self.workdir}/floor.log"
                        )
                    self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(OSError):
            assert process.stdin is not None
            process.stdin.write(b"stop\n")
            process.stdin.close()
        try:
            process.wait(SERVER_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@contextlib.contextmanager
def postgres(workdir: Path) -> Iterator[Any]:
    """A throwaway PostgreSQL server (tests/integration/postgres.py), stopped on the way out."""
    from tests.integration.postgres import PostgresServer

    server = PostgresServer().init()
    try:
        server.start()
        yield server
    finally:
        with contextlib.suppress(BaseException):
            server.stop()
        server.remove()


# -- profiling --------------------------------------------------------------------------------


class Profiler:
    """`py-spy record --pid` from start() to stop(); the format follows the file's suffix."""

    def __init__(self, pid: int, path: Path, rate: int, native: bool = False) -> None:
        self.pid = pid
        self.path = path
        self.rate = rate
        self.native = native
        self.format = {".svg": "flamegraph", ".json": "speedscope"}.get(path.suffix, "raw")
        self.log_path = path.with_name(path.name + ".py-spy.log")
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def start(self) -> None:
        binary = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    "record",
                    "--pid",
                    str(self.pid),
                    "--rate",
                    str(self.rate),
                    *(["--native"] if self.native else ["--nonblocking"]),
                    "--threads",
                    "--format",
                    self.format,
                    "--output",
                    str(self.path),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + PROFILER_START_SECONDS
        while b"Sampling" not in self.log_path.read_bytes():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"py-spy did not start: {self.log_path.read_text()[-500:]}")
            time.sleep(0.05)
        self.started = time.monotonic()

    def stop(self) -> dict[str, Any]:
        process = self.process
        if process is None:
            return {}
        seconds = time.monotonic() - self.started
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
            try:
                process.wait(PROFILER_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        self.process = None
        out: dict[str, Any] = {
            "path": str(self.path),
            "format": self.format,
            "seconds": round(seconds, 1),
            "rate": self.rate,
            "native": self.native,
        }
        if self.format == "raw" and self.path.exists():
            out.update(summarize_collapsed(self.path.read_text()))
        return out


def _frame(frame: str) -> tuple[str, str]:
    """("path:function", package) of a py-spy frame `function (path:line)`."""
    match = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
    if not match:
        return frame, "?"
    function, path = match[1], match[2]
    for marker in ("site-packages/", "lib/python3.11/", "lib/python3.12/", "lib/python3.13/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        with contextlib.suppress(ValueError):
            path = str(Path(path).resolve().relative_to(REPO))
    parts = path.split("/")
    package = "/".join(parts[:2]) if parts[0] == "controlplane" and len(parts) > 2 else parts[0]
    if package.endswith(".py"):
        package = package[:-3]
    return f"{path}:{function}", package


IDLE_FRAMES = (
    "epoll_wait",
    "PyThread_acquire_lock_timed",
    "pthread_cond_wait",
    "pthread_cond_timedwait",
    "SimpleQueue_get",
    "futex",
    "nanosleep",
    "sem_wait",
    "sem_timedwait",
)


def summarize_collapsed(text: str, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares by function, self share by package and by thread.

    Samples of a thread waiting (a lock, epoll) are left out: py-spy leaves them out itself
    unless --native, where it cannot tell."""
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = idle_samples = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        raw = [f for f in stack.split(";") if f]
        if any(marker in f for f in raw[-3:] for marker in IDLE_FRAMES):
            idle_samples += count
            continue
        thread = "?"
        if raw and raw[0].startswith("thread ("):
            thread = raw[0].split(":", 1)[-1].strip() or raw[0]
            raw = raw[1:]
        total += count
        threads[thread] += count
        frames = [f for f in (_frame(f) for f in raw) if f[1] != "?"]
        if not frames:
            continue
        leaf, package = frames[-1]
        self_counts[leaf] += count
        packages[package] += count
        for name in {name for name, _ in frames}:
            inclusive[name] += count

    def share(counter: Counter[str], keep: Any = lambda name: True) -> list[list[Any]]:
        return [
            [name, round(100 * n / total, 1)] for name, n in counter.most_common() if keep(name)
        ][:top]

    if not total:
        return {"samples": 0, "idle_samples_left_out": idle_samples}
    return {
        "samples": total,
        "idle_samples_left_out": idle_samples,
        "percent_by_thread": share(threads),
        "self_percent": share(self_counts),
        "inclusive_percent_controlplane": share(
            inclusive,
            lambda name: (
                name.startswith("controlplane/")
                and not name.startswith(("controlplane/cli/", "controlplane/app.py"))
            ),
        ),
        "self_percent_by_package": share(packages),
    }


# -- the run ----------------------------------------------------------------------------------


class Incomplete(Exception):
    pass


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    results: dict[str, Any] = {
        "ok": False,
        "params": {
            "nodes": args.nodes,
            "protocol": args.protocol,
            "clusters": args.clusters,
            "listeners": args.listeners,
            "endpoints_per_cluster": args.endpoints,
            "group": args.group,
            "server_log_level": args.server_log_level,
            "channels_per_worker": args.channels_per_worker,
            "cpu_count": os.cpu_count(),
            "workers": args.workers or os.cpu_count() or 1,
            "load_average_at_start": os.getloadavg(),
            "idle_nodes": args.idle_nodes,
            "ramp_batch": args.ramp_batch,
            "rounds": args.rounds,
            "servers": args.servers,
            "replicas": args.replicas,
            "floor_style": args.floor_style,
            "profile": str(args.profile) if args.profile else None,
            "command": "python -m tests.bench " + " ".join(sys.argv[1:]),
        },
        "errors": [],
    }
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        try:
            measure(args, workdir, results, stack)
        finally:
            results["total_seconds"] = round(time.monotonic() - started, 1)
    results["headline"] = headline(results)
    steps: list[Any] = []
    for name in args.servers if args.nodes else []:
        wheres = [results, results.get("replicas", {})] if args.replicas else [results]
        for where in wheres if name == "xdscp" else [results.get("floor", {})]:
            steps.append(where.get("connect_storm"))
            for key in ("pushes", "rollbacks"):
                done = where.get(key) or []
                steps += done if len(done) == max(1, args.rounds) else [None]
    steps += [r.get("ramp") for r in results.get("idle", {}).values()]
    results["ok"] = not results["errors"] and all(s and s.get("converged") for s in steps)
    return results


def measure(
    args: argparse.Namespace,
    workdir: Path,
    results: dict[str, Any],
    stack: contextlib.ExitStack,
) -> None:
    """Every scenario of the run, into `results`; the PostgreSQL server (--replicas) is
    started once and stopped by `stack`."""
    dirs = {
        v: bench_config.write_config(
            workdir / f"config-{v}",
            clusters=args.clusters,
            listeners=args.listeners,
            endpoints_per_cluster=args.endpoints,
            variant=v,
        )
        for v in variants(args)
    }
    results["snapshot"] = snapshot_info(dirs)
    database = stack.enter_context(postgres(workdir)) if args.replicas else None
    results["store"] = "postgresql" if database is not None else "sqlite"
    if args.nodes:
        for name in args.servers:
            if name == "xdscp":
                server: Any = XdscpServer(workdir / "xdscp", args, dirs, database=database)
                results.update(scenario(server, args, results["snapshot"], results["errors"]))
                if args.replicas:
                    server = XdscpServer(
                        workdir / "replicas", args, dirs, database=database, replicas=args.replicas
                    )
                    results["replicas"] = scenario(server, args, results["snapshot"], [])
                    results["errors"] += [f"replicas: {e}" for e in results["replicas"]["errors"]]
            else:
                server = FloorServer(workdir / "floor", dirs, args.floor_style)
                results["floor"] = scenario(server, args, results["snapshot"], [])
                results["errors"] += [f"floor: {e}" for e in results["floor"]["errors"]]
    if args.idle_nodes:
        idle_results: dict[str, Any] = {}
        results["idle"] = idle_results
        for name in args.servers:
            if name == "xdscp":
                server = XdscpServer(workdir / "xdscp-idle", args, dirs, database=database)
            else:
                server = FloorServer(workdir / "floor-idle", dirs, args.floor_style)
            idle_results[name] = idle(server, args, results["snapshot"])
            results["errors"] += [f"idle {name}: {e}" for e in idle_results[name]["errors"]]


def variants(args: argparse.Namespace) -> list[str]:
    """v1, then one update per round: v2, v3, ... (each v1 plus one change)."""
    return ["v1", *(f"v{k + 2}" for k in range(max(1, args.rounds)))]


def snapshot_info(dirs: dict[str, Path]) -> dict[str, Any]:
    """Versions (as xdscp computes them) and sizes in bytes of v1 and v2."""
    from controlplane.config import load_directory
    from controlplane.snapshot import Snapshot
    from controlplane.xds import wire

    out: dict[str, Any] = {}
    types: dict[str, dict[str, str]] = {}
    for variant, directory in dirs.items():
        loaded = load_directory(directory)
        snap = Snapshot.from_messages((r.type_url, r.message) for r in loaded)
        types[variant] = {url: snap.of_type(url).version for url in SHORT}
        sizes = {}
        for url, short in SHORT.items():
            current = snap.of_type(url)
            sizes[short] = {
                "resources": len(current.by_name),
                "bytes": sum(len(r.body) for r in current.by_name.values()),
                "sotw_response_bytes": len(
                    wire.sotw_response(current.version, url, "1", current.wire_entries)
                ),
                "delta_response_bytes": len(
                    wire.delta_response(
                        current.version,
                        url,
                        "1",
                        b"".join(r.delta_entry for r in current.by_name.values()),
                        (),
                    )
                ),
            }
        out.setdefault("versions", {})[variant] = snap.version
        if variant not in ("v1", "v2"):
            continue
        out[variant] = snap.version
        out[f"{variant}_types"] = {SHORT[t]: v for t, v in types[variant].items()}
        out[f"{variant}_sizes"] = sizes
        out[f"{variant}_bytes"] = snap.size_bytes
        out[f"{variant}_sotw_bytes_per_node"] = sum(
            s["sotw_response_bytes"] for s in sizes.values()
        )
    out["rollback_changes"] = [SHORT[t] for t in SHORT if types["v1"][t] != types["v2"][t]]
    out["config_bytes"] = sum(f.stat().st_size for f in dirs["v1"].iterdir())
    out["_targets"] = {v: {url: types[v][url] for url in SHORT} for v in types}
    return out


def scenario(
    server: Any, args: argparse.Namespace, snap: dict[str, Any], errors: list[str]
) -> dict[str, Any]:
    """Connect storm, idle memory, then rounds of push vN and rollback to v1, on one server."""
    v1 = snap["v1"]
    v1_types = snap["_targets"]["v1"]
    changed = len(snap["rollback_changes"])
    out: dict[str, Any] = {"server": server.name, "errors": errors}
    fleet: SimulatedFleet | None = None
    profiler: Profiler | None = None
    try:
        server.start()
        pids = server.pids
        memory: dict[str, Any] = {"pids": pids, "rss_empty_kib": rss_kib(pids)}
        out["memory"] = memory
        published = server.publish("v1")
        if published.get("published", v1) != v1:
            errors.append(f"published v1 is {published['published']}, computed {v1}")
        memory["rss_v1_published_kib"] = rss_kib(pids)

        fleet = SimulatedFleet(
            server.xds_targets,
            args.nodes,
            group=args.group,
            workers=args.workers,
            channels_per_worker=args.channels_per_worker,
            protocol=args.protocol,
        )
        out["workers"] = fleet.workers
        fleet.start()

        # Connect storm: every node opens its stream at once; until all ACKed every v1 type.
        fleet.watch("storm", v1_types)
        cpu0 = cpu_pair(server, fleet)
        t0 = fleet.connect()
        storm = fleet.wait_until_all("storm", args.wait_timeout)
        wait_until_quiet(server.pids)
        out["connect_storm"] = phase(storm, t0, cpu_since(cpu0, server, fleet), fleet.workers)
        if not storm.ok:
            out["connect_storm"]["lagging"] = fleet.lagging("storm")
            raise Incomplete("connect storm did not converge")

        idle_cpu = cpu_seconds(pids)
        time.sleep(2.0)  # idle: let the server settle before reading its memory
        memory["idle_cpu_percent"] = round((cpu_seconds(pids) - idle_cpu) / 2.0 * 100, 1)
        memory["rss_idle_kib"] = rss_kib(pids)
        memory["streams"] = storm.count.streams_open
        memory["per_stream_kib"] = round(
            (memory["rss_idle_kib"] - memory["rss_v1_published_kib"]) / max(1, args.nodes), 1
        )
        if hasattr(server, "view"):
            out["server_view"] = server.view(v1)

        if args.profile is not None:
            path = args.profile
            if server.name != "xdscp":
                path = path.with_name(f"{path.stem}-{server.name}{path.suffix}")
            profiler = Profiler(pids[0], path, args.profile_rate, args.profile_native)
            profiler.start()

        # Rounds: push vN (straight to stable: the group has no rollout policy), then roll
        # back to v1 (xdscp: `xdsctl rollback --to v1`; the floor: publish v1 again).
        out["pushes"], out["rollbacks"] = [], []
        for variant in variants(args)[1:]:
            version, target = snap["versions"][variant], snap["_targets"][variant]
            fleet.watch(variant, target)
            before = fleet.query(variant)
            cpu0 = cpu_pair(server, fleet)
            t0 = time.time()
            command = server.publish(variant)
            push = fleet.wait_until_all(variant, args.wait_timeout)
            quiet = wait_until_quiet(server.pids)
            step = phase(push, t0, cpu_since(cpu0, server, fleet), fleet.workers, before, changed)
            step["quiet_wait_seconds"] = round(quiet, 3)
            step["version"] = version
            step["publish_command_wall_seconds"] = command["command_wall_seconds"]
            out["pushes"].append(step)
            out.setdefault("push_v2", step)
            if command.get("published", version) != version:
                errors.append(f"published {variant} is {command['published']}, computed {version}")
            if not push.ok:
                step["lagging"] = fleet.lagging(variant)
                raise Incomplete(f"push of {variant} did not converge")

            key = f"rollback-from-{variant}"
            fleet.watch(key, v1_types)
            before = fleet.query(key)
            cpu0 = cpu_pair(server, fleet)
            t0 = time.time()
            command = server.rollback(v1)
            back = fleet.wait_until_all(key, args.wait_timeout)
            quiet = wait_until_quiet(server.pids)
            step = phase(back, t0, cpu_since(cpu0, server, fleet), fleet.workers, before, changed)
            step["quiet_wait_seconds"] = round(quiet, 3)
            step.update(command)
            out["rollbacks"].append(step)
            out.setdefault("rollback", step)
            if not back.ok:
                step["lagging"] = fleet.lagging(key)
                raise Incomplete(f"rollback from {variant} did not converge")
            if command.get("exit_code") != 0:
                errors.append(f"rollback command exited {command.get('exit_code')}")
        if profiler is not None:
            out["profile"] = profiler.stop()
            profiler = None
        memory["rss_after_rollback_kib"] = rss_kib(pids)
        if isinstance(server, FloorServer):
            time.sleep(0.5)  # the last ACKs written may still be on their way
            out["floor_stats"] = server.stats()
    except Incomplete as error:
        errors.append(str(error))
    except Exception as error:  # report it with the numbers we have
        errors.append(f"{type(error).__name__}: {error}")
    except BaseException as error:  # pytest.fail() from the harness, Ctrl-C
        if isinstance(error, KeyboardInterrupt):
            raise
        errors.append(f"{type(error).__name__}: {error}")
    finally:
        if profiler is not None:
            with contextlib.suppress(BaseException):
                out["profile"] = profiler.stop()
        if fleet is not None:
            fleet.close()
        if server.name == "replicas":  # asks r1 for the history: before it stops
            try:
                out["follower_lags"] = server.follower_lags()
            except Exception as error:
                errors.append(f"follower lags: {type(error).__name__}: {error}")
        server.stop()
        if hasattr(server, "log"):
            with contextlib.suppress(BaseException):
                out["server_log"] = server.log()
    return out


def idle(server: Any, args: argparse.Namespace, snap: dict[str, Any]) -> dict[str, Any]:
    """RSS of a fresh server with `--idle-nodes` synced streams, connected in batches."""
    v1_types = snap["_targets"]["v1"]
    nodes = args.idle_nodes
    out: dict[str, Any] = {"server": server.name, "nodes": nodes, "errors": []}
    fleet: SimulatedFleet | None = None
    try:
        server.start()
        pids = server.pids
        out["rss_empty_kib"] = rss_kib(pids)
        server.publish("v1")
        out["rss_v1_published_kib"] = rss_kib(pids)
        fleet = SimulatedFleet(
            server.xds_targets,
            nodes,
            group=args.group,
            workers=args.workers,
            channels_per_worker=args.channels_per_worker,
            protocol=args.protocol,
            first_node=100_000,
        )
        out["workers"] = fleet.workers
        fleet.start()
        fleet.watch("idle", v1_types)
        cpu0 = cpu_pair(server, fleet)
        t0 = time.time()
        batch = max(1, args.ramp_batch)
        wait: WaitResult | None = None
        batches = 0
        for upto in range(batch, nodes + batch, batch):
            fleet.connect(min(upto, nodes))
            batches += 1
            wait = fleet.wait_until_all("idle", args.wait_timeout, at_least=fleet.started)
            if not wait.ok:
                break
        assert wait is not None
        ramp = phase(wait, t0, cpu_since(cpu0, server, fleet), fleet.workers)
        ramp["batches"] = batches
        ramp["batch"] = batch
        out["ramp"] = ramp
        if not wait.ok:
            ramp["lagging"] = fleet.lagging("idle")
            raise Incomplete(f"only {wait.count.current}/{nodes} idle streams synced")
        cpu0 = cpu_pair(server, fleet)
        time.sleep(args.idle_settle)
        cpu = cpu_since(cpu0, server, fleet)
        out["idle_cpu_percent"] = round(cpu[0] / args.idle_settle * 100, 1)
        out["rss_idle_kib"] = rss_kib(pids)
        out["streams"] = fleet.query("idle").streams_open
        out["per_stream_kib"] = round(
            (out["rss_idle_kib"] - out["rss_v1_published_kib"]) / nodes, 1
        )
        out["simulator_rss_kib"] = rss_kib(fleet.worker_pids())
    except Incomplete as error:
        out["errors"].append(str(error))
    except Exception as error:
        out["errors"].append(f"{type(error).__name__}: {error}")
    except BaseException as error:
        if isinstance(error, KeyboardInterrupt):
            raise
        out["errors"].append(f"{type(error).__name__}: {error}")
    finally:
        if fleet is not None:
            fleet.close()
        server.stop()
    return out


def phase(
    wait: WaitResult,
    t0: float,
    cpu: Cpu,
    workers: int,
    before: FleetCount | None = None,
    types_changed: int = 0,
) -> dict[str, Any]:
    """Numbers of one fleet-wide wait; per-node times are node-side ACK times minus t0, and
    minus the first push any node saw (fan-out)."""
    count = wait.count
    per_node = sorted(t - t0 for t in count.times.values())
    out: dict[str, Any] = {
        "converged": wait.ok,
        "nodes_matched": count.current,
        "nodes": count.total,
        "poll_wall_seconds": round(wait.waited, 3),
        "server_cpu_seconds": round(cpu[0], 3),
        "simulator_cpu_seconds": round(cpu[1], 2),
        # Other processes on the machine (not the server, simulator, bench or its xdsctl
        # commands): well above 0 means someone else took CPU and the timings are off.
        "other_cpu_seconds": round(cpu[3], 2),
        "stream_errors": count.stream_errors - (before.stream_errors if before else 0),
        "connects": count.connects - (before.connects if before else 0),
        "responses": {
            SHORT.get(t, t): n - (before.responses.get(t, 0) if before else 0)
            for t, n in sorted(count.responses.items())
        },
        "response_bytes": count.response_bytes - (before.response_bytes if before else 0),
        "response_megabytes": round(
            (count.response_bytes - (before.response_bytes if before else 0)) / 1e6, 2
        ),
        "last_errors": count.last_errors[-3:],
    }
    if per_node:
        out["sim_seconds"] = round(per_node[-1], 3)  # the last node's ACK
        out["per_node_seconds"] = _quantiles(per_node)
        wall = max(per_node[-1], 1e-3)
        out["simulator_busy_percent"] = round(100 * cpu[1] / (wall * workers), 1)
        out["server_busy_percent"] = round(100 * cpu[0] / wall, 1)
    if count.first_response is not None and per_node:
        first = count.first_response
        out["first_push_after_seconds"] = round(first - t0, 3)
        fanout = sorted(t - first for t in count.times.values())
        out["fanout_seconds"] = round(fanout[-1], 3)
        out["fanout_per_node_seconds"] = _quantiles(fanout)
    if types_changed:
        out["types_pushed"] = types_changed
        out["cpu_ms_per_push_per_node"] = round(1000 * cpu[0] / (count.total * types_changed), 4)
    if cpu[2] is not None:
        out["database_cpu_seconds"] = round(cpu[2], 3)
        if types_changed:
            out["cpu_ms_per_push_per_node_with_database"] = round(
                1000 * (cpu[0] + cpu[2]) / (count.total * types_changed), 4
            )
    return out


def _quantiles(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(percentile(values, 50), 3),
        "p99": round(percentile(values, 99), 3),
        "max": round(values[-1], 3),
        "min": round(values[0], 3),
    }


def rollback(plane: Any, group: str, version: str, timeout: float) -> dict[str, Any]:
    """Run `xdsctl rollback` (not through the harness: its 60s cap is below our timeout)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "controlplane.cli.main",
            "rollback",
            "--group",
            group,
            "--to",
            version,
            "--timeout",
            f"{timeout:g}",
            "--server",
            plane.admin_address,
            "--token-file",
            str(plane.token_file),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout + 60,
    )
    out: dict[str, Any] = {
        "exit_code": result.returncode,
        "command_stdout": result.stdout.strip(),
        "command_stderr": result.stderr.strip()[-2000:],
    }
    if match := ROLLBACK_LINE.search(result.stdout):
        out["command_acked"] = int(match[1])
        out["command_total"] = int(match[2])
        out["command_version"] = match[3]
        out["command_seconds"] = float(match[4])
    return out


def server_view(plane: Any, group: str, version: str) -> dict[str, Any]:
    """What xdscp itself reports (`xdsctl status --json`): nodes, and how many are SYNCED."""
    nodes = [n for n in plane.status() if n.get("group") == group]
    synced = sum(
        1
        for n in nodes
        if n.get("snapshot_version") == version
        and n.get("types")
        and all(t.get("state") == "SYNCED" for t in n["types"])
    )
    out: dict[str, Any] = {"nodes": len(nodes), "synced": synced}
    if any(n.get("replica") for n in nodes):
        out["by_replica"] = dict(sorted(Counter(n.get("replica") or "?" for n in nodes).items()))
    return out


def server_log(plane: Any) -> dict[str, Any]:
    events = plane.log_events()
    levels = Counter(e.get("level", "?") for e in events)
    names = Counter(e.get("event", "?") for e in events)
    worst = [
        {k: e.get(k) for k in ("level", "event", "error", "node_id", "type_url") if k in e}
        for e in events
        if e.get("level") in ("warning", "error", "critical")
        and e.get("event") not in ("rollback",)
    ]
    return {"levels": dict(levels), "events": dict(names.most_common(12)), "warnings": worst[:10]}


def rss_kib(pids: list[int]) -> int:
    """The summed RSS of these processes."""
    return sum(_rss_kib(pid) for pid in pids)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes (all their threads) so far; one that ended
    counts nothing."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def postgres_pids(database: Any) -> list[int]:
    """The postmaster of a tests/integration/postgres.py server and its children (one
    backend per connection, the checkpointer, the WAL writer, ...)."""
    postmaster = int((database.data / "postmaster.pid").read_text().split()[0])
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                children.append(int(stat.parent.name))
    return [postmaster, *children]


def machine_busy_seconds() -> float:
    """CPU seconds every process of the machine used so far (all cores, not idle/iowait)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of its children that ended (xdsctl commands)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


Cpu = tuple[float, float, float | None, float]


def cpu_pair(server: Any, fleet: SimulatedFleet) -> Cpu:
    """CPU seconds so far of (the server's processes, all simulator workers, the server's
    database or None without one, everything else on the machine)."""
    database = server.database_pids()
    return (
        cpu_seconds(server.pids),
        cpu_seconds(fleet.worker_pids()),
        None if database is None else cpu_seconds(database),
        machine_busy_seconds() - own_cpu_seconds(),
    )


def wait_until_quiet(pids: list[int]) -> float:
    """Until the server has done what the last step gave it: the simulated nodes count as
    holding a version once they wrote their ACKs, and the server may still be reading them
    (a fleet's worth of ACKs takes a while). Quiet: at most one clock tick of CPU in a
    QUIET_WINDOW_SECONDS window; at most QUIET_TIMEOUT_SECONDS. Returns the time waited."""
    start = time.monotonic()
    tick = 1 / os.sysconf("SC_CLK_TCK")
    used = cpu_seconds(pids)
    while time.monotonic() - start < QUIET_TIMEOUT_SECONDS:
        time.sleep(QUIET_WINDOW_SECONDS)
        now = cpu_seconds(pids)
        if now - used <= tick * 1.5:
            break
        used = now
    return time.monotonic() - start


def cpu_since(before: Cpu, server: Any, fleet: SimulatedFleet) -> Cpu:
    """CPU seconds since `before`: the server, the simulator, its database, and other
    processes of the machine (none of those, nor this one, nor the xdsctl commands it ran)."""
    now = cpu_pair(server, fleet)
    own, sim = now[0] - before[0], now[1] - before[1]
    database = None if now[2] is None or before[2] is None else now[2] - before[2]
    other = now[3] - before[3] - own - sim - (database or 0.0)
    return own, sim, database, max(0.0, other)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile of sorted `values`."""
    rank = max(1, min(len(values), -(-len(values) * p // 100)))
    return values[int(rank) - 1]


# -- the headline -----------------------------------------------------------------------------


def _ratio(ours: float | None, floor: float | None) -> float | None:
    if ours is None or not floor:
        return None
    return round(ours / floor, 2)


def _median(values: list[float]) -> float | None:
    """The median (the lower middle one of an even count), None for no values."""
    if not values:
        return None
    return sorted(values)[(len(values) - 1) // 2]


def headline(r: dict[str, Any]) -> dict[str, Any]:
    """The figures the issue sets targets for, with the floor's and the ratios."""
    floor = r.get("floor", {})
    out: dict[str, Any] = {"nodes": r["params"]["nodes"], "protocol": r["params"]["protocol"]}
    storm, storm_floor = r.get("connect_storm") or {}, floor.get("connect_storm") or {}
    out["storm"] = {
        "xdscp_seconds": storm.get("sim_seconds"),
        "floor_seconds": storm_floor.get("sim_seconds"),
        "ratio": _ratio(storm.get("sim_seconds"), storm_floor.get("sim_seconds")),
        "xdscp_fanout_seconds": storm.get("fanout_seconds"),
        "floor_fanout_seconds": storm_floor.get("fanout_seconds"),
    }
    for key, steps in (("update", "pushes"), ("rollback", "rollbacks")):
        ours, theirs = r.get(steps) or [], floor.get(steps) or []
        row: dict[str, Any] = {"rounds": max(len(ours), len(theirs))}
        for field, label in (
            ("fanout_seconds", "fanout_seconds"),
            ("sim_seconds", "from_command_seconds"),
            ("cpu_ms_per_push_per_node", "cpu_ms_per_push_per_node"),
        ):
            for who, found in (("xdscp", ours), ("floor", theirs)):
                values = [s[field] for s in found if s.get(field) is not None]
                row[f"{who}_{label}"] = _median(values)
                row[f"{who}_{label}_each"] = values
        row["ratio"] = _ratio(row["xdscp_fanout_seconds"], row["floor_fanout_seconds"])
        row["from_command_ratio"] = _ratio(
            row["xdscp_from_command_seconds"], row["floor_from_command_seconds"]
        )
        row["cpu_ratio"] = _ratio(
            row["xdscp_cpu_ms_per_push_per_node"], row["floor_cpu_ms_per_push_per_node"]
        )
        commands = (
            [("publish_command_wall_seconds", "xdsctl_publish_seconds")]
            if key == "update"
            else [
                ("command_seconds", "xdsctl_printed_seconds"),
                ("command_wall_seconds", "xdsctl_wall_seconds"),
            ]
        )
        if commands:
            for field, label in commands:
                values = [s[field] for s in ours if s.get(field) is not None]
                row[label] = _median(values)
                row[f"{label}_each"] = values
        out[key] = row
    out["per_stream"] = per_stream_headline(r)
    if replicas := r.get("replicas"):
        out["replicas"] = replica_headline(r, replicas)
    if idle_results := r.get("idle"):
        ours, theirs = idle_results.get("xdscp", {}), idle_results.get("floor", {})
        out["idle"] = {
            "streams": r["params"]["idle_nodes"],
            "xdscp_rss_kib": ours.get("rss_idle_kib"),
            "xdscp_per_stream_kib": ours.get("per_stream_kib"),
            "floor_rss_kib": theirs.get("rss_idle_kib"),
            "floor_per_stream_kib": theirs.get("per_stream_kib"),
            "ratio": _ratio(ours.get("per_stream_kib"), theirs.get("per_stream_kib")),
        }
        if ours.get("per_stream_kib") is not None:
            out["idle"]["xdscp_projected_rss_kib_at_10000"] = round(
                ours["rss_v1_published_kib"] + 10000 * ours["per_stream_kib"]
            )
    return out


def per_stream_headline(r: dict[str, Any]) -> dict[str, Any]:
    """Idle RSS per stream: from --idle-nodes when measured, else from the N streams of the
    scenario (idle after the connect storm)."""
    idle_results = r.get("idle") or {}
    if idle_results:
        ours, theirs = idle_results.get("xdscp", {}), idle_results.get("floor", {})
        streams = r["params"]["idle_nodes"]
    else:
        ours, theirs = r.get("memory", {}), r.get("floor", {}).get("memory", {})
        streams = r["params"]["nodes"]
    return {
        "streams": streams,
        "xdscp_kib": ours.get("per_stream_kib"),
        "floor_kib": theirs.get("per_stream_kib"),
        "ratio": _ratio(ours.get("per_stream_kib"), theirs.get("per_stream_kib")),
    }


def replica_headline(one: dict[str, Any], many: dict[str, Any]) -> dict[str, Any]:
    """N replicas against one, both on the same PostgreSQL: medians over the rounds, and
    N / 1 ratios (CPU summed over the replica processes, then with PostgreSQL's added)."""
    out: dict[str, Any] = {"count": one["params"]["replicas"]}
    storm_one, storm_many = one.get("connect_storm") or {}, many.get("connect_storm") or {}
    out["storm"] = {
        "one_seconds": storm_one.get("sim_seconds"),
        "many_seconds": storm_many.get("sim_seconds"),
        "ratio": _ratio(storm_many.get("sim_seconds"), storm_one.get("sim_seconds")),
    }
    fields = [
        "sim_seconds",
        "fanout_seconds",
        "cpu_ms_per_push_per_node",
        "cpu_ms_per_push_per_node_with_database",
        "database_cpu_seconds",
    ]
    for key, steps in (("update", "pushes"), ("rollback", "rollbacks")):
        row: dict[str, Any] = {}
        for field in [*fields, *(["command_seconds"] if key == "rollback" else [])]:
            for who, found in (("one", one.get(steps) or []), ("many", many.get(steps) or [])):
                row[f"{who}_{field}"] = _median(
                    [s[field] for s in found if s.get(field) is not None]
                )
            row[f"{field}_ratio"] = _ratio(row[f"many_{field}"], row[f"one_{field}"])
        out[key] = row
    out["nodes_by_replica"] = (many.get("server_view") or {}).get("by_replica", {})
    lags = many.get("follower_lags") or []
    seconds = sorted(lag["seconds"] for lag in lags)
    out["follower_lag"] = {
        "moves": len(lags),
        "notified": sum(1 for lag in lags if lag["notified"]),
        "median_seconds": _median(seconds),
        "max_seconds": seconds[-1] if seconds else None,
    }
    return out


def _verdict(value: float | None, target: float) -> str:
    if value is None:
        return "not measured"
    return "met" if value <= target else "MISSED"


def _s(value: float | None, unit: str = "s") -> str:
    if value is None:
        return "?"
    return f"{value:.1f} {unit}" if unit == "KiB" else f"{value:.3f} {unit}"


def _each(values: list[float]) -> str:
    return " ".join(f"{v:.3f}" for v in values) or "?"


def headline_lines(r: dict[str, Any]) -> list[str]:
    h = r["headline"]
    n = h["nodes"]
    title = f"{HEADLINE} ({h['protocol']}, {n} nodes, {r['params']['clusters']} clusters"
    if n:
        title += f"; medians of {h['update']['rounds']} round(s)"
    lines = [title + ")"]
    if n:
        lines += ["", *headline_table(r), ""]
        lines += target_lines(h)
    return lines + _headline_rest(h)


def headline_table(r: dict[str, Any]) -> list[str]:
    """The figures an operator asks about first, as a Markdown table (xdscp, floor, ratio):
    the update and the rollback counted from the start of the command, then the fan-out,
    the commands alone, CPU and memory."""
    h = r["headline"]
    up, rb, storm, mem = h["update"], h["rollback"], h["storm"], h["per_stream"]
    config_kb = round(r.get("snapshot", {}).get("config_bytes", 0) / 1000)

    def compared(
        label: str, row: dict[str, Any], figure: str, ratio: str, unit: str = "s"
    ) -> tuple[str, str, str, float | None]:
        """A row of xdscp's figure, the floor's and their ratio."""
        return label, _s(row[f"xdscp_{figure}"], unit), _s(row[f"floor_{figure}"], unit), row[ratio]

    rows = [
        compared(
            "**update**, from the start of `xdsctl publish` to the last ACK",
            up,
            "from_command_seconds",
            "from_command_ratio",
        ),
        compared("update fan-out, first push to last ACK", up, "fanout_seconds", "ratio"),
        (
            f"`xdsctl publish` alone, a {config_kb} KB config",
            _s(up.get("xdsctl_publish_seconds")),
            "-",
            None,
        ),
        compared(
            "**rollback**, from the start of `xdsctl rollback` to the last ACK",
            rb,
            "from_command_seconds",
            "from_command_ratio",
        ),
        compared("rollback fan-out, first push to last ACK", rb, "fanout_seconds", "ratio"),
        (
            "rollback, as `xdsctl rollback` printed it (its wall time)",
            f"{_s(rb.get('xdsctl_printed_seconds'))} ({_s(rb.get('xdsctl_wall_seconds'))})",
            "-",
            None,
        ),
        compared("connect storm, start of N streams to all ACKed", storm, "seconds", "ratio"),
        compared(
            "CPU per push per node, update", up, "cpu_ms_per_push_per_node", "cpu_ratio", "ms"
        ),
        compared(
            "CPU per push per node, rollback", rb, "cpu_ms_per_push_per_node", "cpu_ratio", "ms"
        ),
        compared(f"idle memory per stream ({mem['streams']} streams)", mem, "kib", "ratio", "KiB"),
    ]
    lines = ["| figure | xdscp | floor | ratio |", "|---|---|---|---|"]
    for name, ours, floor, ratio in rows:
        lines.append(f"| {name} | {ours} | {floor} | {'-' if ratio is None else ratio} |")
    lines.append(
        '(the floor\'s "command" is a line on its pipe: it has no publish or rollback to run)'
    )
    return lines


def target_lines(h: dict[str, Any]) -> list[str]:
    up, rb, mem = h["update"], h["rollback"], h["per_stream"]
    checks = [
        (
            "update from the command",
            up["xdscp_from_command_seconds"],
            TARGETS["publish_to_converged_seconds"],
            "s",
        ),
        (
            "xdsctl publish alone",
            up.get("xdsctl_publish_seconds"),
            TARGETS["publish_command_seconds"],
            "s",
        ),
        (
            "xdsctl rollback printed",
            rb.get("xdsctl_printed_seconds"),
            TARGETS["rollback_seconds"],
            "s",
        ),
        ("CPU ratio, update", up["cpu_ratio"], TARGETS["cpu_ratio"], ""),
        ("CPU ratio, rollback", rb["cpu_ratio"], TARGETS["cpu_ratio"], ""),
        ("idle memory per stream", mem["xdscp_kib"], TARGETS["per_stream_kib"], "KiB"),
    ]
    return [
        "targets: "
        + "; ".join(
            f"{name} <= {target:g}{' ' + unit if unit else ''}: {_verdict(value, target)}"
            for name, value, target, unit in checks
        )
    ]


def _headline_rest(h: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if rep := h.get("replicas"):
        lines += ["", *replica_headline_lines(rep)]
    if idle_h := h.get("idle"):
        rss = idle_h.get("xdscp_rss_kib")
        lines.append(
            f"idle RSS per stream ({idle_h['streams']} streams): xdscp "
            f"{_s(idle_h['xdscp_per_stream_kib'], 'KiB')} (RSS {_mib(rss)}), floor "
            f"{_s(idle_h['floor_per_stream_kib'], 'KiB')} (RSS {_mib(idle_h['floor_rss_kib'])}), "
            f"ratio {idle_h['ratio'] or '?'}"
        )
        if idle_h["streams"] < 10000 and "xdscp_projected_rss_kib_at_10000" in idle_h:
            lines.append(
                f"  projected at 10,000 streams: {_mib(idle_h['xdscp_projected_rss_kib_at_10000'])}"
            )
    return lines


def replica_headline_lines(h: dict[str, Any]) -> list[str]:
    n = h["count"]

    def compare(row: dict[str, Any], field: str, unit: str = "s") -> str:
        return (
            f"1 replica {_s(row[f'one_{field}'], unit)}, {n} replicas "
            f"{_s(row[f'many_{field}'], unit)} (ratio {row[f'{field}_ratio'] or '?'})"
        )

    up, rb, lag = h["update"], h["rollback"], h["follower_lag"]
    spread = ", ".join(f"{name} {count}" for name, count in h["nodes_by_replica"].items())
    return [
        f"{n} replicas on one PostgreSQL against 1 replica on the same server "
        f"(nodes per replica, by xdsctl status through r1: {spread or '?'})",
        f"  update, publish command start -> last ACK: {compare(up, 'sim_seconds')}",
        f"  update fan-out, first push -> last ACK: {compare(up, 'fanout_seconds')}",
        f"  rollback, command start -> last ACK: {compare(rb, 'sim_seconds')}",
        f"  rollback, as xdsctl printed it: {compare(rb, 'command_seconds')}",
        f"  connect storm: 1 replica {_s(h['storm']['one_seconds'])}, {n} replicas "
        f"{_s(h['storm']['many_seconds'])} (ratio {h['storm']['ratio'] or '?'})",
        f"  CPU per push per node, replica processes summed: update "
        f"{compare(up, 'cpu_ms_per_push_per_node', 'ms')}; rollback "
        f"{compare(rb, 'cpu_ms_per_push_per_node', 'ms')}",
        f"  the same with PostgreSQL's CPU added: update "
        f"{compare(up, 'cpu_ms_per_push_per_node_with_database', 'ms')}; rollback "
        f"{compare(rb, 'cpu_ms_per_push_per_node_with_database', 'ms')}",
        f"  followers applied {lag['moves']} pointer move(s) {_s(lag['median_seconds'])} "
        f"(median), at most {_s(lag['max_seconds'])} after the leader stored them; "
        f"{lag['notified']} came with their notification",
    ]


# -- the report -------------------------------------------------------------------------------


def render(r: dict[str, Any]) -> str:
    p = r["params"]
    lines = [*headline_lines(r), "", SECTIONS[0]]
    lines.append(
        f"nodes {p['nodes']} ({p['protocol']}) over {r.get('workers', p['workers'])} worker "
        f"process(es) x {p['channels_per_worker']} channel(s); group {p['group']}; "
        f"{p['cpu_count']} CPU(s); server log level {p['server_log_level']}; "
        f"load average at start {' '.join(f'{x:.2f}' for x in p['load_average_at_start'])}"
    )
    lines.append(f"command: {p['command']}")
    if snap := r.get("snapshot"):
        lines += [
            f"config: {p['clusters']} EDS clusters ({p['endpoints_per_cluster']} endpoints each), "
            f"{p['listeners']} listeners (RDS each), {snap['config_bytes']:,} bytes of YAML",
            f"v1 {snap['v1']}  v2 {snap['v2']}  (rollback changes: "
            f"{', '.join(snap['rollback_changes']) or 'nothing'})",
        ]
        for variant in ("v1", "v2"):
            sizes = snap[f"{variant}_sizes"]
            lines.append(
                f"snapshot {variant}: {snap[f'{variant}_bytes']:,} bytes of resources; "
                + ", ".join(f"{t} {s['resources']} = {s['bytes']:,} B" for t, s in sizes.items())
                + f"; a full SotW fetch is {snap[f'{variant}_sotw_bytes_per_node']:,} B per node"
            )
    if p["nodes"] and "xdscp" in p["servers"]:
        lines += ["", *_scenario_lines(r, "xdscp")]
    if replicas := r.get("replicas"):
        lines += ["", f"{REPLICAS_SECTION} ({p['replicas']} on one PostgreSQL)"]
        lines += _scenario_lines(replicas, "replicas")
    if floor := r.get("floor"):
        lines += ["", f"{FLOOR_SECTION} (style {p['floor_style']})"]
        lines += _scenario_lines(floor, "floor")
        if stats := floor.get("floor_stats"):
            lines.append(
                "floor counters: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.items()))
            )
    if idle_results := r.get("idle"):
        lines += ["", IDLE_SECTION]
        for name, result in idle_results.items():
            lines += _idle_lines(name, result)
    for name, result in (("xdscp", r), ("floor", r.get("floor", {}))):
        if prof := result.get("profile"):
            lines += ["", f"{PROFILE_SECTION} {name}", *_profile_lines(prof)]
    if log := r.get("server_log"):
        lines.append("")
        lines.append("== server log ==")
        lines.append("levels: " + ", ".join(f"{k} {v}" for k, v in sorted(log["levels"].items())))
        lines.append("events: " + ", ".join(f"{k} {v}" for k, v in log["events"].items()))
        for w in log["warnings"]:
            lines.append(f"  {w}")
    lines.append("")
    lines.append(f"total {r.get('total_seconds', '?')}s; " + ("OK" if r["ok"] else "NOT OK"))
    for error in r["errors"]:
        lines.append(f"error: {error}")
    return "\n".join(lines)


def _scenario_lines(r: dict[str, Any], name: str) -> list[str]:
    lines = []
    if name == "xdscp":
        lines.append(SECTIONS[1])
    else:
        lines.append("-- connect storm --")
    lines += _phase_lines(r.get("connect_storm"), "start of N streams -> all ACKed every v1 type")
    if view := r.get("server_view"):
        lines.append(f"xdscp's own view: {view['synced']}/{view['nodes']} nodes SYNCED on v1")
        if by_replica := view.get("by_replica"):
            lines.append(
                "nodes per replica: " + ", ".join(f"{k} {v}" for k, v in by_replica.items())
            )
    lines.append("")
    lines.append(SECTIONS[2] if name == "xdscp" else "-- push v2 --")
    push = r.get("push_v2")
    what = "publish line written" if name == "floor" else "publish command start"
    lines += _phase_lines(push, f"{what} -> all ACKed every v2 type")
    if push and "publish_command_wall_seconds" in push:
        lines.append(f"publish command wall: {push['publish_command_wall_seconds']:.3f}s")
    lines += _rounds_lines(r.get("pushes") or [])
    lines.append("")
    lines.append(SECTIONS[3] if name == "xdscp" else "-- rollback (publish v1 again) --")
    rb = r.get("rollback")
    if rb and name != "floor":
        if "command_seconds" in rb:
            lines.append(
                f"xdsctl rollback printed: {rb['command_acked']}/{rb['command_total']} nodes "
                f"ACKed {rb['command_version']} in {rb['command_seconds']:.2f}s "
                f"(exit {rb['exit_code']})"
            )
        else:
            lines.append(f"xdsctl rollback exit {rb['exit_code']}: {rb['command_stdout']!r}")
            if rb.get("command_stderr"):
                lines.append(f"  stderr: {rb['command_stderr'][-500:]}")
        lines.append(f"xdsctl rollback wall time: {rb['command_wall_seconds']:.3f}s")
    lines += _phase_lines(rb, "command start -> all nodes ACKed every v1 type")
    lines += _rounds_lines(r.get("rollbacks") or [])
    lines.append("")
    lines.append(SECTIONS[4] if name == "xdscp" else "-- memory --")
    if mem := r.get("memory"):
        pids = " ".join(map(str, mem["pids"]))
        lines.append(f"{name} pid {pids}: RSS empty {_mib(mem.get('rss_empty_kib'))}")
        for key, label in (
            ("rss_v1_published_kib", "with v1 published, no streams"),
            ("rss_idle_kib", f"idle with {mem.get('streams', '?')} streams"),
            ("rss_after_rollback_kib", "after the rollback"),
        ):
            if key in mem:
                lines.append(f"  {label}: {_mib(mem[key])}")
        if "per_stream_kib" in mem:
            lines.append(
                f"  per stream: {mem['per_stream_kib']:.1f} KiB "
                "((idle with N streams - with v1 published) / N)"
            )
        if "idle_cpu_percent" in mem:
            lines.append(
                f"  CPU while idle with N streams: {mem['idle_cpu_percent']:.1f}% of a core"
            )
    return lines


def _rounds_lines(steps: list[dict[str, Any]]) -> list[str]:
    """One line for every round (the step above is round 1)."""
    if len(steps) < 2:
        return []

    def each(field: str) -> str:
        return " ".join(f"{s[field]:.3f}" if field in s else "?" for s in steps)

    line = (
        f"all {len(steps)} rounds: fan-out {each('fanout_seconds')} s; from the start "
        f"{each('sim_seconds')} s; server CPU per push per node "
        f"{each('cpu_ms_per_push_per_node')} ms"
    )
    if any("command_seconds" in s for s in steps):
        line += f"; xdsctl printed {each('command_seconds')} s"
    return [line]


def _idle_lines(name: str, r: dict[str, Any]) -> list[str]:
    lines = [f"{name}: {r['nodes']} streams over {r.get('workers', '?')} worker process(es)"]
    if ramp := r.get("ramp"):
        lines += [
            "  " + line
            for line in _phase_lines(
                ramp,
                f"{ramp['batches']} batch(es) of {ramp['batch']} -> all synced on v1",
            )
        ]
    if "rss_idle_kib" in r:
        lines.append(
            f"  RSS: empty {_mib(r['rss_empty_kib'])}, with v1 published "
            f"{_mib(r['rss_v1_published_kib'])}, idle with {r['streams']} streams "
            f"{_mib(r['rss_idle_kib'])}: {r['per_stream_kib']:.1f} KiB per stream"
        )
        lines.append(
            f"  CPU while idle: {r['idle_cpu_percent']:.1f}% of a core; simulator workers' "
            f"RSS {_mib(r['simulator_rss_kib'])}"
        )
    for error in r["errors"]:
        lines.append(f"  error: {error}")
    return lines


def _profile_lines(prof: dict[str, Any]) -> list[str]:
    lines = [
        f"{prof['path']} ({prof['format']}, {prof['rate']} Hz, {prof['seconds']} s of push + "
        f"rollback; timings of a profiled run are perturbed)"
    ]
    if "samples" in prof:
        lines.append(
            f"samples (non-idle): {prof['samples']}; by thread: "
            + ", ".join(f"{name} {pct}%" for name, pct in prof.get("percent_by_thread", []))
        )
        lines.append(
            "self time by package: "
            + ", ".join(
                f"{name} {pct}%" for name, pct in prof.get("self_percent_by_package", [])[:10]
            )
        )
        lines.append("top self time:")
        lines += [f"  {pct:5.1f}%  {name}" for name, pct in prof.get("self_percent", [])]
        if prof.get("inclusive_percent_controlplane"):
            lines.append("top inclusive time in controlplane/:")
            lines += [
                f"  {pct:5.1f}%  {name}" for name, pct in prof["inclusive_percent_controlplane"]
            ]
    return lines


def _phase_lines(ph: dict[str, Any] | None, what: str) -> list[str]:
    if not ph:
        return ["(not reached)"]
    lines = [
        f"converged: {'yes' if ph['converged'] else 'NO'} "
        f"({ph['nodes_matched']}/{ph['nodes']} nodes)"
    ]
    if "sim_seconds" in ph:
        q = ph["per_node_seconds"]
        lines.append(f"simulator: {ph['sim_seconds']:.3f}s ({what})")
        lines.append(
            f"per node: p50 {q['p50']:.3f}s  p99 {q['p99']:.3f}s  max {q['max']:.3f}s  "
            f"min {q['min']:.3f}s"
        )
    if "fanout_seconds" in ph:
        q = ph["fanout_per_node_seconds"]
        lines.append(
            f"fan-out: first push seen {ph['first_push_after_seconds']:.3f}s after the start; "
            f"from it to the last ACK {ph['fanout_seconds']:.3f}s (p50 {q['p50']:.3f}s  "
            f"p99 {q['p99']:.3f}s  max {q['max']:.3f}s)"
        )
    responses = ", ".join(f"{t} {n}" for t, n in ph["responses"].items() if n)
    lines.append(
        f"responses received: {responses or 'none'} ({ph['response_megabytes']:.2f} MB); "
        f"stream errors {ph['stream_errors']}"
    )
    cpu = (
        f"CPU during this step: server {ph['server_cpu_seconds']:.2f}s, "
        f"simulator workers {ph['simulator_cpu_seconds']:.2f}s, "
        f"other processes {ph.get('other_cpu_seconds', 0):.2f}s"
    )
    if "server_busy_percent" in ph:
        cpu += (
            f" (server {ph['server_busy_percent']:.0f}% of a core, simulator "
            f"{ph['simulator_busy_percent']:.0f}% of its cores)"
        )
    if "database_cpu_seconds" in ph:
        cpu += f"; PostgreSQL {ph['database_cpu_seconds']:.2f}s"
    lines.append(cpu)
    if "cpu_ms_per_push_per_node" in ph:
        lines.append(
            f"server CPU per push per node: {ph['cpu_ms_per_push_per_node']:.3f} ms "
            f"({ph['types_pushed']} types changed)"
        )
    for error in ph.get("last_errors", []):
        lines.append(f"  last stream error: {error}")
    for node in ph.get("lagging", []):
        acked = {SHORT.get(t, t): v for t, v in node["acked"].items()}
        lines.append(f"  lagging: {node['node']} connected={node['connected']} acked={acked}")
    return lines


def _mib(kib: int | None) -> str:
    return "?" if kib is None else f"{kib / 1024:.1f} MiB"


if __name__ == "__main__":
    sys.exit(main())
