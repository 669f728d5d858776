"""A publish whose connection drops after the server committed it: xdsctl says the snapshot
may have been stored, with its version and how to check, exits 3, and publishing the same
directory again is a no-op."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.config.environments import load_config
from controlplane.config.loader import snapshot_of
from tests.integration.cut_off_proxy import CutOffProxy
from tests.integration.harness import REPO, XdsControlPlane, xdsctl

EXAMPLES = REPO / "examples" / "config"
EXIT_MAYBE_STORED = 3


@pytest.fixture
def proxy(control_plane: XdsControlPlane) -> Iterator[CutOffProxy]:
    # The examples make a Publish of several KB; the reads before it send a few bytes.
    cutter = CutOffProxy(control_plane.admin_address, min_request_bytes=1024).start()
    yield cutter
    cutter.stop()


def stable(plane: XdsControlPlane, group: str) -> str | None:
    listing = json.loads(plane.xdsctl("snapshots", "--group", group, "--json").stdout)
    return listing.get("groups", {}).get(group, {}).get("pointers", {}).get("stable")


def test_a_publish_cut_off_after_its_commit_says_it_may_be_stored_and_a_rerun_is_a_no_op(
    control_plane: XdsControlPlane, proxy: CutOffProxy, tmp_path: Path
) -> None:
    version = snapshot_of(load_config(EXAMPLES).resources).version
    token = ("--token-file", str(control_plane.token_file))

    cut = xdsctl("publish", str(EXAMPLES), "--server", proxy.address, *token, check=False)

    assert proxy.cut.is_set()
    assert cut.returncode == EXIT_MAYBE_STORED, cut.stderr
    assert cut.stdout == ""
    said = cut.stderr.splitlines()[-1]
    assert said.startswith(
        f"xdsctl: the publish to group default was sent to {proxy.address}, but no answer "
        "came back (unavailable: "
    )
    assert f"the snapshot may have been stored. Its version is {version}; " in said
    assert "check with `xdsctl snapshots --group default`" in said
    assert (
        f'Publishing {EXAMPLES} again is safe: if it was stored, the answer is "unchanged".' in said
    )
    assert "cannot reach" not in cut.stderr
    # It was stored, and made stable (no rollout policy): what the message said to check.
    assert stable(control_plane, "default") == version

    again = control_plane.xdsctl("publish", str(EXAMPLES))
    assert again.returncode == 0
    assert again.stdout.strip() == version
    assert f"unchanged: group default already holds {version}" in again.stderr
    history = json.loads(control_plane.xdsctl("snapshots", "--json").stdout)["entries"]
    assert [e["version"] for e in history] == [version]  # one publish, no second entry


def test_a_publishs_reads_and_its_publish_share_one_connection(
    control_plane: XdsControlPlane,
) -> None:
    """The preview's two reads (the stable's version, then its resources) and the Publish go
    over one connection: over TLS, one handshake instead of three."""
    control_plane.xdsctl("publish", str(EXAMPLES))  # so the group has a stable to read
    counter = CutOffProxy(control_plane.admin_address, min_request_bytes=1 << 40).start()
    try:
        token = ("--token-file", str(control_plane.token_file))
        again = xdsctl("publish", str(EXAMPLES), "--server", counter.address, *token)
    finally:
        counter.stop()
    assert again.stderr.splitlines()[0].startswith("--- group default stable (version ")
    assert "unchanged: group default already holds" in again.stderr
    assert counter.connections == 1
