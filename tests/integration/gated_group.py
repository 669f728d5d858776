"""A group gated by a rollout policy, with real Envoys, for the rollout tests: xdscp serving
v1 first, then restarted with the policy (as a team adopting the gate would), and a TCP
relay that can cut an Envoy's xDS connection while both processes keep running."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration import edge_config
from tests.integration.harness import REPO, XdsControlPlane, free_port

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

    def write(self, name: str, route_to: str) -> Path:
        """The edge config with every path routed to backend `route_to`, in tmp_path/name."""
        return edge_config.write(
            self.tmp_path / name,
            listener_port=self.port,
            backends=self.backends,
            routes=[edge_config.route_to(route_to)],
        )

    def publish(self, name: str, route_to: str) -> str:
        directory = self.write(name, route_to)
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


def xdsctl_background(
    plane: XdsControlPlane, *args: str, output: Path | None = None
) -> subprocess.Popen[str]:
    """xdsctl against `plane` in the background, for commands that follow something. With
    `output`, its stdout goes to `output.out` and stderr to `output.err` (read them while it
    runs), not to pipes."""
    out: Any = subprocess.PIPE if output is None else output.with_suffix(".out").open("w")
    err: Any = subprocess.PIPE if output is None else output.with_suffix(".err").open("w")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "controlplane.cli.main",
            *args,
            "--server",
            plane.admin_address,
            "--token-file",
            str(plane.token_file),
        ],
        cwd=REPO,
        stdout=out,
        stderr=err,
        text=True,
    )


def finish(process: subprocess.Popen[str], timeout: float) -> tuple[int, str, str]:
    """Its exit status, stdout and stderr; killed (and the test failed) after `timeout`."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate(timeout=5)
        pytest.fail(f"xdsctl still running after {timeout}s:\n{out}\n{err}")
    return process.returncode, out or "", err or ""  # "": it wrote to files (`output`)


@contextlib.contextmanager
def gated_groups(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], Group]]:
    """Make Groups with a policy each; their xdscp and relay are stopped on the way out."""
    groups: list[Group] = []

    def make(policy: dict[str, Any]) -> Group:
        groups.append(Group(tmp_path, policy))
        return groups[-1]

    try:
        yield make
    finally:
        for g in groups:
            g.plane.stop()
            if g.relay is not None:
                g.relay.close()
