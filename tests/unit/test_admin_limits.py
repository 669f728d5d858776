"""Admin message limits: a stored snapshot is read in pages, a publish over the limit is
refused naming the limit (no sockets: the service is called directly, the CLI stops first)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from controlplane.admin import limits
from controlplane.admin.service import AdminService
from controlplane.admin.v1 import admin_pb2
from controlplane.cli import client
from controlplane.cli import main as cli
from controlplane.snapshot import Snapshot
from tests import factories

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "config"


def test_a_page_holds_what_fits_and_at_least_one_entry() -> None:
    sizes = [40, 40, 40, 100, 10]
    assert limits.page_end(sizes, 0, 100) == 2
    assert limits.page_end(sizes, 2, 100) == 3
    assert limits.page_end(sizes, 3, 50) == 4  # one entry over the budget still makes a page
    assert limits.page_end(sizes, 4, 100) == 5
    assert limits.page_end(sizes, 5, 100) == 5  # past the end: an empty page


def test_a_page_never_asks_for_more_than_the_message_limit() -> None:
    half = limits.MAX_MESSAGE_BYTES // 2
    assert limits.page_end([half, half, 1], 0, 1 << 40) == 1


class _Store:
    """The one store call GetSnapshot makes, counted."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.reads = 0

    def get(self, version: str) -> Snapshot | None:
        self.reads += 1
        return self.snapshot if version == self.snapshot.version else None


def _get(service: AdminService, **fields: object) -> admin_pb2.GetSnapshotResponse:
    request = admin_pb2.GetSnapshotRequest(**fields)  # type: ignore[arg-type]
    return asyncio.run(service.GetSnapshot(request, None))  # type: ignore[arg-type]


def test_pages_join_up_to_the_whole_answer_and_read_the_store_once() -> None:
    snapshot = factories.edge_snapshot()
    store = _Store(snapshot)
    service = AdminService(None, store, None)  # type: ignore[arg-type]
    whole = _get(service, version=snapshot.version)
    assert whole.next_offset == 0 and len(whole.resources) == 6

    paged, offsets = [], []
    page = _get(service, version=snapshot.version, page_bytes=1)
    while True:
        paged += page.resources
        offsets.append(page.next_offset)
        if not page.next_offset:
            break
        page = _get(service, version=snapshot.version, page_bytes=1, offset=page.next_offset)
    assert offsets == [1, 2, 3, 4, 5, 0]  # page_bytes=1: one resource a page
    assert paged == list(whole.resources)
    assert store.reads == 1  # the snapshot a client pages through is read once


def test_publish_over_the_message_limit_is_refused_naming_the_limit(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(limits, "MAX_MESSAGE_BYTES", 1000)
    # The server address is never dialled: the request is refused before the preview.
    assert cli.main(["publish", str(EXAMPLES), "--server", "127.0.0.1:1"]) == client.EXIT_FAILED
    error = capsys.readouterr().err
    assert "the publish request is " in error
    assert "over the admin API's message limit of 1,000 bytes" in error
    assert error.rstrip().endswith("nothing published")
