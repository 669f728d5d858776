"""The traffic gate with a real Prometheus scraping a real canary Envoy's /stats/prometheus.

A candidate that routes the canary's traffic to a dead cluster is accepted (ACKed) by Envoy,
so only its traffic shows that it is bad: the rollout must abort on the canary's 5xx ratio.
The same policy promotes a healthy candidate, and only after the required passing checks.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration import edge_config
from tests.integration.harness import (
    Envoy,
    HttpUpstream,
    Prometheus,
    XdsControlPlane,
    free_port,
    wait_for,
)
from tests.integration.test_observability import samples, scrape, tool, value

CANARY = {"canary": "true"}
MIN_PASSES = 2
MAX_5XX_RATIO = 0.05
FIVE_XX_RATIO = (
    'sum(rate(envoy_http_downstream_rq_xx{node=~"{{ canaries }}",'
    'envoy_http_conn_manager_prefix="edge",envoy_response_code_class="5"}[{{ window }}]))'
    ' / sum(rate(envoy_http_downstream_rq_total{node=~"{{ canaries }}",'
    'envoy_http_conn_manager_prefix="edge"}[{{ window }}]))'
)


class Traffic:
    """Requests through the canary's listener, ten a second, until stopped."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/"
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    self.statuses.append(response.status)
            except urllib.error.HTTPError as error:
                self.statuses.append(error.code)
            except OSError:
                self.statuses.append(0)

    def start(self) -> Traffic:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class Fleet:
    """Group edge: one canary Envoy serving traffic, scraped by Prometheus; v1 routes to a
    live backend. xdscp restarts with the traffic policy once v1 is stable."""

    def __init__(self, tmp_path: Path, start_envoy, upstream) -> None:  # type: ignore[no-untyped-def]
        self.tmp_path = tmp_path
        self.plane = XdsControlPlane(tmp_path).start()
        self.port = free_port()
        live: list[HttpUpstream] = [upstream("a"), upstream("b")]
        self.backends = {"a": live[0].port, "b": live[1].port, "dead": free_port()}
        self.v1 = self.publish("v1", route_to="a", expect="published")
        self.canary: Envoy = start_envoy(
            "edge-canary-1", "edge", self.plane.xds_port, metadata=CANARY
        )
        wait_for(lambda: self.canary.route_targets() == {"a"}, what="the canary on v1")
        self.prometheus = Prometheus(
            tmp_path,
            {f"127.0.0.1:{self.canary.admin_port}": {"node": "edge-canary-1"}},
            metrics_path="/stats/prometheus",
        ).start()
        self.prometheus.wait_scraped({"node": "edge-canary-1"})
        self.traffic = Traffic(self.port).start()
        self.plane.stop()
        self.plane.extra_args = ("--rollout-policy", str(self.policy_file()))
        self.plane.start()

    def policy_file(self) -> Path:
        path = self.tmp_path / "rollout-policy.yaml"
        policy = {
            "groups": {
                "edge": {
                    "canary": {"metadata": CANARY},
                    "min_existing": 1,
                    "bake_seconds": 1,
                    "ack_timeout_seconds": 15,
                    "deadline_seconds": 90,
                    "traffic": {
                        "prometheus": self.prometheus.url,
                        "interval_seconds": 2,
                        "timeout_seconds": 3,
                        "min_passes": MIN_PASSES,
                        "on_no_data": "wait",
                        "checks": [
                            {"name": "canary-5xx", "query": FIVE_XX_RATIO, "max": MAX_5XX_RATIO}
                        ],
                    },
                }
            }
        }
        path.write_text(yaml.safe_dump(policy))
        return path

    def publish(self, name: str, *, route_to: str, expect: str) -> str:
        directory = edge_config.write(
            self.tmp_path / name,
            listener_port=self.port,
            backends=self.backends,
            routes=[edge_config.route_to(route_to)],
        )
        result = self.plane.xdsctl("publish", str(directory), "--group", "edge", "-m", name)
        assert expect in result.stderr, result.stderr
        return result.stdout.strip()

    def rollout(self) -> dict[str, Any]:
        listed = json.loads(self.plane.xdsctl("rollout", "status", "--json").stdout)
        return next((r for r in listed.get("rollouts", []) if r["group"] == "edge"), {})

    def wait_ended(self, timeout: float = 60) -> dict[str, Any]:
        return wait_for(
            lambda: (r := self.rollout()).get("phase") in ("promoted", "aborted") and r,
            timeout=timeout,
            what="the rollout to end",
            explain=lambda: json.dumps(self.rollout(), indent=1),
        )

    def stop(self) -> None:
        self.traffic.stop()
        self.plane.stop()
        self.prometheus.stop()


@pytest.fixture
def fleet(tmp_path: Path, start_envoy, upstream) -> Iterator[Fleet]:  # type: ignore[no-untyped-def]
    fleet = Fleet(tmp_path, start_envoy, upstream)
    yield fleet
    fleet.stop()


def test_a_candidate_that_envoy_accepts_but_that_fails_traffic_is_aborted_on_its_5xx_ratio(
    fleet,
) -> None:
    wait_for(lambda: 200 in fleet.traffic.statuses, what="traffic answered 200 on v1")
    candidate = fleet.publish("dead-route", route_to="dead", expect="staged")

    rollout = fleet.wait_ended()
    assert rollout["phase"] == "aborted", rollout
    assert rollout["candidate"] == candidate
    assert rollout["existing_acked"] == ["edge-canary-1"]  # Envoy accepted it
    reason = re.fullmatch(
        r"traffic check canary-5xx failed: (.+) = (\S+), threshold max 0\.05", rollout["reason"]
    )
    assert reason is not None, rollout["reason"]
    assert 'node=~"edge-canary-1"' in reason.group(1)  # the query as sent, canaries filled in
    assert float(reason.group(2)) > MAX_5XX_RATIO
    (check,) = rollout["traffic_checks"]
    assert check["state"] == "fail" and check["failures"] == 1
    assert check["value"] == pytest.approx(float(reason.group(2)), rel=1e-5)  # printed %g
    # The canary is back on stable: its traffic reaches the live backend again.
    wait_for(lambda: fleet.canary.route_targets() == {"a"}, what="the canary back on v1")
    assert 503 in fleet.traffic.statuses
    table = fleet.plane.xdsctl("rollout", "status").stdout
    assert "ABORTED" in table and "canary-5xx: FAIL" in table and "failures 1" in table
    text = scrape(fleet.plane)
    promtool = subprocess.run(
        [tool("promtool"), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert promtool.returncode == 0, promtool.stdout + promtool.stderr
    labels = {"group": "edge", "check": "canary-5xx"}
    metrics = samples(text)
    assert value(metrics, "xdscp_traffic_check_evaluations_total", **labels, result="fail") == 1
    assert value(metrics, "xdscp_rollouts_total", group="edge", outcome="aborted") == 1


def test_a_healthy_candidate_with_the_same_policy_promotes_after_the_required_passes(
    fleet,
) -> None:
    candidate = fleet.publish("v2", route_to="b", expect="staged")

    rollout = fleet.wait_ended()
    assert rollout["phase"] == "promoted", rollout
    assert rollout["candidate"] == candidate
    (check,) = rollout["traffic_checks"]
    # The gate promoted on the tick after the last required pass, not before.
    assert check["state"] == "pass" and check["passes"] == MIN_PASSES, check
    assert check.get("failures", 0) == 0 and check["value"] == 0.0
    wait_for(lambda: fleet.canary.route_targets() == {"b"}, what="the canary on v2")
    assert 503 not in fleet.traffic.statuses
