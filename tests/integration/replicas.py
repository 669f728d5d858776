"""Several xdscp replicas on one PostgreSQL database (issue 14), for the replica tests.

Replica `rN` is an `xdsctl serve --replica-id rN` in its own workdir (its own ports, its own
state directory), all on the same database and the same rollout policy. They share one pair
of admin token files, so a test can call any replica with the same token. `r1` starts first
and alone, and is the rollout leader before the others start, so the tests know which one
leads without relying on how a tie is broken.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from pathlib import Path

from tests.integration.harness import XdsControlPlane, http_get, wait_for
from tests.integration.postgres import PostgresServer

LEADER_METRIC = "xdscp_rollout_leader"
LEADER_EVENT = "rollout leader"
# A new leader is due "within a few seconds" of the old one dying.
TAKEOVER_TIMEOUT_SECONDS = 15.0


class Replicas:
    def __init__(self, root: Path, database_url: str, count: int, *serve_args: str) -> None:
        """`serve_args` go to every replica's `xdsctl serve` (e.g. --rollout-policy FILE)."""
        tokens = root / "tokens"
        tokens.mkdir(parents=True)
        token_file, read_token_file = tokens / "admin-token", tokens / "admin-read-token"
        for path in (token_file, read_token_file):
            path.write_text(secrets.token_urlsafe(32) + "\n")
            path.chmod(0o600)
        self.planes: dict[str, XdsControlPlane] = {}
        for index in range(1, count + 1):
            name = f"r{index}"
            workdir = root / name
            workdir.mkdir()
            plane = XdsControlPlane(
                workdir,
                *("--replica-id", name),
                *("--admin-token-file", str(token_file)),
                *("--admin-read-token-file", str(read_token_file)),
                *serve_args,
                database_url=database_url,
            )
            plane.token_file, plane.read_token_file = token_file, read_token_file
            self.planes[name] = plane

    def __getitem__(self, name: str) -> XdsControlPlane:
        return self.planes[name]

    def start(self) -> Replicas:
        first, *others = self.planes.values()
        first.start()
        wait_for(lambda: self.leader_now() is first, what="r1 leading alone", explain=self.explain)
        for plane in others:
            plane.start()
        return self

    def running(self) -> dict[str, XdsControlPlane]:
        return {
            name: plane
            for name, plane in self.planes.items()
            if plane.process is not None and plane.process.poll() is None
        }

    def leader_now(self) -> XdsControlPlane | None:
        """The running replica whose metric says it leads, when exactly one does."""
        leading = [p for p in self.running().values() if p.metric(LEADER_METRIC) == 1]
        return leading[0] if len(leading) == 1 else None

    def wait_leader(
        self, *, other_than: XdsControlPlane | None = None, timeout: float = 10.0
    ) -> XdsControlPlane:
        """The one leader among the running replicas (not `other_than`), once there is one."""
        return wait_for(
            lambda: (leader := self.leader_now()) is not other_than and leader,
            timeout=timeout,
            what=f"one rollout leader{f' other than {other_than.workdir.name}' if other_than else ''}",
            explain=self.explain,
        )

    def kill(self, plane: XdsControlPlane) -> None:
        """kill -9: no goodbye to Envoys, the database or the other replicas."""
        assert plane.process is not None and plane.process.poll() is None
        plane.process.kill()
        plane.process.wait(timeout=5)

    def stop(self) -> None:
        for plane in self.running().values():
            plane.stop()

    def name_of(self, plane: XdsControlPlane) -> str:
        return next(name for name, p in self.planes.items() if p is plane)

    def synced_on(self, via: XdsControlPlane, node_id: str, version: str, replica: str) -> bool:
        """Through `via`'s `xdsctl status --json`: the node is on `replica`'s stream and ACKed
        `version` on every type (whatever else is listed for it, e.g. the stream of a
        replica that was killed, until its records expire)."""
        return any(
            node["node_id"] == node_id
            and node.get("replica") == replica
            and node.get("snapshot_version") == version
            and bool(node.get("types"))
            and all(t["state"] == "SYNCED" for t in node["types"])
            for node in via.status()
        )

    def explain(self) -> str:
        """What each replica says about leading and its database, and its last log lines."""
        lines = []
        for name, plane in self.planes.items():
            if plane.process is None:
                lines.append(f"{name}: not started")
                continue
            if plane.process.poll() is not None:
                lines.append(f"{name}: exited {plane.process.returncode}")
            else:
                try:
                    leads = plane.metric(LEADER_METRIC)
                    database_up = plane.metric("xdscp_database_up")
                    lines.append(f"{name}: leader={leads} database_up={database_up}")
                except Exception as error:  # a replica that does not answer is the news
                    lines.append(f"{name}: /metrics failed: {error!r}")
            if plane.log_path.exists():
                tail = plane.log_path.read_text().splitlines()[-8:]
                lines += [f"  {line[:400]}" for line in tail]
        return "\n".join(lines)


def readyz(plane: XdsControlPlane) -> tuple[int, str]:
    return http_get(f"http://127.0.0.1:{plane.http_port}/readyz", timeout=5)


@contextlib.contextmanager
def database_down(server: PostgresServer) -> Iterator[None]:
    """PostgreSQL stopped for the block, started again on the way out, even on failure."""
    server.stop()
    try:
        yield
    finally:
        server.start()
