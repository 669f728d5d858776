"""Which groups a publish may create unasked (admin Publish without create_group)."""

from __future__ import annotations

from pathlib import Path

from controlplane.admin.service import AdminService
from controlplane.store.sqlite import SQLiteStore
from controlplane.xds.fleet import Fleet
from tests import factories


class Controller:
    """The one thing _unknown_group asks the rollout controller: which groups have a policy."""

    def __init__(self, *with_policy: str) -> None:
        self.with_policy = set(with_policy)

    def policy(self, group: str) -> object | None:
        return object() if group in self.with_policy else None


def service(tmp_path: Path, *with_policy: str) -> tuple[AdminService, SQLiteStore]:
    store = SQLiteStore(tmp_path / "store.db")
    return AdminService(Controller(*with_policy), store, Fleet()), store  # type: ignore[arg-type]


def test_default_and_policy_groups_are_known_from_the_start(tmp_path: Path) -> None:
    admin, _ = service(tmp_path, "edge")
    assert admin._unknown_group("default") is None
    assert admin._unknown_group("edge") is None
    assert admin._unknown_group("edeg") == (
        "group 'edeg' has no snapshot yet (known groups: none yet); to create it, publish "
        "again with --create-group (create_group in the admin API)"
    )


def test_a_group_with_a_snapshot_is_known(tmp_path: Path) -> None:
    admin, store = service(tmp_path)
    store.publish("web", factories.edge_snapshot(), message="", actor="test")
    assert admin._unknown_group("web") is None
    assert "(known groups: web)" in (admin._unknown_group("wbe") or "")
