"""The canary gate state machine with simulated nodes and a fake clock."""

from __future__ import annotations

from dataclasses import replace

import pytest

from controlplane.rollout.gate import (
    MAX_CANARY_DISCONNECTS,
    Decision,
    NodeObservation,
    Pending,
    Phase,
    ProbeState,
    Rollout,
)
from controlplane.rollout.policy import CanarySelector, RolloutPolicy

STAGED_AT = 1000.0
CANDIDATE, STABLE = "c" * 16, "s" * 16
POLICY = RolloutPolicy(
    canary=CanarySelector(metadata={"canary": "true"}),
    min_existing=1,
    min_fresh=1,
    bake_seconds=10,
    ack_timeout_seconds=30,
    deadline_seconds=300,
)


def rollout(**fields: object) -> Rollout:
    return Rollout(
        group="edge",
        candidate=CANDIDATE,
        previous_stable=STABLE,
        staged_at=STAGED_AT,
        actor="alice",
        message="new routes",
        **fields,  # type: ignore[arg-type]
    )


def existing(node_id: str = "canary-old", **fields: object) -> NodeObservation:
    """A canary connected before staging, now sent the candidate."""
    base = NodeObservation(
        stream_id=hash(node_id) & 0xFFFF,
        node_id=node_id,
        canary=True,
        connected_at=STAGED_AT - 500,
        started_empty=True,
        version=CANDIDATE,
        synced=True,
    )
    return replace(base, **fields)  # type: ignore[arg-type]


def fresh(node_id: str = "canary-new", **fields: object) -> NodeObservation:
    """A canary whose stream opened after staging, holding nothing."""
    return existing(node_id, connected_at=STAGED_AT + 5, **fields)


def stable_node(node_id: str = "web-1", **fields: object) -> NodeObservation:
    return existing(node_id, canary=False, version=STABLE, **fields)


def test_promotes_after_existing_and_fresh_acks_and_the_bake() -> None:
    r = rollout()
    nodes = [existing(), fresh(), stable_node()]
    assert r.observe(POLICY, STAGED_AT + 10, nodes) is None  # evidence complete, bake starts
    assert r.existing_acked == ["canary-old"] and r.fresh_acked == ["canary-new"]
    assert r.observe(POLICY, STAGED_AT + 19, nodes) is None  # still baking
    assert r.observe(POLICY, STAGED_AT + 20, nodes) is Decision.PROMOTE
    assert r.phase is Phase.PROMOTED


def test_existing_canary_acks_but_fresh_one_fails_to_ack() -> None:
    r = rollout()
    nodes = [existing(), fresh(synced=False)]
    assert r.observe(POLICY, STAGED_AT + 6, nodes) is None
    assert r.fresh_acked == []
    decision = r.observe(POLICY, STAGED_AT + 40, nodes)
    assert decision is Decision.ABORT
    assert r.reason == "canary canary-new did not ACK the candidate within 30s"


def test_existing_canary_acks_but_fresh_probe_never_gets_ready() -> None:
    policy = replace(POLICY, min_fresh=0, fresh_probe=object())  # type: ignore[arg-type]
    r = rollout(probe_state=ProbeState.RUNNING)
    assert r.observe(policy, STAGED_AT + 5, [existing()]) is None
    assert r.observe(policy, STAGED_AT + 50, [existing()]) is None  # bake passed, probe pending
    r.probe_finished(False, "not LIVE after 30s (server state: INITIALIZING)", "xdscp-probe-1")
    assert r.observe(policy, STAGED_AT + 51, [existing()]) is Decision.ABORT
    assert r.reason == "fresh probe failed: not LIVE after 30s (server state: INITIALIZING)"


def test_a_passed_probe_is_fresh_evidence() -> None:
    policy = replace(POLICY, fresh_probe=object())  # type: ignore[arg-type]
    r = rollout(probe_state=ProbeState.RUNNING)
    r.probe_finished(True, "ready", "xdscp-probe-edge-1")
    assert r.fresh_acked == ["xdscp-probe-edge-1"]
    assert r.observe(policy, STAGED_AT + 5, [existing()]) is None
    assert r.observe(policy, STAGED_AT + 15, [existing()]) is Decision.PROMOTE


def test_a_canary_reconnecting_with_the_config_it_held_counts_as_existing() -> None:
    r = rollout()
    reconnected = fresh("canary-back", started_empty=False)
    r.observe(POLICY, STAGED_AT + 10, [reconnected, fresh()])
    assert r.existing_acked == ["canary-back"] and r.fresh_acked == ["canary-new"]


def test_a_canary_restarted_mid_rollout_is_pending_then_counts_as_fresh() -> None:
    policy = replace(POLICY, min_fresh=1)
    r = rollout()
    assert r.observe(policy, STAGED_AT + 1, [existing("canary-1")]) is None
    assert r.existing_acked == ["canary-1"]
    assert r.observe(policy, STAGED_AT + 2, []) is None  # stopped: not lost, pending
    assert r.pending == [Pending("canary-1", "reconnect", STAGED_AT + 2)]
    assert r.pending[0].describe(CANDIDATE, STAGED_AT + 7) == (
        "canary-1: reconnect (disconnected 5s ago)"
    )
    restarted = fresh("canary-1", stream_id=77, synced=False, owed=("CLUSTER", "LISTENER"))
    assert r.observe(policy, STAGED_AT + 8, [restarted]) is None
    assert [p.describe(CANDIDATE, STAGED_AT + 8) for p in r.pending] == [
        f"canary-1: ACK of CLUSTER,LISTENER for {CANDIDATE}"
    ]
    assert r.observe(policy, STAGED_AT + 9, [replace(restarted, synced=True)]) is None
    assert r.fresh_acked == ["canary-1"] and r.pending == []
    assert r.observe(policy, STAGED_AT + 19, [replace(restarted, synced=True)]) is Decision.PROMOTE


def test_the_bake_does_not_end_while_a_canary_is_pending() -> None:
    r = rollout()
    nodes = [existing(), fresh()]
    r.observe(POLICY, STAGED_AT + 1, nodes)
    assert r.bake_left(POLICY, STAGED_AT + 4) == 7
    assert r.observe(POLICY, STAGED_AT + 11, [fresh()]) is None  # canary-old went away
    assert r.bake_left(POLICY, STAGED_AT + 11) == 0
    back = existing(stream_id=5, connected_at=STAGED_AT + 12, started_empty=False)
    assert r.observe(POLICY, STAGED_AT + 12, [back, fresh()]) is Decision.PROMOTE
    assert r.bake_left(POLICY, STAGED_AT + 12) is None


def test_a_canary_that_does_not_come_back_aborts_after_the_ack_timeout() -> None:
    r = rollout()
    r.observe(POLICY, STAGED_AT + 1, [existing(), fresh()])
    assert r.observe(POLICY, STAGED_AT + 5, [fresh()]) is None
    assert r.observe(POLICY, STAGED_AT + 36, [fresh()]) is Decision.ABORT
    assert r.reason == (
        "canary canary-old disconnected during the rollout and did not reconnect within 30s"
    )


def test_a_canary_crash_looping_on_the_candidate_aborts() -> None:
    r = rollout()
    now = STAGED_AT
    for stream_id in range(MAX_CANARY_DISCONNECTS + 1):
        now += 1
        r.observe(POLICY, now, [existing(stream_id=stream_id, synced=False)])
        now += 1
        decision = r.observe(POLICY, now, [])
    assert decision is Decision.ABORT
    assert r.reason == (
        f"canary canary-old disconnected {MAX_CANARY_DISCONNECTS + 1} times during the "
        f"rollout (more than {MAX_CANARY_DISCONNECTS}: a crash loop?)"
    )


def test_nack_from_a_canary_aborts_with_its_error_text() -> None:
    r = rollout()
    nack = existing(synced=False, rejection="missing ): ((")
    assert r.observe(POLICY, STAGED_AT + 1, [nack, stable_node()]) is Decision.ABORT
    assert r.phase is Phase.ABORTED
    assert r.reason == "canary canary-old NACKed the candidate: missing ): (("


def test_nack_from_a_non_canary_on_stable_does_not_abort() -> None:
    r = rollout()
    nodes = [existing(), stable_node(synced=False, rejection="unrelated")]
    assert r.observe(POLICY, STAGED_AT + 1, nodes) is None


def test_the_probe_going_away_is_not_a_disconnect() -> None:
    policy = replace(POLICY, min_fresh=1)
    r = rollout()
    probe = fresh("xdscp-probe-edge-1", probe=True)
    r.observe(policy, STAGED_AT + 1, [existing(), probe])
    assert r.fresh_acked == ["xdscp-probe-edge-1"]
    assert r.observe(policy, STAGED_AT + 2, [existing()]) is None


def test_non_canary_joining_mid_rollout_is_not_evidence_and_not_a_failure() -> None:
    r = rollout()
    newcomer = stable_node("web-9", connected_at=STAGED_AT + 3, synced=False)
    assert r.observe(POLICY, STAGED_AT + 4, [existing(), newcomer]) is None
    assert r.fresh_acked == []
    assert r.observe(POLICY, STAGED_AT + 100, [existing(), newcomer]) is None  # never its job


def test_deadline_aborts_with_the_progress_so_far() -> None:
    r = rollout()
    assert r.observe(POLICY, STAGED_AT + 5, [existing()]) is None
    decision = r.observe(POLICY, STAGED_AT + 301, [existing()])
    assert decision is Decision.ABORT
    assert r.reason == "deadline of 300s passed (existing 1/1, fresh 0/1)"


def test_deadline_names_the_canaries_still_pending() -> None:
    r = rollout()
    stuck = existing(synced=False, owed=("CLUSTER",))
    slow = replace(POLICY, ack_timeout_seconds=1000)
    assert r.observe(slow, STAGED_AT + 5, [stuck]) is None
    assert r.observe(slow, STAGED_AT + 301, [stuck]) is Decision.ABORT
    assert r.reason == (
        "deadline of 300s passed (existing 0/1, fresh 0/1; "
        f"waiting for canary-old: ACK of CLUSTER for {CANDIDATE})"
    )


def test_manual_promotion_waits_for_a_human() -> None:
    policy = replace(POLICY, auto_promote=False)
    r = rollout()
    nodes = [existing(), fresh()]
    r.observe(policy, STAGED_AT + 10, nodes)
    assert r.observe(policy, STAGED_AT + 21, nodes) is Decision.AWAIT_PROMOTION
    assert r.phase is Phase.AWAITING_PROMOTION
    assert r.observe(policy, STAGED_AT + 500, nodes) is None  # no deadline once verified
    assert r.promote(STAGED_AT + 501, "by bob") is Decision.PROMOTE
    assert r.phase is Phase.PROMOTED


def test_failure_while_awaiting_promotion_still_aborts() -> None:
    policy = replace(POLICY, auto_promote=False)
    r = rollout()
    r.observe(policy, STAGED_AT + 10, [existing(), fresh()])
    r.observe(policy, STAGED_AT + 21, [existing(), fresh()])
    assert r.observe(policy, STAGED_AT + 22, [existing(), fresh(rejection="bad")]) is Decision.ABORT


def test_a_finished_rollout_decides_nothing_more() -> None:
    r = rollout()
    r.abort(STAGED_AT + 1, "by hand")
    assert r.observe(POLICY, STAGED_AT + 2, [existing(rejection="x")]) is None
    assert r.reason == "by hand"


def test_record_round_trip_for_persistence() -> None:
    r = rollout(probe_state=ProbeState.RUNNING)
    r.observe(POLICY, STAGED_AT + 10, [existing(), fresh()])
    again = Rollout.from_record(r.to_record())
    assert again.to_record() == r.to_record()
    assert again.phase is Phase.CANARY and again.probe_state is ProbeState.RUNNING


@pytest.mark.parametrize(
    ("selector", "node_id", "metadata", "expected"),
    [
        (CanarySelector(metadata={"canary": "true"}), "a", {"canary": "true"}, True),
        (CanarySelector(metadata={"canary": "true"}), "a", {"canary": "false"}, False),
        (CanarySelector(node_id_glob="edge-canary-*"), "edge-canary-7", {}, True),
        (CanarySelector(node_id_glob="edge-canary-*"), "edge-7", {}, False),
        (CanarySelector(metadata={"canary": "true"}), "probe", {"xdscp.probe": "true"}, True),
    ],
)
def test_canary_selectors(selector, node_id, metadata, expected) -> None:
    from controlplane.xds.stream import NodeInfo

    node = NodeInfo(node_id, "edge", "", "", metadata)
    assert selector.matches(node) is expected


@pytest.mark.parametrize(
    ("trust", "metadata", "expected"),
    [
        ("certified node", {"canary": "true"}, False),  # metadata is only its own word
        ("certified canary", {"canary": "true"}, True),
        ("certified canary", {}, False),  # the role alone does not make it one
        ("certified node", {"xdscp.probe": "true"}, False),  # the probe has no certificate
        ("certified canary", {"xdscp.probe": "true"}, False),
    ],
)
def test_with_a_certificate_metadata_counts_only_with_the_canary_role(
    trust, metadata, expected
) -> None:
    from controlplane.xds.identity import Trust
    from controlplane.xds.stream import NodeInfo

    granted = Trust(certified=True, canary=trust == "certified canary")
    node = NodeInfo("edge-1", "edge", "", "", metadata, granted)
    assert CanarySelector(metadata={"canary": "true"}).matches(node) is expected


def test_with_a_certificate_node_id_rules_rest_on_the_proven_id() -> None:
    from controlplane.xds.identity import Trust
    from controlplane.xds.stream import NodeInfo

    node = NodeInfo("edge-canary-1", "edge", "", "", {}, Trust(certified=True, canary=False))
    assert CanarySelector(node_id_glob="edge-canary-*").matches(node)


def test_percent_selector_is_stable_and_roughly_proportional() -> None:
    from controlplane.xds.stream import NodeInfo

    selector = CanarySelector(percent=10)
    chosen = [n for n in range(2000) if selector.matches(NodeInfo(f"node-{n}", "edge", "", "", {}))]
    assert 120 < len(chosen) < 280
    assert chosen == [
        n for n in range(2000) if selector.matches(NodeInfo(f"node-{n}", "edge", "", "", {}))
    ]


def test_a_failed_probe_aborts_with_its_reason_and_keeps_envoys_log_in_its_own_field() -> None:
    policy = replace(POLICY, min_fresh=0, fresh_probe=object())  # type: ignore[arg-type]
    r = rollout(probe_state=ProbeState.RUNNING)
    report = "envoy exited with 1: bad listener\nenvoy log (last lines):\nline 1\nbad listener"
    r.probe_finished(False, report, "xdscp-probe-1")
    assert r.observe(policy, STAGED_AT + 1, [existing()]) is Decision.ABORT
    assert r.reason == "fresh probe failed: envoy exited with 1: bad listener"
    assert r.probe_state is ProbeState.FAILED and r.probe_reason == report


@pytest.mark.parametrize("end", ["abort", "deadline", "promote"])
def test_a_rollout_that_ends_while_its_probe_runs_shows_the_probe_cancelled(end: str) -> None:
    policy = replace(POLICY, min_fresh=0, fresh_probe=object())  # type: ignore[arg-type]
    r = rollout(probe_state=ProbeState.RUNNING)
    if end == "abort":
        r.abort(STAGED_AT + 1, "by hand")
    elif end == "deadline":
        assert r.observe(policy, STAGED_AT + 301, []) is Decision.ABORT
    else:
        r.promote(STAGED_AT + 1, "by hand")
    assert r.probe_state is ProbeState.CANCELLED
    assert r.probe_reason.startswith("cancelled: the rollout ")
    assert Rollout.from_record(r.to_record()).probe_state is ProbeState.CANCELLED
