"""Per-node views with real Envoys: `xdsctl status` (one line per Envoy, its canary role,
--node and --group filters) and `xdsctl config-dump NODE`, checked against what each Envoy
says it holds in its own /config_dump."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import tls_material
from tests.integration import edge_config
from tests.integration.harness import Envoy, XdsControlPlane, free_port, wait_for

BOUND = 20.0  # seconds, for what takes about one second
PROTOCOLS = pytest.mark.parametrize("api_type", ["GRPC", "DELTA_GRPC"], ids=["sotw", "delta"])


def policy_file(directory: Path) -> Path:
    """Group edge: node ids edge-canary-* are its canaries; a rollout waits for promotion."""
    path = directory / "rollout-policy.yaml"
    canary = {"canary": {"node_id": "edge-canary-*"}, "min_existing": 1, "min_fresh": 0}
    timing = {"bake_seconds": 1, "deadline_seconds": 600, "auto_promote": False}
    path.write_text(yaml.safe_dump({"groups": {"edge": {**canary, **timing}}}))
    return path


def publish(plane: XdsControlPlane, directory: Path, group: str) -> str:
    return plane.xdsctl("publish", str(directory), "--group", group).stdout.strip()


def nodes(plane: XdsControlPlane, *flags: str) -> dict[str, dict[str, Any]]:
    listed = json.loads(plane.xdsctl("status", "--json", *flags).stdout).get("nodes", [])
    return {n["node_id"]: n for n in listed}


def rows(plane: XdsControlPlane, *flags: str) -> dict[str, dict[str, str]]:
    """`xdsctl status` as an operator reads it: {node: {column: value}}."""
    lines = plane.xdsctl("status", *flags).stdout.splitlines()
    header = lines[0].split()
    assert header[:8] == [
        "NODE", "GROUP", "ROLE", "XDS", "HOLDS", "EXPECTED", "STATE", "CONNECTED",
    ]  # fmt: skip
    table = {}
    for line in lines[1:]:
        cells = line.split(None, 8)
        table[cells[0]] = dict(zip(header, cells, strict=False))
    return table


def test_status_has_a_line_per_envoy_with_its_canary_role_and_filters_by_node_and_group(
    start_envoy: Callable[..., Envoy], tmp_path: Path
) -> None:
    plane = XdsControlPlane(tmp_path).start()
    try:
        port = free_port()
        backends = {"a": free_port()}
        v1 = publish(
            plane,
            edge_config.write(
                tmp_path / "v1",
                listener_port=port,
                backends=backends,
                routes=[edge_config.route_to("a")],
            ),
            "edge",
        )
        o1 = publish(
            plane,
            edge_config.write_clusters(tmp_path / "o1", [edge_config.static_cluster("x")]),
            "other",
        )
        start_envoy("edge-canary-1", "edge", plane.xds_port)
        start_envoy("edge-web-1", "edge", plane.xds_port)
        start_envoy("other-1", "other", plane.xds_port)
        # The policy comes with a restart, as a team adopting the gate would switch it on.
        plane.stop()
        plane.extra_args = ("--rollout-policy", str(policy_file(tmp_path)))
        plane.start()

        def all_synced() -> dict[str, dict[str, Any]] | None:
            found = nodes(plane)
            ready = len(found) == 3 and all(n.get("state") == "SYNCED" for n in found.values())
            return found if ready else None

        found = wait_for(all_synced, timeout=BOUND, what="three Envoys SYNCED")
        assert {n: found[n].get("canary", False) for n in found} == {
            "edge-canary-1": True,
            "edge-web-1": False,
            "other-1": False,
        }
        assert found["edge-web-1"]["held_version"] == found["edge-web-1"]["snapshot_version"] == v1
        assert found["other-1"]["held_version"] == o1
        assert found["other-1"]["served_group"] == "other"

        table = rows(plane)
        assert sorted(table) == ["edge-canary-1", "edge-web-1", "other-1"]
        assert table["edge-canary-1"]["ROLE"] == "canary"
        assert table["edge-web-1"]["ROLE"] == "-"
        assert table["edge-web-1"]["HOLDS"] == table["edge-web-1"]["EXPECTED"] == v1
        assert {r["STATE"] for r in table.values()} == {"SYNCED"}
        assert {r["XDS"] for r in table.values()} == {"sotw"}

        assert sorted(rows(plane, "--group", "edge")) == ["edge-canary-1", "edge-web-1"]
        assert sorted(rows(plane, "--node", "*-web-*")) == ["edge-web-1"]
        assert sorted(rows(plane, "--group", "edge", "--node", "edge-c*")) == ["edge-canary-1"]
        assert sorted(nodes(plane, "--group", "other")) == ["other-1"]
        nothing = plane.xdsctl("status", "--group", "edge", "--node", "other-*").stdout
        assert nothing.strip() == "no connected node matches --node other-* --group edge"

        # A candidate reaches the canary only: it holds v2 while the other Envoy holds v1.
        v2 = publish(
            plane,
            edge_config.write(
                tmp_path / "v2",
                listener_port=port,
                backends=backends,
                routes=[edge_config.route_to("a", prefix="/v2")],
            ),
            "edge",
        )

        def canary_on_v2() -> dict[str, dict[str, str]] | None:
            table = rows(plane, "--group", "edge")
            canary = table.get("edge-canary-1", {})
            return table if canary.get("HOLDS") == v2 and canary.get("STATE") == "SYNCED" else None

        table = wait_for(canary_on_v2, timeout=BOUND, what="the canary SYNCED on the candidate")
        assert table["edge-canary-1"]["EXPECTED"] == v2
        assert table["edge-web-1"]["HOLDS"] == table["edge-web-1"]["EXPECTED"] == v1

        # What an Envoy rejects: it still holds the old version, expected is the new one.
        o2 = publish(
            plane,
            edge_config.write_clusters(
                tmp_path / "o2",
                [
                    edge_config.static_cluster("x"),
                    edge_config.static_cluster("y", address="localhost"),
                ],
            ),
            "other",
        )

        def other_nacked() -> dict[str, str] | None:
            row = rows(plane, "--node", "other-1").get("other-1", {})
            return row if row.get("STATE") == "NACKED" else None

        row = wait_for(other_nacked, timeout=BOUND, what="other-1 NACKED in xdsctl status")
        assert (row["HOLDS"], row["EXPECTED"]) == (o1, o2)
        assert "CLUSTER: " in row["DETAIL"] and "malformed IP address: localhost" in row["DETAIL"]
        per_type = plane.xdsctl("status", "--types", "--node", "other-1").stdout
        assert "TYPE" in per_type.splitlines()[0] and "NACKED" in per_type
    finally:
        plane.stop()


def write_config(directory: Path, material: tls_material.TlsMaterial) -> Path:
    """Listener, routes, two EDS clusters and their endpoints, a TLS cluster with its secret,
    and a secret nothing references (never served)."""
    edge_config.write(
        directory,
        listener_port=free_port(),
        backends={"a": free_port(), "b": free_port()},
        routes=[edge_config.route_to("a")],
        extra_clusters=[edge_config.sds_tls_cluster("tls-upstream", "edge-cert")],
    )
    secrets = [
        tls_material.secret_yaml("edge-cert", material),
        tls_material.secret_yaml("unused-cert", material),
    ]
    (directory / "secrets.yaml").write_text(yaml.safe_dump({"resources": secrets}))
    return directory


def envoy_holds(envoy: Envoy) -> dict[str, dict[str, str]]:
    """{config-dump type: {name: version_info}} from the Envoy's own /config_dump."""
    _, body = envoy.admin("/config_dump?include_eds")
    held: dict[str, dict[str, str]] = {}
    endpoints: list[str] = []
    cluster_kinds: dict[str, str | None] = {}
    for config in json.loads(body)["configs"]:
        kind = config["@type"].rsplit(".", 1)[-1]
        if kind == "ClustersConfigDump":
            active = config.get("dynamic_active_clusters", [])
            held["CDS"] = {c["cluster"]["name"]: c["version_info"] for c in active}
            cluster_kinds = {c["cluster"]["name"]: c["cluster"].get("type") for c in active}
        elif kind == "EndpointsConfigDump":
            # Envoy gives no version_info here, and lists a STATIC cluster's own endpoints too:
            # EDS clusters are told apart by their type in the clusters' dump.
            endpoints = [
                e["endpoint_config"]["cluster_name"]
                for e in config.get("dynamic_endpoint_configs", [])
            ]
        elif kind == "ListenersConfigDump":
            held["LDS"] = {
                listener["name"]: listener["active_state"]["version_info"]
                for listener in config.get("dynamic_listeners", [])
            }
        elif kind == "RoutesConfigDump":
            held["RDS"] = {
                r["route_config"]["name"]: r["version_info"]
                for r in config.get("dynamic_route_configs", [])
            }
        elif kind == "SecretsConfigDump":
            held["SDS"] = {
                s["name"]: s["version_info"] for s in config.get("dynamic_active_secrets", [])
            }
    eds = {name for name, kind in cluster_kinds.items() if kind == "EDS"}
    held["EDS"] = {name: "" for name in endpoints if name in eds}
    return held


def dump(plane: XdsControlPlane, node_id: str, *flags: str) -> dict[str, dict[str, Any]]:
    """{type: NodeConfigType as JSON} of the node's one stream, from config-dump --json."""
    answer = json.loads(plane.xdsctl("config-dump", node_id, "--json", *flags).stdout)
    [stream] = answer["streams"]
    types = {}
    for entry in stream["types"]:
        short = {
            "Cluster": "CDS",
            "ClusterLoadAssignment": "EDS",
            "Listener": "LDS",
            "RouteConfiguration": "RDS",
            "Secret": "SDS",
        }[entry["status"]["type_url"].rsplit(".", 1)[-1]]
        types[short] = entry
    return types


@PROTOCOLS
def test_config_dump_shows_the_names_and_versions_envoy_holds_in_its_own_config_dump(
    api_type: str, control_plane: XdsControlPlane, start_envoy: Callable[..., Envoy], tmp_path: Path
) -> None:
    plane = control_plane
    material = tls_material.generate()
    publish(plane, write_config(tmp_path / "v1", material), "edge")
    envoy = start_envoy("edge-1", "edge", plane.xds_port, api_type=api_type)

    def synced_dump() -> dict[str, dict[str, Any]] | None:
        types = dump(plane, "edge-1")
        states = {t: entry["status"]["state"] for t, entry in types.items()}
        return (
            types
            if states == dict.fromkeys(("CDS", "EDS", "LDS", "RDS", "SDS"), "SYNCED")
            else None
        )

    types = wait_for(synced_dump, timeout=BOUND, what="config-dump SYNCED on every type")
    held = wait_for(
        lambda: (h := envoy_holds(envoy)).get("SDS") and len(h.get("EDS", {})) == 2 and h,
        timeout=BOUND,
        what="the Envoy's /config_dump with endpoints and secrets",
    )
    for short, entry in types.items():
        assert sorted(entry["names"]) == sorted(held[short]), short
    assert sorted(types["CDS"]["names"]) == ["a", "b", "tls-upstream"]
    assert types["SDS"]["names"] == ["edge-cert"]  # the unreferenced secret is not served
    for entry in types.values():
        status = entry["status"]
        assert status["sent_version"] == status["acked_version"] == status["expected_version"]
    if api_type == "GRPC":  # state of the world: version_info is the type's version
        for short, entry in types.items():
            if short == "EDS":
                continue  # Envoy shows no version for endpoints
            assert set(held[short].values()) == {entry["status"]["acked_version"]}, short

    text = plane.xdsctl("config-dump", "edge-1", "--type", "cluster").stdout
    assert "tls-upstream" in text and "edge_http" not in text and "SYNCED" in text

    read = plane.read_token_file
    redacted = plane.xdsctl(
        "config-dump", "edge-1", "--type", "secret", "--resources", token_file=read
    )
    assert "[redacted]" in redacted.stdout and material.key_pem not in redacted.stdout
    as_yaml = yaml.safe_load(plane.xdsctl("config-dump", "edge-1", "-o", "yaml").stdout)
    [stream] = as_yaml["streams"]
    secrets = next(t for t in stream["types"] if t["type"] == "SECRET")
    assert [r["name"] for r in secrets["resources"]] == ["edge-cert"]
    assert material.key_pem not in json.dumps(as_yaml)
    shown = plane.xdsctl(
        "config-dump", "edge-1", "--type", "secret", "--show-secrets", "-o", "yaml"
    )
    [stream] = yaml.safe_load(shown.stdout)["streams"]
    [secret] = stream["types"][0]["resources"]
    assert secret["tls_certificate"]["private_key"]["inline_string"] == material.key_pem
    denied = plane.xdsctl("config-dump", "edge-1", "--show-secrets", token_file=read, check=False)
    assert denied.returncode == 1 and "permission_denied" in denied.stderr

    missing = plane.xdsctl("config-dump", "edge-9", check=False)
    assert missing.returncode == 1 and "'edge-9' is not connected" in missing.stderr
