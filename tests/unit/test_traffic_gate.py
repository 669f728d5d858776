"""The canary gate with traffic checks: simulated nodes, a fake clock, check results as input."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from controlplane.rollout.gate import Decision, NodeObservation, Phase, Rollout
from controlplane.rollout.policy import CanarySelector, PolicyError, RolloutPolicy, load_policies
from controlplane.rollout.traffic import (
    CheckResult,
    NoData,
    Outcome,
    TrafficCheck,
    TrafficPolicy,
)

STAGED_AT = 1000.0
CANDIDATE = "c" * 16
QUERY = 'ratio{node=~"canary-1"}'
TRAFFIC = TrafficPolicy(
    prometheus="http://prom:9090",
    checks=(TrafficCheck(name="5xx", query="ratio", max=0.05),),
    interval_seconds=5,
    min_passes=2,
)
POLICY = RolloutPolicy(
    canary=CanarySelector(metadata={"canary": "true"}),
    min_existing=1,
    bake_seconds=10,
    deadline_seconds=300,
    traffic=TRAFFIC,
)
CANARY = NodeObservation(
    stream_id=1,
    node_id="canary-1",
    canary=True,
    connected_at=STAGED_AT - 500,
    started_empty=False,
    version=CANDIDATE,
    synced=True,
)


def rollout() -> Rollout:
    return Rollout(
        group="edge",
        candidate=CANDIDATE,
        previous_stable="s" * 16,
        staged_at=STAGED_AT,
        actor="alice",
        message="m",
    )


def result(outcome: Outcome, value: float | None = None) -> list[CheckResult]:
    return [CheckResult("5xx", outcome, QUERY, value, "detail")]


def test_checks_are_due_from_the_start_of_the_bake_every_interval() -> None:
    r = rollout()
    assert not r.traffic_due(POLICY, STAGED_AT + 100)  # canaries have not ACKed yet
    r.observe(POLICY, STAGED_AT + 1, [CANARY])  # evidence complete: the bake starts
    assert not r.traffic_due(POLICY, STAGED_AT + 5)
    assert r.traffic_due(POLICY, STAGED_AT + 6)
    assert not r.traffic_due(POLICY, STAGED_AT + 10)
    assert r.traffic_due(POLICY, STAGED_AT + 11)
    assert not r.traffic_due(replace(POLICY, traffic=None), STAGED_AT + 100)


def test_promotion_waits_for_min_passes_of_every_check_even_after_the_bake() -> None:
    r = rollout()
    r.observe(POLICY, STAGED_AT + 1, [CANARY])
    r.traffic_results(POLICY, STAGED_AT + 6, result(Outcome.PASS, 0.0))
    assert r.observe(POLICY, STAGED_AT + 20, [CANARY]) is None  # baked, but 1 of 2 passes
    assert "traffic 5xx 1/2" in r.progress(POLICY)
    r.traffic_results(POLICY, STAGED_AT + 21, result(Outcome.NO_DATA))  # does not count
    assert r.observe(POLICY, STAGED_AT + 22, [CANARY]) is None
    r.traffic_results(POLICY, STAGED_AT + 26, result(Outcome.PASS, 0.01))
    assert r.observe(POLICY, STAGED_AT + 27, [CANARY]) is Decision.PROMOTE


def test_a_failing_check_aborts_naming_the_query_its_value_and_the_threshold() -> None:
    r = rollout()
    r.observe(POLICY, STAGED_AT + 1, [CANARY])
    r.traffic_results(POLICY, STAGED_AT + 6, result(Outcome.FAIL, 0.75))
    assert r.observe(POLICY, STAGED_AT + 7, [CANARY]) is Decision.ABORT
    assert r.phase is Phase.ABORTED
    assert r.reason == f"traffic check 5xx failed: {QUERY} = 0.75, threshold max 0.05"


def test_failure_limit_tolerates_failures_below_it() -> None:
    policy = replace(POLICY, traffic=replace(TRAFFIC, failure_limit=2))
    r = rollout()
    r.observe(policy, STAGED_AT + 1, [CANARY])
    r.traffic_results(policy, STAGED_AT + 6, result(Outcome.FAIL, 0.1))
    assert r.observe(policy, STAGED_AT + 7, [CANARY]) is None
    r.traffic_results(policy, STAGED_AT + 11, result(Outcome.FAIL, 0.2))
    assert r.observe(policy, STAGED_AT + 12, [CANARY]) is Decision.ABORT
    assert r.reason.startswith("traffic check 5xx failed (2 failing evaluations): ")


def test_no_data_waits_by_default_until_the_deadline() -> None:
    r = rollout()
    r.observe(POLICY, STAGED_AT + 1, [CANARY])
    r.traffic_results(POLICY, STAGED_AT + 6, result(Outcome.NO_DATA))
    r.traffic_results(POLICY, STAGED_AT + 11, result(Outcome.ERROR))
    assert r.observe(POLICY, STAGED_AT + 299, [CANARY]) is None
    assert r.observe(POLICY, STAGED_AT + 301, [CANARY]) is Decision.ABORT
    assert "deadline of 300s passed" in r.reason and "traffic 5xx 0/2" in r.reason


def test_with_on_no_data_abort_no_data_is_a_failure() -> None:
    policy = replace(POLICY, traffic=replace(TRAFFIC, on_no_data=NoData.ABORT))
    r = rollout()
    r.observe(policy, STAGED_AT + 1, [CANARY])
    r.traffic_results(policy, STAGED_AT + 6, result(Outcome.NO_DATA))
    assert r.observe(policy, STAGED_AT + 7, [CANARY]) is Decision.ABORT
    assert r.reason == f"traffic check 5xx failed: {QUERY}: detail (on_no_data: abort)"


def test_a_failing_check_aborts_a_rollout_awaiting_promotion() -> None:
    policy = replace(POLICY, auto_promote=False)
    r = rollout()
    r.observe(policy, STAGED_AT + 1, [CANARY])
    for t in (6, 11):
        r.traffic_results(policy, STAGED_AT + t, result(Outcome.PASS, 0.0))
    assert r.observe(policy, STAGED_AT + 12, [CANARY]) is Decision.AWAIT_PROMOTION
    r.traffic_results(policy, STAGED_AT + 16, result(Outcome.FAIL, 1.0))
    assert r.observe(policy, STAGED_AT + 17, [CANARY]) is Decision.ABORT


def test_results_after_the_end_are_ignored_and_the_record_round_trips() -> None:
    r = rollout()
    r.observe(POLICY, STAGED_AT + 1, [CANARY])
    r.traffic_results(POLICY, STAGED_AT + 6, result(Outcome.PASS, 0.0))
    r.abort(STAGED_AT + 7, "by hand")
    r.traffic_results(POLICY, STAGED_AT + 11, result(Outcome.FAIL, 1.0))
    (state,) = r.traffic
    assert (state.state, state.passes, state.failures, state.value) == ("pass", 1, 0, 0.0)
    again = Rollout.from_record(r.to_record())
    assert again.to_record() == r.to_record() and again.traffic == r.traffic


GOOD = """
groups:
  edge:
    canary: {node_id: "edge-canary-*"}
    traffic:
      prometheus: http://127.0.0.1:9090/
      interval_seconds: 5
      timeout_seconds: 3
      min_passes: 2
      on_no_data: abort
      checks:
        - {name: canary-5xx, query: 'sum(rate(x{node=~"{{ canaries }}"}[{{ window }}]))', max: 0.05}
        - {name: up, query: 'min(up{group="{{ group }}"})', min: 1}
"""


def test_loads_a_traffic_section(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD)
    traffic = load_policies(path)["edge"].traffic
    assert traffic is not None
    assert traffic.prometheus == "http://127.0.0.1:9090"
    assert (traffic.interval_seconds, traffic.timeout_seconds, traffic.min_passes) == (5, 3, 2)
    assert traffic.failure_limit == 1 and traffic.on_no_data is NoData.ABORT
    assert [(c.name, c.max, c.min) for c in traffic.checks] == [
        ("canary-5xx", 0.05, None),
        ("up", None, 1.0),
    ]


CHECK = "{name: c, query: 'q', max: 1}"


@pytest.mark.parametrize(
    ("traffic", "message"),
    [
        (f"{{checks: [{CHECK}]}}", "traffic.prometheus: expected an http:// or https:// URL"),
        (
            f"{{prometheus: 'http://p', checks: [{CHECK}], every: 3}}",
            "traffic: unknown field(s) every",
        ),
        ("{prometheus: 'http://p', checks: []}", "traffic.checks: expected a list of 1 to 16"),
        (
            f"{{prometheus: 'http://p', checks: [{CHECK}], on_no_data: skip}}",
            "traffic.on_no_data: expected wait or abort, got 'skip'",
        ),
        (
            f"{{prometheus: 'http://p', checks: [{CHECK}], interval_seconds: 0}}",
            "traffic.interval_seconds: must be above 0",
        ),
        (
            f"{{prometheus: 'http://p', checks: [{CHECK}], min_passes: 0}}",
            "traffic.min_passes: must be above 0",
        ),
        (
            f"{{prometheus: 'http://p', checks: [{CHECK}, {CHECK}]}}",
            "traffic.checks: check names must be unique",
        ),
        (
            "{prometheus: 'http://p', checks: [{name: 'a b', query: q, max: 1}]}",
            "traffic.checks[0].name: expected 1-64 of",
        ),
        (
            "{prometheus: 'http://p', checks: [{name: c, query: q}]}",
            "traffic.checks[0]: needs a threshold",
        ),
        (
            "{prometheus: 'http://p', checks: [{name: c, query: q, max: .nan}]}",
            "traffic.checks[0].max: expected a finite number",
        ),
        (
            "{prometheus: 'http://p', checks: [{name: c, query: '{{ node }}', max: 1}]}",
            "traffic.checks[0].query: unknown placeholder(s) node",
        ),
    ],
)
def test_a_bad_traffic_section_names_the_file_group_and_key(
    tmp_path: Path, traffic: str, message: str
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(f"groups: {{edge: {{canary: {{percent: 5}}, traffic: {traffic}}}}}")
    with pytest.raises(PolicyError) as caught:
        load_policies(path)
    assert str(caught.value).startswith(f"{path}: groups.edge.")
    assert message in str(caught.value)


def example_traffic(tmp_path: Path) -> TrafficPolicy | None:
    """The commented `traffic:` section of the shipped example policy, uncommented."""
    repo = Path(__file__).resolve().parents[2]
    lines = (repo / "examples/rollout-policy.yaml").read_text().splitlines()
    start = lines.index(next(line for line in lines if line.startswith("    # traffic:")))
    end = start
    while end < len(lines) and lines[end].startswith("    #"):
        end += 1
    uncommented = [line[:4] + line[6:] for line in lines[start:end]]
    path = tmp_path / "policy.yaml"
    path.write_text("\n".join([*lines[:start], *uncommented, *lines[end:]]))
    return load_policies(path)["default"].traffic


def test_the_shipped_commented_traffic_example_loads_once_uncommented(tmp_path: Path) -> None:
    traffic = example_traffic(tmp_path)
    assert traffic is not None
    assert [c.name for c in traffic.checks] == ["canary-5xx", "canary-connect-failures"]
    assert all("{{ canaries }}" in c.query for c in traffic.checks)
