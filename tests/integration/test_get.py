"""xdsctl get prints stored resources as Envoy v3 YAML (or JSON) that publishes back to the
same version."""

from __future__ import annotations

import json

import yaml

from tests.integration.harness import REPO


def test_get_round_trips_and_filters(control_plane, tmp_path) -> None:
    version = control_plane.xdsctl("publish", str(REPO / "examples/config")).stdout.strip()

    everything = control_plane.xdsctl("get", version).stdout
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "all.yaml").write_text(everything)
    again = control_plane.xdsctl("publish", str(tmp_path / "again"))
    assert again.stdout.strip() == version
    assert "unchanged" in again.stderr
    as_json = control_plane.xdsctl("get", version, "--json").stdout
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "all.json").write_text(as_json)
    assert json.loads(as_json) == yaml.safe_load(everything)  # the same resources
    assert control_plane.xdsctl("publish", str(tmp_path / "json")).stdout.strip() == version

    routes = yaml.safe_load(control_plane.xdsctl("get", version, "--type", "route").stdout)
    assert [r["name"] for r in routes["resources"]] == ["edge_routes"]
    one = yaml.safe_load(
        control_plane.xdsctl("get", version, "--type", "cluster", "--name", "api").stdout
    )["resources"]
    assert len(one) == 1 and one[0]["@type"].endswith("Cluster") and one[0]["name"] == "api"

    missing = control_plane.xdsctl("get", "0" * 16, check=False)
    assert missing.returncode == 1 and "not_found" in missing.stderr
    bad_type = control_plane.xdsctl("get", version, "--type", "clusterz", check=False)
    assert bad_type.returncode == 1 and "unknown --type 'clusterz'" in bad_type.stderr
