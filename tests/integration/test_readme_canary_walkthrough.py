"""README.md's canary walkthrough, run verbatim from a fresh clone of HEAD in a network
namespace of its own, with the shipped example policy: the candidate reaches the canary
first, is proven by the canary and the fresh probe, is promoted with exit 0 after its bake,
and `xdsctl rollback` puts the version before it back on both Envoys."""

from __future__ import annotations

import json
from pathlib import Path

from tests.integration.readme_runner import CommandResult, Walkthrough

SECTION = "Canary walkthrough"
SERVE = "bash scripts/serve-example"
ENVOY = ".tools/envoy/envoy/_bin/envoy -c deploy/envoy/bootstrap-ads.yaml --use-dynamic-base-id"
CANARY = ENVOY + " \\\n    --config-yaml"
SERVED = (
    "curl -sf http://127.0.0.1:8082/ >/dev/null && "
    ".venv/bin/xdsctl diff examples/config | tail -n 1 | grep -qx 'no changes'"
)
EDGE_ADMIN = "http://127.0.0.1:9901"
CANARY_ADMIN = "http://127.0.0.1:9902"


def api_connect_timeout(walk: Walkthrough, admin: str) -> str:
    """The api cluster's connect_timeout as this Envoy holds it (its own /config_dump)."""
    dump = walk.run(f"curl -sf '{admin}/config_dump?resource=dynamic_active_clusters'")
    assert dump.ok, dump.output
    for entry in json.loads(dump.stdout)["configs"]:
        if entry["cluster"]["name"] == "api":
            return entry["cluster"]["connect_timeout"]
    raise AssertionError(f"no api cluster in {admin}'s config_dump")


def test_readme_canary_walkthrough_promotes_through_the_gate_and_rolls_back(
    tmp_path: Path,
) -> None:
    with Walkthrough.of_head(tmp_path) as walk:
        results: list[CommandResult] = walk.run_section(
            SECTION,
            long_running={
                SERVE: SERVED,
                ENVOY: f"curl -sf {EDGE_ADMIN}/ready",
                CANARY: f"curl -sf {CANARY_ADMIN}/ready",
            },
            timeout=240,  # the probe (up to 30 s) and the policy's 30 s bake
        )
        serve, edge, canary, publish, status, rollback = results
        assert serve.long_running and edge.long_running and canary.long_running

        assert publish.exit_code == 0, publish.output
        candidate = publish.stdout.splitlines()[0]  # stdout: the version; stderr: progress
        progress = publish.stderr.splitlines()
        assert f"staged {candidate} for a canary rollout in group default" in publish.stderr
        # The running canary and the fresh probe proved it, then the bake ran down.
        baking = [
            line for line in progress if "existing 1/1, fresh 1/1, probe passed, bake:" in line
        ]
        assert baking, publish.output
        assert progress[-2:] == [
            f"PROMOTED {candidate}, existing 1/1, fresh 1/1, probe passed",
            f"promoted {candidate}",
        ], publish.output

        assert status.exit_code == 0, status.output
        first = status.stdout.splitlines()[0]
        assert first.startswith(f"group default: PROMOTED candidate {candidate} (stable was ")
        base = first.rsplit(" ", 1)[1].rstrip(")")
        assert "  existing ACKed 1/1: edge-canary-1" in status.stdout, status.output
        assert "  fresh probe: passed (ready)" in status.stdout, status.output

        assert rollback.exit_code == 0, rollback.output
        assert f"2/2 nodes ACKed {base}" in rollback.stdout.splitlines()[-1], rollback.output
        # Both Envoys hold the version before the candidate again (examples/config: 1 s).
        assert api_connect_timeout(walk, EDGE_ADMIN) == "1s"
        assert api_connect_timeout(walk, CANARY_ADMIN) == "1s"
