"""The follow loop of `publish --wait` / `rollout status --watch` / `rollback`, over a fake
admin stub and no sleeping: what it prints and the exit status it returns."""

from __future__ import annotations

import json

import grpc
import pytest

from controlplane.admin.v1 import admin_pb2
from controlplane.cli import follow
from controlplane.cli.client import CommandError


class Stub:
    """Answers ListRollouts with `statuses` in turn (the last one forever)."""

    def __init__(self, *statuses: admin_pb2.RolloutStatus) -> None:
        self.statuses = list(statuses)
        self.asked = 0

    def ListRollouts(self, request, timeout, metadata):  # type: ignore[no-untyped-def]
        self.asked += 1
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return admin_pb2.ListRolloutsResponse(rollouts=[status])


def status(phase: str = "canary", **fields: object) -> admin_pb2.RolloutStatus:
    return admin_pb2.RolloutStatus(
        group="edge",
        phase=phase,
        candidate="c1",
        min_existing=1,
        min_fresh=0,
        probe_state="not_configured",
        bake_seconds=30,
        **fields,  # type: ignore[arg-type]
    )


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(follow.time, "sleep", lambda seconds: None)


def test_prints_each_change_once_and_exits_0_on_promotion(capsys) -> None:
    pending = admin_pb2.RolloutPendingNode(
        node_id="edge-canary-1", waiting_for="ack", detail="edge-canary-1: ACK of CLUSTER for c1"
    )
    stub = Stub(
        status(pending=[pending]),
        status(pending=[pending]),  # unchanged: not printed again
        status(existing_acked=["edge-canary-1"], bake_started_at=1.0, bake_seconds_left=29.6),
        status("promoted", existing_acked=["edge-canary-1"], bake_started_at=1.0),
    )
    code = follow.follow_rollout(stub, (), "edge", "c1", 60, follow.Printer(False))
    assert code == follow.EXIT_PROMOTED
    assert capsys.readouterr().out.splitlines() == [
        "CANARY c1, existing 0/1, fresh 0/0, waiting for edge-canary-1: ACK of CLUSTER for c1",
        "CANARY c1, existing 1/1, fresh 0/0, bake: 30s of 30s left",
        "PROMOTED c1, existing 1/1, fresh 0/0",
        "promoted c1",
    ]


def test_exits_1_on_an_abort_with_its_reason_as_json_lines(capsys) -> None:
    stub = Stub(status(), status("aborted", reason="canary edge-canary-1 NACKed the candidate"))
    code = follow.follow_rollout(stub, (), "edge", "", 60, follow.Printer(True))
    assert code == follow.EXIT_ABORTED
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["event"] for e in events] == ["rollout", "rollout", "end"]
    assert events[-1] == {
        "event": "end",
        "outcome": "aborted",
        "exit_code": 1,
        "message": "aborted c1: canary edge-canary-1 NACKed the candidate",
    }


def test_exits_2_when_the_timeout_passes(capsys) -> None:
    stub = Stub(status("awaiting_promotion"))
    code = follow.follow_rollout(stub, (), "edge", "c1", 0, follow.Printer(False))
    assert code == follow.EXIT_TIMEOUT
    out = capsys.readouterr().out
    assert "run `xdsctl rollout promote --group edge`" in out
    assert "gave up after 0s (--timeout): the rollout is still awaiting_promotion" in out


def test_another_candidate_is_an_error_not_a_result() -> None:
    with pytest.raises(CommandError, match="group edge is now rolling out c1, not c0"):
        follow.follow_rollout(Stub(status()), (), "edge", "c0", 60, follow.Printer(False))


class Unavailable(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE


class Blinking(Stub):
    """Unreachable for the first `down` questions, then answers as Stub does."""

    def __init__(self, down: int, *statuses: admin_pb2.RolloutStatus) -> None:
        super().__init__(*statuses)
        self.down = down

    def ListRollouts(self, request, timeout, metadata):  # type: ignore[no-untyped-def]
        if self.down > 0:
            self.down -= 1
            raise Unavailable()
        return super().ListRollouts(request, timeout, metadata)


def test_a_server_that_stops_answering_for_a_while_is_asked_again(capsys) -> None:
    stub = Blinking(3, status("promoted"))
    code = follow.follow_rollout(stub, (), "edge", "c1", 60, follow.Printer(False))
    assert code == follow.EXIT_PROMOTED
    assert capsys.readouterr().out.splitlines() == [
        "cannot reach xdscp (UNAVAILABLE): trying again until --timeout",  # said once
        "PROMOTED c1, existing 0/1, fresh 0/0",
        "promoted c1",
    ]


def test_a_server_that_never_answers_again_ends_as_a_timeout(
    capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = iter(range(0, 10_000, 30))  # each look at the clock: 30 s later
    monkeypatch.setattr(follow.time, "monotonic", lambda: float(next(clock)))
    code = follow.follow_rollout(
        Blinking(10_000, status()), (), "edge", "c1", 60, follow.Printer(False)
    )
    assert code == follow.EXIT_TIMEOUT
    assert capsys.readouterr().out.splitlines()[-1] == (
        "gave up after 60s (--timeout): xdscp did not answer"
    )


def test_an_error_that_will_not_pass_is_not_retried() -> None:
    class Denied(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.PERMISSION_DENIED

    class Refusing(Stub):
        def ListRollouts(self, request, timeout, metadata):  # type: ignore[no-untyped-def]
            raise Denied()

    with pytest.raises(Denied):
        follow.follow_rollout(Refusing(status()), (), "edge", "c1", 60, follow.Printer(False))


class Converging:
    """WaitForConvergence: `answers` in turn (the last one forever); an answer that is an
    exception is raised instead."""

    def __init__(self, *answers: object) -> None:
        self.answers = list(answers)

    def WaitForConvergence(self, request, timeout, metadata):  # type: ignore[no-untyped-def]
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def acked(n: int, of: int) -> admin_pb2.WaitForConvergenceResponse:
    lagging = [admin_pb2.LaggingNode(node_id=f"e-{i}", state="STALE") for i in range(of - n)]
    return admin_pb2.WaitForConvergenceResponse(
        version="v1", total_nodes=of, acked_nodes=n, lagging=lagging
    )


def test_convergence_is_asked_again_when_the_server_blips(capsys) -> None:
    stub = Converging(acked(1, 2), Unavailable(), Unavailable(), acked(2, 2))
    answer = follow.follow_convergence(stub, (), "edge", "v1", 0.0, 60, follow.Printer(False))
    assert (answer.acked_nodes, answer.total_nodes) == (2, 2)
    assert capsys.readouterr().out.splitlines() == [
        "1/2 nodes ACKed v1",
        "cannot reach xdscp (UNAVAILABLE): trying again until --timeout",
        "2/2 nodes ACKed v1",
    ]


def test_convergence_ends_with_the_last_count_seen_if_the_server_never_returns(
    capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = iter(range(0, 10_000, 10))  # each look at the clock: 10 s later
    monkeypatch.setattr(follow.time, "monotonic", lambda: float(next(clock)))
    stub = Converging(acked(1, 2), Unavailable())
    answer = follow.follow_convergence(stub, (), "edge", "v1", 0.0, 60, follow.Printer(False))
    assert (answer.acked_nodes, [n.node_id for n in answer.lagging]) == (1, ["e-0"])
    assert capsys.readouterr().out.splitlines() == [
        "1/2 nodes ACKed v1",
        "cannot reach xdscp (UNAVAILABLE): trying again until --timeout",
    ]


def test_convergence_never_answered_is_the_servers_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = iter(range(0, 10_000, 10))
    monkeypatch.setattr(follow.time, "monotonic", lambda: float(next(clock)))
    with pytest.raises(Unavailable):
        follow.follow_convergence(
            Converging(Unavailable()), (), "edge", "v1", 0.0, 60, follow.Printer(False)
        )
