"""The per-node summary state: the worst state of a node's types."""

from __future__ import annotations

import pytest

from controlplane.admin.node_views import node_state


@pytest.mark.parametrize(
    ("types", "shown"),
    [
        ([], "NOT_SENT"),
        (["SYNCED", "SYNCED"], "SYNCED"),
        (["SYNCED", "NOT_SENT"], "NOT_SENT"),
        (["SYNCED", "STALE", "NOT_SENT"], "STALE"),
        (["STALE", "WARMING", "SYNCED"], "WARMING"),
        (["WARMING", "NACKED", "STALE"], "NACKED"),
    ],
)
def test_a_node_shows_the_worst_state_of_its_types(types: list[str], shown: str) -> None:
    assert node_state(types) == shown
