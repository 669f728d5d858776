"""Shipped Envoy bootstraps are accepted by the real Envoy binary."""

from __future__ import annotations

import subprocess

import pytest

from tests.integration.harness import ENVOY_BINARY, REPO

BOOTSTRAPS = sorted((REPO / "deploy/envoy").glob("*.yaml")) + sorted(
    (REPO / "deploy/compose").glob("envoy-*.yaml")
)


def test_there_are_bootstraps_to_check() -> None:
    assert BOOTSTRAPS, "deploy/envoy/ holds no bootstrap"


@pytest.mark.parametrize("bootstrap", BOOTSTRAPS, ids=lambda p: p.name)
def test_envoy_validates_bootstrap(bootstrap) -> None:
    result = subprocess.run(
        [str(ENVOY_BINARY), "--mode", "validate", "-c", str(bootstrap), "--use-dynamic-base-id"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"configuration '{bootstrap}' OK" in result.stdout + result.stderr
