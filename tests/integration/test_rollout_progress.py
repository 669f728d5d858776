"""Following rollouts from the command line, with real Envoys: `publish --wait` exits 0 on a
promotion, 1 on an abort and 2 on its timeout; `rollout status --watch` follows one already
running; `rollback` prints N/M as ACKs arrive; --json gives JSON lines."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest

from tests.integration import edge_config
from tests.integration.gated_group import CANARY, finish, gated_groups, xdsctl_background
from tests.integration.harness import Envoy, free_port, wait_for


@pytest.fixture
def group(tmp_path: Path):  # type: ignore[no-untyped-def]
    with gated_groups(tmp_path) as make:
        yield make


def json_lines(text: str) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in text.splitlines()]


def test_publish_wait_exits_0_on_promotion_showing_the_bake_and_the_pending_canary(
    group, tmp_path
) -> None:
    edge = group(
        {
            "min_existing": 1,
            "min_fresh": 1,  # given by the canary restarted mid-rollout
            "bake_seconds": 3,
            "ack_timeout_seconds": 30,
            "deadline_seconds": 600,
        }
    )
    canary = Envoy(tmp_path, "edge-canary-1", "edge", edge.plane.xds_port, metadata=CANARY)
    try:
        canary.start()
        wait_for(lambda: edge.synced("edge-canary-1", edge.v1), what="canary on v1")
        edge.gate_on()
        wait_for(lambda: edge.synced("edge-canary-1", edge.v1), what="canary back on v1")
        directory = edge.write("v2", "b")
        # Each state is held until both followers printed it: they poll once a second, and
        # on an idle machine the canary can restart within that second.
        waiting_to, watching_to = tmp_path / "waiting", tmp_path / "watching"
        waiting = xdsctl_background(
            edge.plane, "publish", str(directory), "--group", "edge", "--wait", "--timeout", "120",
            output=waiting_to,
        )  # fmt: skip
        wait_for(
            lambda: ", existing 1/1, fresh 0/1" in waiting_to.with_suffix(".err").read_text(),
            timeout=30,
            what="publish --wait shows the running canary's ACK of v2",
        )
        watching = xdsctl_background(
            edge.plane, "rollout", "status", "--watch", "--json", "--timeout", "120",
            output=watching_to,
        )  # fmt: skip
        wait_for(
            lambda: '"existing_acked"' in watching_to.with_suffix(".out").read_text(),
            timeout=30,
            what="rollout status --watch following",
        )
        canary.stop()
        wait_for(
            lambda: (
                "waiting for edge-canary-1: reconnect (disconnected "
                in waiting_to.with_suffix(".err").read_text()
                and '"waiting_for": "reconnect"' in watching_to.with_suffix(".out").read_text()
            ),
            timeout=30,
            what="both followers show the canary pending",
        )
        canary.admin_address_path.unlink()  # start() then waits for the new process
        canary.start()

        code, _, _ = finish(waiting, timeout=90)
        out, err = (waiting_to.with_suffix(s).read_text() for s in (".out", ".err"))
        assert code == 0, err
        v2 = out.splitlines()[0]
        assert edge.rollout()["candidate"] == v2
        assert f"CANARY {v2}, existing 1/1, fresh 0/1" in err
        assert "waiting for edge-canary-1: reconnect (disconnected " in err
        assert re.search(r"fresh 1/1, bake: [123]s of 3s left", err), err
        assert err.rstrip().endswith(f"promoted {v2}"), err

        code, _, _ = finish(watching, timeout=30)
        out, err = (watching_to.with_suffix(s).read_text() for s in (".out", ".err"))
        assert code == 0, err
        events = json_lines(out)
        assert events[-1] == {
            "event": "end",
            "outcome": "promoted",
            "exit_code": 0,
            "message": f"promoted {v2}",
        }
        watched = [e for e in events if e["event"] == "rollout"]
        assert any(
            p["node_id"] == "edge-canary-1" for e in watched for p in e.get("pending", [])
        ), events
        assert any(e.get("bake_seconds_left", 0) > 0 for e in watched), events

        # Back to v1 by hand: progress as N/M on stderr, the result on stdout as before.
        result = edge.plane.xdsctl("rollback", "--group", "edge", "--to", edge.v1)
        assert re.search(rf"^1/1 nodes ACKed {edge.v1}$", result.stderr, re.M), result.stderr
        assert re.fullmatch(rf"1/1 nodes ACKed {edge.v1} in \d+\.\d\ds\n", result.stdout)
    finally:
        canary.stop()


def test_publish_wait_exits_1_when_a_canary_nacks_the_candidate(group, tmp_path) -> None:
    edge = group({"min_existing": 1, "bake_seconds": 1, "deadline_seconds": 600})
    canary = Envoy(tmp_path, "edge-canary-1", "edge", edge.plane.xds_port, metadata=CANARY)
    taken = socket.create_server(("127.0.0.1", free_port()))  # no SO_REUSEPORT: Envoy can't bind
    try:
        canary.start()
        edge.gate_on()
        wait_for(lambda: edge.synced("edge-canary-1", edge.v1), what="canary back on v1")
        directory = edge_config.write(
            tmp_path / "taken",
            listener_port=taken.getsockname()[1],
            backends=edge.backends,
            routes=[edge_config.route_to("b")],
        )
        waiting = xdsctl_background(
            edge.plane, "publish", str(directory), "--group", "edge", "--wait", "--timeout", "60"
        )
        code, out, err = finish(waiting, timeout=90)
        assert code == 1, err
        last = err.rstrip().splitlines()[-1]
        assert last.startswith(f"aborted {out.strip()}: canary edge-canary-1 NACKed the candidate")
        assert "Address already in use" in last

        # --json without --wait: one object; rollback --json: JSON lines, ending in its result.
        staged = edge.plane.xdsctl(
            "publish", str(edge.write("v3", "b")), "--group", "edge", "--json"
        )
        assert json.loads(staged.stdout)["outcome"] == "staged"
        rolled = edge.plane.xdsctl("rollback", "--group", "edge", "--to", edge.v1, "--json")
        events = json_lines(rolled.stdout)
        assert events[0]["event"] == "rollback" and events[0]["version"] == edge.v1
        assert events[-2]["event"] == "convergence" and events[-2]["acked_nodes"] == 1
        assert events[-1]["event"] == "end" and events[-1]["exit_code"] == 0
    finally:
        taken.close()
        canary.stop()


def test_publish_wait_exits_2_on_its_timeout_and_waits_for_acks_without_a_policy(
    group, tmp_path
) -> None:
    edge = group({"min_existing": 1, "bake_seconds": 300, "deadline_seconds": 600})
    canary = Envoy(tmp_path, "edge-canary-1", "edge", edge.plane.xds_port, metadata=CANARY)
    try:
        canary.start()
        # No policy yet: --wait follows the group's ACKs.
        plain = edge.plane.xdsctl(
            "publish", str(edge.write("v1b", "b")), "--group", "edge", "--wait", "--timeout", "30"
        )
        v1b = plain.stdout.strip()
        assert f"1/1 nodes ACKed {v1b}" in plain.stderr
        assert plain.stderr.rstrip().endswith(f"all 1 node(s) of group edge ACKed {v1b}")

        edge.gate_on()
        wait_for(lambda: edge.synced("edge-canary-1", v1b), what="canary back on v1b")
        timed_out = edge.plane.xdsctl(
            "publish",
            str(edge.write("v2", "a")),
            "--group",
            "edge",
            "--wait",
            "--timeout",
            "1",
            "--json",
            check=False,
        )
        assert timed_out.returncode == 2, timed_out.stderr
        events = json_lines(timed_out.stdout)
        assert events[0]["event"] == "published" and events[0]["outcome"] == "staged"
        assert events[-1]["event"] == "end" and events[-1]["outcome"] == "timeout"
        assert events[-1]["exit_code"] == 2
        assert edge.rollout()["phase"] == "canary"  # the rollout itself goes on

        refused = edge.plane.xdsctl("rollout", "promote", "--group", "edge", check=False)
        assert refused.returncode == 1
        assert re.search(r"is baking: \d+s of the 300s bake left", refused.stderr), refused.stderr
        aborted = edge.plane.xdsctl("rollout", "abort", "--group", "edge", "--json")
        assert json.loads(aborted.stdout)["phase"] == "aborted"
    finally:
        canary.stop()
