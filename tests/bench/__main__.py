"""Benchmark xdscp with a fleet of simulated Envoys: connect storm, push, rollback, memory.

    python -m tests.bench --nodes 1000 [--clusters 200] [--workers K] [--json PATH]

Starts `xdsctl serve` (tests/integration/harness.py), publishes a generated config (v1),
connects N simulated Envoys (tests/bench/fleet.py) and measures:

- connect storm: from starting the N streams until every node ACKed every type of v1;
- push: publishing v2 (a group without a rollout policy goes straight to stable) until
  every node ACKed v2;
- rollback: `xdsctl rollback --group bench --to <v1>`: the seconds it prints, the command's
  wall time, and the simulator's own view (from just before the command until every node
  ACKed v1), with per-node p50/p99/max (node-side ACK timestamp - command start);
- control-plane RSS: empty, with v1 published, idle with N streams, and per stream.

It prints numbers and never judges them. Everything it starts is stopped at the end, also on
an error or Ctrl-C. Exit status: 0 when every step converged, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tests.bench import config as bench_config
from tests.bench.fleet import CDS, EDS, LDS, RDS, FleetCount, SimulatedFleet, WaitResult

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument("--nodes", type=int, default=1000, help="simulated Envoys")
    parser.add_argument("--clusters", type=int, default=200, help="EDS clusters in the config")
    parser.add_argument("--listeners", type=int, default=20, help="listeners (one RDS each)")
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
        "--wait-timeout", type=float, default=300.0, help="bound on each fleet-wide wait (s)"
    )
    parser.add_argument("--rollback-timeout", type=float, default=120.0)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep files here (default: temp)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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


# -- the run ----------------------------------------------------------------------------------


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from tests.integration.harness import XdsControlPlane

    results: dict[str, Any] = {
        "ok": False,
        "params": {
            "nodes": args.nodes,
            "clusters": args.clusters,
            "listeners": args.listeners,
            "group": args.group,
            "server_log_level": args.server_log_level,
            "channels_per_worker": args.channels_per_worker,
            "cpu_count": os.cpu_count(),
        },
        "errors": [],
    }
    started = time.monotonic()
    dirs = {
        v: bench_config.write_config(
            workdir / f"config-{v}", clusters=args.clusters, listeners=args.listeners, variant=v
        )
        for v in ("v1", "v2")
    }
    (v1, v1_types), (v2, v2_types) = (bench_config.target_versions(dirs[v]) for v in ("v1", "v2"))
    results["snapshot"] = {
        "v1": v1,
        "v2": v2,
        "v1_types": {SHORT[t]: v for t, v in v1_types.items()},
        "v2_types": {SHORT[t]: v for t, v in v2_types.items()},
        "rollback_changes": [SHORT[t] for t in v1_types if v1_types[t] != v2_types[t]],
        "config_bytes": sum(f.stat().st_size for f in dirs["v1"].iterdir()),
    }
    plane = XdsControlPlane(workdir / "xdscp", "--log-level", args.server_log_level)
    plane.workdir.mkdir(parents=True, exist_ok=True)
    fleet: SimulatedFleet | None = None
    try:
        plane.start()
        assert plane.process is not None
        pid = plane.process.pid
        memory: dict[str, Any] = {"pid": pid, "rss_empty_kib": rss_kib(pid)}
        results["memory"] = memory

        published = plane.xdsctl("publish", str(dirs["v1"]), "--group", args.group).stdout.strip()
        if published != v1:
            results["errors"].append(f"published v1 is {published}, computed {v1}")
        memory["rss_v1_published_kib"] = rss_kib(pid)

        fleet = SimulatedFleet(
            f"127.0.0.1:{plane.xds_port}",
            args.nodes,
            group=args.group,
            workers=args.workers,
            channels_per_worker=args.channels_per_worker,
        )
        results["params"]["workers"] = fleet.workers
        fleet.start()

        # Connect storm: every node opens its stream at once; until all ACKed every v1 type.
        fleet.watch("storm", v1_types)
        cpu0 = cpu_pair(pid, fleet)
        t0 = fleet.connect()
        storm = fleet.wait_until_all("storm", args.wait_timeout)
        results["connect_storm"] = phase(storm, t0, cpu_since(cpu0, pid, fleet))
        if not storm.ok:
            results["connect_storm"]["lagging"] = fleet.lagging("storm")
            raise Incomplete("connect storm did not converge")

        idle_cpu = cpu_seconds(pid)
        time.sleep(2.0)  # idle: let the server settle before reading its memory
        memory["idle_cpu_percent"] = round((cpu_seconds(pid) - idle_cpu) / 2.0 * 100, 1)
        memory["rss_idle_kib"] = rss_kib(pid)
        memory["streams"] = storm.count.streams_open
        memory["per_stream_kib"] = round(
            (memory["rss_idle_kib"] - memory["rss_v1_published_kib"]) / max(1, args.nodes), 1
        )
        results["server_view"] = server_view(plane, args.group, v1)

        # Push v2: straight to stable (no rollout policy for the group).
        fleet.watch("v2", v2_types)
        before = fleet.query("v2")
        cpu0 = cpu_pair(pid, fleet)
        t0 = time.time()
        out = plane.xdsctl("publish", str(dirs["v2"]), "--group", args.group).stdout.strip()
        publish_wall = time.time() - t0
        if out != v2:
            results["errors"].append(f"published v2 is {out}, computed {v2}")
        push = fleet.wait_until_all("v2", args.wait_timeout)
        results["push_v2"] = phase(push, t0, cpu_since(cpu0, pid, fleet), before)
        results["push_v2"]["publish_command_wall_seconds"] = round(publish_wall, 3)
        if not push.ok:
            results["push_v2"]["lagging"] = fleet.lagging("v2")
            raise Incomplete("push of v2 did not converge")

        # Rollback to v1, timed three ways.
        fleet.watch("rollback", v1_types)
        before = fleet.query("rollback")
        cpu0 = cpu_pair(pid, fleet)
        t0 = time.time()
        command = rollback(plane, args.group, v1, args.rollback_timeout)
        wall = time.time() - t0
        back = fleet.wait_until_all("rollback", args.wait_timeout)
        rb = phase(back, t0, cpu_since(cpu0, pid, fleet), before)
        rb["command_wall_seconds"] = round(wall, 3)
        rb.update(command)
        results["rollback"] = rb
        if not back.ok:
            rb["lagging"] = fleet.lagging("rollback")
            raise Incomplete("rollback did not converge")
        memory["rss_after_rollback_kib"] = rss_kib(pid)
        results["ok"] = not results["errors"] and command["exit_code"] == 0
    except Incomplete as error:
        results["errors"].append(str(error))
    except Exception as error:  # report it with the numbers we have
        results["errors"].append(f"{type(error).__name__}: {error}")
    except BaseException as error:  # pytest.fail() from the harness, Ctrl-C
        if isinstance(error, KeyboardInterrupt):
            raise
        results["errors"].append(f"{type(error).__name__}: {error}")
    finally:
        if fleet is not None:
            fleet.close()
        with contextlib.suppress(BaseException):
            plane.stop()
        with contextlib.suppress(BaseException):
            results["server_log"] = server_log(plane)
        results["total_seconds"] = round(time.monotonic() - started, 1)
    return results


class Incomplete(Exception):
    pass


def phase(
    wait: WaitResult,
    t0: float,
    cpu: tuple[float, float],
    before: FleetCount | None = None,
) -> dict[str, Any]:
    """Numbers of one fleet-wide wait; per-node times are node-side ACK times minus t0."""
    count = wait.count
    per_node = sorted(t - t0 for t in count.times.values())
    out: dict[str, Any] = {
        "converged": wait.ok,
        "nodes_matched": count.current,
        "nodes": count.total,
        "poll_wall_seconds": round(wait.waited, 3),
        "server_cpu_seconds": round(cpu[0], 2),
        "simulator_cpu_seconds": round(cpu[1], 2),
        "stream_errors": count.stream_errors - (before.stream_errors if before else 0),
        "connects": count.connects - (before.connects if before else 0),
        "responses": {
            SHORT.get(t, t): n - (before.responses.get(t, 0) if before else 0)
            for t, n in sorted(count.responses.items())
        },
        "response_megabytes": round(
            (count.response_bytes - (before.response_bytes if before else 0)) / 1e6, 2
        ),
        "last_errors": count.last_errors[-3:],
    }
    if per_node:
        out["sim_seconds"] = round(per_node[-1], 3)  # the last node's ACK
        out["per_node_seconds"] = {
            "p50": round(percentile(per_node, 50), 3),
            "p99": round(percentile(per_node, 99), 3),
            "max": round(per_node[-1], 3),
            "min": round(per_node[0], 3),
        }
    return out


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
    return {"nodes": len(nodes), "synced": synced}


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


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of the process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_pair(pid: int, fleet: SimulatedFleet) -> tuple[float, float]:
    """(CPU seconds of xdscp, of all simulator workers) so far."""
    workers = 0.0
    for worker in fleet.worker_pids():
        with contextlib.suppress(OSError):
            workers += cpu_seconds(worker)
    return cpu_seconds(pid), workers


def cpu_since(before: tuple[float, float], pid: int, fleet: SimulatedFleet) -> tuple[float, float]:
    now = cpu_pair(pid, fleet)
    return now[0] - before[0], now[1] - before[1]


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile of sorted `values`."""
    rank = max(1, min(len(values), -(-len(values) * p // 100)))
    return values[int(rank) - 1]


# -- the report -------------------------------------------------------------------------------


def render(r: dict[str, Any]) -> str:
    p = r["params"]
    lines = [
        SECTIONS[0],
        f"nodes {p['nodes']} over {p.get('workers', '?')} worker process(es) x "
        f"{p['channels_per_worker']} channel(s); group {p['group']}; {p['cpu_count']} CPU(s); "
        f"server log level {p['server_log_level']}",
    ]
    if snap := r.get("snapshot"):
        lines += [
            f"config: {p['clusters']} EDS clusters, {p['listeners']} listeners (RDS each), "
            f"{snap['config_bytes'] / 1e3:.0f} kB of YAML",
            f"v1 {snap['v1']}  v2 {snap['v2']}  (rollback changes: "
            f"{', '.join(snap['rollback_changes']) or 'nothing'})",
        ]
    lines.append("")
    lines.append(SECTIONS[1])
    lines += _phase_lines(r.get("connect_storm"), "start of N streams -> all ACKed every v1 type")
    if view := r.get("server_view"):
        lines.append(f"xdscp's own view: {view['synced']}/{view['nodes']} nodes SYNCED on v1")
    lines.append("")
    lines.append(SECTIONS[2])
    push = r.get("push_v2")
    lines += _phase_lines(push, "publish command start -> all ACKed every v2 type")
    if push and "publish_command_wall_seconds" in push:
        lines.append(f"publish command wall: {push['publish_command_wall_seconds']:.3f}s")
    lines.append("")
    lines.append(SECTIONS[3])
    rb = r.get("rollback")
    if rb:
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
    lines.append("")
    lines.append(SECTIONS[4])
    if mem := r.get("memory"):
        lines.append(f"xdscp pid {mem['pid']}: RSS empty {_mib(mem.get('rss_empty_kib'))}")
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
    responses = ", ".join(f"{t} {n}" for t, n in ph["responses"].items() if n)
    lines.append(
        f"responses received: {responses or 'none'} ({ph['response_megabytes']:.2f} MB); "
        f"stream errors {ph['stream_errors']}"
    )
    lines.append(
        f"CPU during this step: xdscp {ph['server_cpu_seconds']:.2f}s, "
        f"simulator workers {ph['simulator_cpu_seconds']:.2f}s"
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
