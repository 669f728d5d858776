"""The periodic release of what closed streams left behind (controlplane/memory.py)."""

from __future__ import annotations

import asyncio

import pytest

from controlplane import caches, memory

WAIT_SECONDS = 5.0  # a bound on the test, far above the few milliseconds it takes


def test_a_failing_round_does_not_end_the_periodic_release(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rounds: list[int] = []

    def release(names_in_use: set[int]) -> None:
        rounds.append(len(rounds))
        if len(rounds) == 1:
            raise RuntimeError("OrderedDict mutated during iteration")

    monkeypatch.setattr(caches, "release_unused", release)
    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)

    async def run() -> None:
        task = asyncio.create_task(memory.release_periodically(set, interval=0.001))
        try:
            async with asyncio.timeout(WAIT_SECONDS):
                while len(rounds) < 3:
                    await asyncio.sleep(0.001)
        finally:
            task.cancel()

    asyncio.run(run())
    assert len(rounds) >= 3
