"""The gate counts every canary, with real Envoys: one restarted mid-rollout (a new process,
holding nothing) and one whose xDS connection drops and comes back holding stable.

The connection drop goes through a TCP relay between Envoy and xdscp, which the test cuts
and restores; Envoy and xdscp are the real ones.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration import edge_config
from tests.integration.harness import Envoy, XdsControlPlane, free_port, wait_for

CANARY = {"canary": "true"}


class Relay:
    """A TCP relay on 127.0.0.1 (port chosen at run time) to `port`; `cut()` drops every
    connection and refuses new ones until `restore()`."""

    def __init__(self, port: int) -> None:
        self._target = port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._refusing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._refusing:
                    client.close()
                    continue
                upstream = socket.create_connection(("127.0.0.1", self._target), timeout=5)
                upstream.settimeout(None)
                self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self._lock:
            self._refusing = True
            for s in self._open:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self._open.clear()

    def restore(self) -> None:
        with self._lock:
            self._refusing = False

    def close(self) -> None:
        self.cut()
        self._listener.close()


class Group:
    """xdscp serving group `edge` v1, then restarted with `policy`: the gate is on."""

    def __init__(self, tmp_path: Path, policy: dict[str, Any]) -> None:
        self.tmp_path = tmp_path
        self.plane = XdsControlPlane(tmp_path).start()
        self.port = free_port()
        self.backends = {"a": free_port(), "b": free_port()}
        self.v1 = self.publish("v1", "a")
        self.policy = {"groups": {"edge": {"canary": {"metadata": CANARY}, **policy}}}
        self.relay: Relay | None = None

    def gate_on(self) -> None:
        path = self.tmp_path / "policy.yaml"
        path.write_text(yaml.safe_dump(self.policy))
        self.plane.stop()
        self.plane.extra_args = ("--rollout-policy", str(path))
        self.plane.start()  # same ports: the Envoys reconnect holding v1

    def publish(self, name: str, route_to: str) -> str:
        directory = edge_config.write(
            self.tmp_path / name,
            listener_port=self.port,
            backends=self.backends,
            routes=[edge_config.route_to(route_to)],
        )
        return self.plane.xdsctl("publish", str(directory), "--group", "edge").stdout.strip()

    def rollout(self) -> dict[str, Any]:
        listed = json.loads(self.plane.xdsctl("rollout", "status", "--json").stdout)
        return next((r for r in listed.get("rollouts", []) if r["group"] == "edge"), {})

    def synced(self, node_id: str, version: str) -> bool:
        return any(
            n["node_id"] == node_id
            and n["snapshot_version"] == version
            and all(t["state"] == "SYNCED" for t in n["types"])
            for n in self.plane.status()
        )


@pytest.fixture
def group(tmp_path: Path):  # type: ignore[no-untyped-def]
    groups: list[Group] = []

    def make(policy: dict[str, Any]) -> Group:
        groups.append(Group(tmp_path, policy))
        return groups[-1]

    yield make
    for g in groups:
        g.plane.stop()
        if g.relay is not None:
            g.relay.close()


def test_a_canary_restarted_mid_rollout_is_pending_then_counted_fresh_and_promotes(
    group, tmp_path
) -> None:
    edge = group(
        {
            "min_existing": 1,
            "min_fresh": 1,  # only the restarted canary can give it
            "bake_seconds": 1,
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
        v2 = edge.publish("v2", "b")
        wait_for(
            lambda: edge.rollout().get("existing_acked") == ["edge-canary-1"],
            what="the running canary ACKs v2",
        )

        canary.stop()
        during = wait_for(
            lambda: (r := edge.rollout()).get("pending") and r, what="the canary shown pending"
        )
        assert during["phase"] == "canary"
        assert [(p["node_id"], p["waiting_for"]) for p in during["pending"]] == [
            ("edge-canary-1", "reconnect")
        ]
        text = edge.plane.xdsctl("rollout", "status").stdout
        assert "waiting for:\n    edge-canary-1: reconnect (disconnected " in text, text

        canary.admin_address_path.unlink()  # start() then waits for the new process
        canary.start()  # a new process with the same node id: it holds nothing
        done = wait_for(
            lambda: (r := edge.rollout()).get("phase") != "canary" and r,
            timeout=60,
            what="the rollout ends",
        )
        assert done["phase"] == "promoted", done
        assert done["existing_acked"] == ["edge-canary-1"]
        assert done["fresh_acked"] == ["edge-canary-1"]
        assert "pending" not in done
        wait_for(lambda: canary.route_targets() == {"b"}, what="the canary serves v2")
        wait_for(lambda: edge.synced("edge-canary-1", v2), what="canary SYNCED on v2")
    finally:
        canary.stop()


def test_a_canary_that_reconnects_holding_stable_counts_as_existing(group, tmp_path) -> None:
    edge = group(
        {
            "min_existing": 1,
            "min_fresh": 0,
            "bake_seconds": 1,
            "ack_timeout_seconds": 30,
            "deadline_seconds": 600,
        }
    )
    edge.relay = Relay(edge.plane.xds_port)
    canary = Envoy(tmp_path, "edge-canary-1", "edge", edge.relay.port, metadata=CANARY)
    try:
        canary.start()
        wait_for(lambda: edge.synced("edge-canary-1", edge.v1), what="canary on v1")
        edge.relay.cut()  # the canary keeps running on v1, without a control plane
        edge.gate_on()  # (the relay still points at the same xDS port)
        v2 = edge.publish("v2", "b")
        staged = edge.rollout()
        assert staged["phase"] == "canary" and staged["candidate"] == v2
        assert not edge.synced("edge-canary-1", edge.v1)  # not connected at staging

        edge.relay.restore()  # it reconnects reporting the v1 it holds, then gets v2
        done = wait_for(
            lambda: (r := edge.rollout()).get("phase") != "canary" and r,
            timeout=60,
            what="the rollout ends",
        )
        assert done["phase"] == "promoted", done
        assert done["existing_acked"] == ["edge-canary-1"]
        assert done.get("fresh_acked", []) == []
        wait_for(lambda: canary.route_targets() == {"b"}, what="the canary serves v2")
    finally:
        canary.stop()
