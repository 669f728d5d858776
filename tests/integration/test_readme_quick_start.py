"""README.md's quick start, run verbatim from a fresh clone of HEAD in a network namespace of
its own: the example's curl is answered 200 by the api backend, and `xdsctl status` shows the
Envoy SYNCED; stopping serve-example leaves no process behind."""

from __future__ import annotations

import time
from pathlib import Path

from tests.integration.readme_runner import CommandResult, Walkthrough

SECTION = "The two commands"
SERVE = "bash scripts/serve-example"
ENVOY = ".tools/envoy/envoy/_bin/envoy"
STATUS = ".venv/bin/xdsctl status"
# Ready when the api backend answers and the stable version is examples/config as published.
SERVED = (
    "curl -sf http://127.0.0.1:8082/ >/dev/null && "
    ".venv/bin/xdsctl diff examples/config | tail -n 1 | grep -qx 'no changes'"
)
ENVOY_READY = "curl -sf http://127.0.0.1:9901/ready"


def row_of(status: CommandResult, node: str) -> dict[str, str]:
    """`node`'s line of `xdsctl status`'s table (one line per Envoy), by column."""
    lines = status.stdout.splitlines()
    if not lines:
        return {}
    header = lines[0].split()
    rows = [line.split() for line in lines[1:]]
    return next((dict(zip(header, row, strict=False)) for row in rows if row[0] == node), {})


def synced(status: CommandResult) -> bool:
    row = row_of(status, "edge-1")
    return status.ok and row.get("STATE") == "SYNCED" and row["HOLDS"] == row["EXPECTED"]


def test_readme_quick_start_gets_a_200_from_the_api_backend_and_a_synced_node(
    tmp_path: Path,
) -> None:
    with Walkthrough.of_head(tmp_path) as walk:
        results = walk.run_section(
            SECTION,
            long_running={SERVE: SERVED, ENVOY: ENVOY_READY},
            skip=("bash scripts/test",),  # the whole suite, which this test is part of
            timeout=180,
        )
        assert [r.command.split()[0] for r in results] == [
            "bash",
            ENVOY,
            "curl",
            ".venv/bin/xdsctl",
        ]
        serve, _, curl, status = results
        assert serve.command.startswith(SERVE) and status.command.startswith(STATUS)
        assert curl.exit_code == 0, curl.output
        assert curl.stdout == "backend=api address=127.0.0.1:8082 path=/\n"

        deadline = time.monotonic() + 20  # the status line may trail the Envoy's last ACK
        while not synced(status) and time.monotonic() < deadline:
            time.sleep(0.5)
            status = walk.run(status.command, timeout=60)
        assert synced(status), status.output

    stopped = {r.command.split()[0]: r for r in walk.stopped}
    assert stopped["bash"].leftovers == (), stopped["bash"].output
    assert stopped["bash"].exit_code == 143, stopped["bash"].output  # its SIGTERM trap
    assert stopped[ENVOY].leftovers == ()
