"""The deploy files read as data, for tests that check them without Docker or Kubernetes.

docker-compose.yml's services, each container path traced to where it comes from on the host
(a bind mount from the repository, or a named volume standing as a directory under a root of
the test's), the certgen one-shot run as compose runs it, and the `xdsctl serve` command
lines of compose, the Dockerfile and the k8s manifests parsed by the real parser.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.cli.main import build_parser

REPO = Path(__file__).resolve().parents[1]
COMPOSE: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
K8S_DIR = REPO / "deploy/k8s"
K8S: list[dict[str, Any]] = [
    doc
    for path in sorted(K8S_DIR.glob("*.yaml"))
    for doc in yaml.safe_load_all(path.read_text())
    if doc
]


def dry_run(argv: list[str]) -> argparse.Namespace:
    """Parse like xdsctl would; argparse exits on an invalid command line."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exit:
        pytest.fail(f"not a valid xdsctl command line: {argv} (exit {exit.code})")


def dockerfile_cmd() -> list[str]:
    text = (REPO / "deploy/Dockerfile").read_text()
    cmd = re.search(r"^CMD\s+(\[.*?\])", text, re.MULTILINE | re.DOTALL)
    assert cmd, "deploy/Dockerfile has no exec-form CMD"
    return json.loads(cmd.group(1).replace("\\\n", ""))


def k8s_by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in K8S if doc["kind"] == kind]


def mounts(service: str) -> list[tuple[str, str]]:
    """(source, container path) of each volume of a compose service."""
    return [tuple(v.split(":")[:2]) for v in SERVICES[service].get("volumes", [])]  # type: ignore[misc]


def volume_dir(root: Path, volume: str) -> Path:
    """Where a named volume stands under `root`: where certgen.sh (run with CERTGEN_ROOT=root)
    writes it, for the volumes the certgen service mounts; root/volumes/NAME for the others."""
    for source, target in mounts("certgen"):
        if source == volume:
            return root / target.lstrip("/")
    return root / "volumes" / volume


def mount_of(service: str, container_path: str) -> tuple[str, str]:
    """The (source, container path) of the mount a path inside a compose container is on."""
    for source, target in sorted(mounts(service), key=lambda m: -len(m[1])):
        if (container_path + "/").startswith(target.rstrip("/") + "/"):
            return source, target
    pytest.fail(f"{service}: {container_path} is not on a mount")


def host_path(service: str, container_path: str, root: Path | None = None) -> Path:
    """Where a path inside a compose container comes from: the repository for bind mounts,
    volume_dir(root, ...) for named volumes (root None: bind mounts only)."""
    source, target = mount_of(service, container_path)
    inside = Path(container_path).relative_to(target)
    if source.startswith("./"):
        return REPO / source / inside
    if root is None:
        pytest.fail(f"{service}: {container_path} is on volume {source}, not from the repository")
    return volume_dir(root, source) / inside


def run_certgen(root: Path) -> None:
    """The certgen one-shot of docker-compose.yml, outside Docker: its entrypoint script with
    its command, every container path under `root`, and `xdsctl` this checkout's."""
    service = SERVICES["certgen"]
    assert service["entrypoint"][0] == "sh", service["entrypoint"]
    script = host_path("certgen", service["entrypoint"][1])
    command = [
        str(host_path("certgen", arg, root)) if arg.startswith("/") else arg
        for arg in service["command"]
    ]
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / "xdsctl"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m controlplane.cli.main "$@"\n')
    shim.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(REPO),
        "CERTGEN_ROOT": str(root),
        "CERTGEN_OWNER": "",  # the files stay this user's: no chown to 10001
    }
    result = subprocess.run(
        ["sh", str(script), *command],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"certgen failed:\n{result.stdout}{result.stderr}"
