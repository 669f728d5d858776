"""The benchmark (python -m tests.bench) works end to end at a small size.

A smoke test: 50 simulated Envoys over 2 worker processes against a real `xdsctl serve`.
It checks that every step converged and the report is complete, never how fast.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.bench.__main__ import SECTIONS
from tests.integration.harness import REPO

NODES = 50


def test_bench_runs_end_to_end_at_a_small_size(tmp_path: Path) -> None:
    report_path = tmp_path / "bench.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.bench",
            "--nodes",
            str(NODES),
            "--clusters",
            "20",
            "--listeners",
            "5",
            "--workers",
            "2",
            "--wait-timeout",
            "30",
            "--rollback-timeout",
            "30",
            "--json",
            str(report_path),
            "--workdir",
            str(tmp_path / "work"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = result.stdout
    assert result.returncode == 0, f"{report}\n{result.stderr}"
    for section in SECTIONS:
        assert section in report, report
    assert "OK" in report.splitlines()[-1], report

    numbers = json.loads(report_path.read_text())
    assert numbers["ok"] and not numbers["errors"], numbers["errors"]
    v1, v2 = numbers["snapshot"]["v1"], numbers["snapshot"]["v2"]
    assert v1 != v2
    assert set(numbers["snapshot"]["rollback_changes"]) == {"CDS", "EDS", "RDS"}
    for name in ("connect_storm", "push_v2", "rollback"):
        step = numbers[name]
        assert step["converged"], (name, step)
        assert step["nodes_matched"] == step["nodes"] == NODES, (name, step)
        assert len(step["per_node_seconds"]) == 4, (name, step)
        assert step["stream_errors"] == 0, (name, step)
    # Every node got each v1 type exactly once in the storm.
    assert numbers["connect_storm"]["responses"] == {
        "CDS": NODES,
        "EDS": NODES,
        "LDS": NODES,
        "RDS": NODES,
    }
    assert numbers["server_view"] == {"nodes": NODES, "synced": NODES}

    rollback = numbers["rollback"]
    assert rollback["exit_code"] == 0, rollback
    assert rollback["command_acked"] == rollback["command_total"] == NODES, rollback
    assert rollback["command_version"] == v1
    assert f"{NODES}/{NODES} nodes ACKed {v1}" in report

    memory = numbers["memory"]
    assert memory["streams"] == NODES
    assert memory["rss_idle_kib"] > 0 and "per_stream_kib" in memory
