"""Metrics, logs and alert rules, checked with the real tools: promtool, a Prometheus server
scraping xdscp, and a real Envoy producing the ACKs and NACKs counted."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from controlplane import resources
from tests.integration import edge_config
from tests.integration.ads_client import AckingNode
from tests.integration.harness import REPO, XdsControlPlane, free_port, http_get, wait_for

RULES = REPO / "deploy/prometheus"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: run `bash scripts/setup` (Debian package prometheus)")
    return path


def scrape(plane: XdsControlPlane) -> str:
    status, body = http_get(f"http://127.0.0.1:{plane.http_port}/metrics")
    assert status == 200
    return body


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_one_acked_and_one_nacked_publish_and_pass_promtool(
    control_plane, upstream, start_envoy, tmp_path
) -> None:
    a = upstream("a")
    port = free_port()
    edge_config.write(
        tmp_path / "good",
        listener_port=port,
        backends={"a": a.port},
        routes=[edge_config.route_to("a")],
    )
    control_plane.xdsctl("publish", str(tmp_path / "good"), "--group", "edge")
    start_envoy("edge-1", "edge", control_plane.xds_port)
    wait_for(
        lambda: (
            control_plane.node_types("edge-1").get("RouteConfiguration", {}).get("state")
            == "SYNCED"
        ),
        what="routes ACKed",
    )
    bad = edge_config.nacked_regex_route("a")
    edge_config.write(tmp_path / "bad", listener_port=port, backends={"a": a.port}, routes=[bad])
    bad_version = control_plane.xdsctl(
        "publish", str(tmp_path / "bad"), "--group", "edge"
    ).stdout.strip()
    wait_for(
        lambda: (
            control_plane.node_types("edge-1").get("RouteConfiguration", {}).get("state")
            == "NACKED"
        ),
        what="routes NACKed",
    )

    text = scrape(control_plane)
    check = subprocess.run(
        [tool("promtool"), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    metrics = samples(text)
    rds = {"type_url": resources.ROUTE, "group": "edge"}
    cds = {"type_url": resources.CLUSTER, "group": "edge"}
    assert value(metrics, "xdscp_pushes_total", **rds) == 2
    assert value(metrics, "xdscp_acks_total", **rds) == 1
    assert value(metrics, "xdscp_nacks_total", **rds) == 1
    assert value(metrics, "xdscp_pushes_total", **cds) == 1  # clusters did not change
    assert value(metrics, "xdscp_acks_total", **cds) == 1
    assert value(metrics, "xdscp_nacks_total", **cds) == 0
    assert value(metrics, "xdscp_pushed_bytes_total", **rds) > 0
    assert value(metrics, "xdscp_nodes", group="edge") == 1
    assert value(metrics, "xdscp_nodes_out_of_sync", group="edge") == 1  # it NACKed
    assert value(metrics, "xdscp_streams", protocol="sotw") == 1
    assert (
        value(
            metrics, "xdscp_group_version_info", group="edge", pointer="stable", version=bad_version
        )
        == 1
    )
    assert value(metrics, "xdscp_convergence_seconds_count", group="edge") == 1  # the good one
    assert value(metrics, "xdscp_snapshot_size_bytes", group="edge") > 0
    for name in ("node_id", "version"):  # bounded cardinality: no per-node or per-version counters
        assert all(
            name not in dict(labels) for (metric, labels) in metrics if metric.endswith("_total")
        )


def test_a_nack_is_logged_as_one_json_line_with_its_context(
    control_plane, upstream, start_envoy, tmp_path
) -> None:
    a = upstream("a")
    port = free_port()
    bad = edge_config.nacked_regex_route("a")
    edge_config.write(
        tmp_path / "c",
        listener_port=port,
        backends={"a": a.port},
        routes=[edge_config.route_to("a")],
    )
    control_plane.xdsctl("publish", str(tmp_path / "c"), "--group", "edge")
    start_envoy("edge-1", "edge", control_plane.xds_port)
    edge_config.write(tmp_path / "bad", listener_port=port, backends={"a": a.port}, routes=[bad])
    control_plane.xdsctl("publish", str(tmp_path / "bad"), "--group", "edge")

    nack = wait_for(
        lambda: next((e for e in control_plane.log_events() if e["event"] == "nack"), None),
        what="a nack log line",
    )
    route = control_plane.node_types("edge-1")["RouteConfiguration"]
    assert nack["level"] == "warning"
    assert nack["node_id"] == "edge-1" and nack["group"] == "edge"
    assert nack["type_url"] == resources.ROUTE
    assert nack["version"] == route["nacked_version"]
    assert re.fullmatch(r"\d+\.\d+", nack["nonce"])  # <epoch>.<n>: see xds/stream.py
    assert "missing )" in nack["error"]
    assert nack["timestamp"].endswith("Z")
    publishes = [e for e in control_plane.log_events() if e["event"] == "publish"]
    assert [p["outcome"] for p in publishes] == ["promoted", "promoted"]


def test_prometheus_scrapes_xdscp_and_counts_connected_nodes(control_plane, tmp_path) -> None:
    edge_config.write(
        tmp_path / "c",
        listener_port=free_port(),
        backends={"a": 1},
        routes=[edge_config.route_to("a")],
    )
    control_plane.xdsctl("publish", str(tmp_path / "c"), "--group", "edge")
    nodes = [AckingNode(control_plane.xds_port, f"node-{i}", "edge") for i in range(3)]
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s"},
                "scrape_configs": [
                    {
                        "job_name": "xdscp",
                        "static_configs": [{"targets": [f"127.0.0.1:{control_plane.http_port}"]}],
                    }
                ],
            }
        )
    )
    port = free_port()
    prometheus = subprocess.Popen(
        [
            tool("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("wb"),
    )
    try:
        query = urllib.parse.quote('sum(xdscp_nodes{group="edge"})')

        def connected() -> float | None:
            status, body = http_get(f"http://127.0.0.1:{port}/api/v1/query?query={query}")
            result = json.loads(body)["data"]["result"] if status == 200 else []
            return float(result[0]["value"][1]) if result else None

        assert wait_for(lambda: connected() == 3, timeout=30, what="Prometheus sees 3 nodes")
        up = urllib.parse.quote('up{job="xdscp"}')
        _, body = http_get(f"http://127.0.0.1:{port}/api/v1/query?query={up}")
        assert json.loads(body)["data"]["result"][0]["value"][1] == "1"
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=15)
        for node in nodes:
            node.close()


def test_alert_rules_are_valid_and_the_nack_alert_fires() -> None:
    check = subprocess.run(
        [tool("promtool"), "check", "rules", str(RULES / "alerts.yml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 6 rules found" in check.stdout
    test = subprocess.run(
        [tool("promtool"), "test", "rules", "alerts_test.yml"],
        cwd=RULES,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert test.returncode == 0, test.stdout + test.stderr
    tests = yaml.safe_load((RULES / "alerts_test.yml").read_text())["tests"][0]["alert_rule_test"]
    assert any(t["alertname"] == "XdscpEnvoyRejectedConfig" and t["exp_alerts"] for t in tests)
    guard_tests = yaml.safe_load((RULES / "alerts_test.yml").read_text())["tests"][1]
    fired = {t["alertname"] for t in guard_tests["alert_rule_test"] if t["exp_alerts"]}
    assert fired == {"XdscpFreshEnvoyStuck", "XdscpGuardRolledBack"}


def test_prometheus_config_for_compose_is_valid(tmp_path: Path) -> None:
    # promtool resolves rule_files relative to the config: check a copy laid out as in compose.
    shutil.copy(RULES / "alerts.yml", tmp_path / "alerts.yml")
    text = (
        (RULES / "prometheus.yml").read_text().replace("/etc/prometheus/alerts.yml", "alerts.yml")
    )
    (tmp_path / "prometheus.yml").write_text(text)
    check = subprocess.run(
        [tool("promtool"), "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stdout + check.stderr
