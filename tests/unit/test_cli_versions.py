"""Version references: unique prefixes and the pointer names, resolved in one place."""

from __future__ import annotations

import pytest

from controlplane.admin.v1 import admin_pb2
from controlplane.cli import versions
from controlplane.cli.client import CommandError

A1 = "a1b2c3d4e5f60718"
A2 = "a1b2c3d4ffff0000"  # shares its first 8 digits with A1
B = "b0b0b0b0b0b0b0b0"
OLD = "c0ffee00c0ffee00"  # only a pointer names it: its history entry is older than the scan


def listing(group: str, limit: int) -> admin_pb2.ListSnapshotsResponse:
    calls.append((group, limit))
    groups = {
        "edge": admin_pb2.GroupPointers(pointers={"stable": A1, "last_good": OLD}),
        "web": admin_pb2.GroupPointers(pointers={"stable": B, "candidate": A2}),
    }
    return admin_pb2.ListSnapshotsResponse(
        entries=[admin_pb2.HistoryEntry(group="edge", version=v) for v in (A1, A2, B, A1)],
        groups={g: p for g, p in groups.items() if not group or g == group},
    )


calls: list[tuple[str, int]] = []


@pytest.fixture(autouse=True)
def _reset() -> None:
    calls.clear()


@pytest.mark.parametrize(
    ("text", "group", "version"),
    [
        ("stable", "edge", A1),
        ("last_good", "edge", OLD),
        ("candidate", "web", A2),
        ("b0b0b0b0", "edge", B),
        ("a1b2c3d4e", "edge", A1),
        ("a1b2c3d4f", "edge", A2),
        ("c0ffee00", "edge", OLD),  # a version only a pointer names
    ],
)
def test_prefixes_and_pointer_names_resolve_to_whole_versions(
    text: str, group: str, version: str
) -> None:
    assert versions.resolve(text, group, listing) == version


def test_a_whole_version_is_taken_as_given_without_asking() -> None:
    assert versions.resolve("0" * 16, "edge", listing) == "0" * 16
    assert calls == []


def test_a_pointer_is_read_for_the_group_and_a_prefix_scans_every_group() -> None:
    versions.resolve("stable", "edge", listing)
    versions.resolve("b0b0b0b0", "edge", listing)
    assert calls == [("edge", 1), ("", versions.SCAN_LIMIT)]


def test_an_ambiguous_prefix_is_an_error_listing_the_matches() -> None:
    with pytest.raises(CommandError) as refused:
        versions.resolve("a1b2c3d4", "edge", listing)
    assert str(refused.value) == f"version prefix a1b2c3d4 is ambiguous: it matches {A1}, {A2}"


@pytest.mark.parametrize(
    ("text", "group", "message"),
    [
        ("a1b2", "edge", "too short: give at least 8 hex digits"),
        ("deadbeef", "edge", "no stored version starts with deadbeef (searched the newest 10,000"),
        ("candidate", "edge", "group edge has no candidate version"),
        ("stable", "nowhere", "group nowhere has no stable version"),
        ("latest", "edge", "'latest' is not a version"),
        ("A1B2C3D4", "edge", "is not a version"),
    ],
)
def test_what_resolves_to_nothing_is_an_error_saying_why(
    text: str, group: str, message: str
) -> None:
    with pytest.raises(CommandError, match=message.replace("(", r"\(")):
        versions.resolve(text, group, listing)


@pytest.mark.parametrize(
    ("text", "reference"),
    [("stable", True), ("a1b2c3d4", True), ("a1b2c3d", False), ("config", False), ("./x", False)],
)
def test_what_reads_as_a_reference_rather_than_a_directory(text: str, reference: bool) -> None:
    assert versions.is_reference(text) is reference
