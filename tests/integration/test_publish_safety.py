"""Publish refuses what Envoy would NACK or what plainly breaks traffic (lint errors), in
xdsctl and in the server alike, and a real Envoy shows why each refusal is right."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2

from controlplane import resources
from controlplane.admin.v1 import admin_pb2, admin_pb2_grpc
from controlplane.config.environments import load_config
from controlplane.config.envoy_validate import validate_with_envoy
from controlplane.config.loader import snapshot_of
from tests.integration import edge_config
from tests.integration.harness import (
    ENVOY_BINARY,
    Envoy,
    HttpUpstream,
    XdsControlPlane,
    free_port,
    http_get,
    wait_for,
    xdsctl,
)

BAD_REGEX = "(("


def store_contents(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return {
            table: db.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
            for table in ("snapshots", "history", "pointers")
        }


def write(directory: Path, routes: list[dict[str, Any]], port: int = 1) -> Path:
    return edge_config.write(
        directory, listener_port=free_port(), backends={"a": port}, routes=routes
    )


def regex_route(regex: str) -> dict[str, Any]:
    return {"match": {"safe_regex": {"regex": regex}}, "route": {"cluster": "a"}}


def publish_past_the_cli(plane: XdsControlPlane, directory: Path) -> grpc.RpcError:
    """Send `directory`'s resources as any admin client may, and return the refusal."""
    request = admin_pb2.PublishRequest(
        resources=[
            any_pb2.Any(type_url=r.type_url, value=resources.serialize(r.message))
            for r in load_config(directory).resources
        ],
    )
    token = plane.token_file.read_text().strip()
    with (
        grpc.insecure_channel(plane.admin_address) as channel,
        pytest.raises(grpc.RpcError) as caught,
    ):
        admin_pb2_grpc.AdminStub(channel).Publish(
            request, timeout=30, metadata=(("authorization", f"Bearer {token}"),)
        )
    return caught.value


def assert_refused(plane: XdsControlPlane, directory: Path, finding: str, errors: int = 1) -> None:
    """xdsctl publish exits 1 naming `finding` as validate prints it; a publish past the CLI
    is refused by the server alike; the store is untouched either way."""
    before = store_contents(plane.store)
    published = plane.xdsctl("publish", str(directory), check=False)
    validated = xdsctl("validate", str(directory), check=False)
    assert published.returncode == 1, published.stderr
    assert published.stdout == ""
    assert validated.returncode == 1
    printed = [line for line in validated.stdout.splitlines() if finding in line]
    assert printed and all(line in published.stderr.splitlines() for line in printed)
    assert f"{directory}: {errors} lint error(s)" in published.stderr
    assert "nothing published" in published.stderr
    refusal = publish_past_the_cli(plane, directory)
    assert refusal.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert finding in refusal.details()
    assert store_contents(plane.store) == before


def test_an_invalid_re2_that_envoy_nacks_is_refused_by_publish(
    control_plane: XdsControlPlane, tmp_path: Path
) -> None:
    directory = write(tmp_path / "bad", [regex_route(BAD_REGEX), edge_config.route_to("a")])
    # A real Envoy refuses it (the route config rendered into a static bootstrap) ...
    verdict = validate_with_envoy(snapshot_of(load_config(directory).resources), ENVOY_BINARY)
    assert not verdict.ok
    assert "missing )" in verdict.message
    # ... so it never leaves xdsctl, and the server refuses it from any other client.
    assert_refused(control_plane, directory, "error[XDS005 invalid-re2]")


def test_a_regex_over_envoys_program_size_is_refused_by_publish(
    control_plane: XdsControlPlane, tmp_path: Path
) -> None:
    big = "/x/[a-z]{200}"  # an RE2 program of size 207
    directory = write(tmp_path / "big", [regex_route(big), edge_config.route_to("a")])
    verdict = validate_with_envoy(snapshot_of(load_config(directory).resources), ENVOY_BINARY)
    assert not verdict.ok
    assert "max program size" in verdict.message
    assert_refused(control_plane, directory, "error[XDS005 invalid-re2]")


def test_envoy_answers_503_for_a_route_to_an_unknown_cluster_so_publish_refuses_it(
    control_plane: XdsControlPlane,
    start_envoy: Callable[..., Envoy],
    upstream: Callable[[str], HttpUpstream],
    tmp_path: Path,
) -> None:
    typo = edge_config.route_to("aa", "/typo")
    directory = write(tmp_path / "typo", [typo, edge_config.route_to("a")])
    assert_refused(control_plane, directory, "error[XDS008 unknown-cluster]")

    # Why: Envoy takes such a route and answers 503 for it. Published with the rule
    # suppressed (a reason given), a real Envoy shows it.
    a = upstream("a")
    port = free_port()
    typo["metadata"] = {
        "filter_metadata": {"xdscp.lint": {"suppress": {"unknown-cluster": "shows the 503"}}}
    }
    suppressed = edge_config.write(
        tmp_path / "suppressed", listener_port=port, backends={"a": a.port}, routes=[typo]
    )
    published = control_plane.xdsctl("publish", str(suppressed))
    assert published.returncode == 0
    start_envoy("edge-1", "default", control_plane.xds_port)
    status = wait_for(
        lambda: http_get(f"http://127.0.0.1:{port}/typo", timeout=2)[0] or None,
        what="an answer from Envoy's listener",
    )
    assert status == 503


def test_an_unknown_cluster_specifier_plugin_that_envoy_nacks_is_refused_by_publish(
    control_plane: XdsControlPlane, tmp_path: Path
) -> None:
    route = {"match": {"prefix": "/"}, "route": {"cluster_specifier_plugin": "pick"}}
    directory = write(tmp_path / "plugin", [route])
    verdict = validate_with_envoy(snapshot_of(load_config(directory).resources), ENVOY_BINARY)
    assert not verdict.ok
    assert "Unknown cluster specifier plugin name: pick" in verdict.message
    assert_refused(control_plane, directory, "error[XDS008 unknown-cluster]")


def test_a_suppression_needs_its_reason_in_publish_too(
    control_plane: XdsControlPlane, tmp_path: Path
) -> None:
    route = edge_config.nacked_regex_route("a")
    route["metadata"]["filter_metadata"]["xdscp.lint"]["suppress"]["invalid-re2"] = " "
    directory = write(tmp_path / "no-reason", [route])
    # The suppression is an error, and suppresses nothing.
    assert_refused(control_plane, directory, "error[XDS000 lint-suppression]", errors=2)

    reasoned = write(tmp_path / "reasoned", [edge_config.nacked_regex_route("a")])
    published = control_plane.xdsctl("publish", str(reasoned))
    assert published.stdout.strip() == snapshot_of(load_config(reasoned).resources).version


# --- The first publish to a group ----------------------------------------------------------


def test_a_first_publish_to_an_unknown_group_needs_create_group(
    control_plane: XdsControlPlane, tmp_path: Path
) -> None:
    directory = write(tmp_path / "c", [edge_config.route_to("a")])
    plane = control_plane

    def publish(group: str, *flags: str) -> Any:
        args = ("publish", str(directory), "--group", group, *flags)
        return plane.xdsctl(*args, create_group=False, check=False)

    before = store_contents(plane.store)
    typo = publish("edeg")
    assert typo.returncode == 1 and typo.stdout == ""
    assert typo.stderr.splitlines()[-1] == (
        "xdsctl: failed_precondition: group 'edeg' has no snapshot yet (known groups: "
        "none yet); to create it, publish again with --create-group (create_group in the "
        "admin API)"
    )
    assert store_contents(plane.store) == before

    # default needs no flag: a new store's first publish (README's quick start) just works.
    assert publish("default").returncode == 0
    assert publish("edge", "--create-group").returncode == 0
    typo = publish("edeg")
    assert typo.returncode == 1
    assert "group 'edeg' has no snapshot yet (known groups: default, edge)" in typo.stderr
    # Once it exists, a group needs no flag.
    again = publish("edge")
    assert again.returncode == 0 and "unchanged: group edge already holds" in again.stderr
