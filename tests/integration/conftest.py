from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.harness import Envoy, HttpUpstream, XdsControlPlane
from tests.integration.postgres import (  # noqa: F401 (fixtures)
    database_url,
    own_postgres,
    postgres_server,
)


@pytest.fixture
def control_plane(tmp_path: Path) -> Iterator[XdsControlPlane]:
    plane = XdsControlPlane(tmp_path).start()
    yield plane
    plane.stop()


@pytest.fixture
def start_envoy(tmp_path: Path) -> Iterator[Callable[..., Envoy]]:
    started: list[Envoy] = []

    def start(node_id: str, group: str, xds_port: int, **bootstrap: object) -> Envoy:
        envoy = Envoy(tmp_path, node_id, group, xds_port, **bootstrap)
        started.append(envoy)
        return envoy.start()

    yield start
    for envoy in started:
        envoy.stop()


@pytest.fixture
def upstream() -> Iterator[Callable[[str], HttpUpstream]]:
    started: list[HttpUpstream] = []

    def start(name: str) -> HttpUpstream:
        server = HttpUpstream(name).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
