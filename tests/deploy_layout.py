"""The deploy files read as data, for tests that check them without Docker or Kubernetes.

Each compose file's services (docker-compose.yml, docker-compose.replicas.yml), each container
path traced to where it comes from on the host (a bind mount from the repository, or a named
volume standing as a directory under a root of the test's), their one-shot scripts (certgen,
secrets) run as compose runs them, and the `xdsctl serve` command lines of compose, the
Dockerfile and the k8s manifests parsed by the real parser.
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

from controlplane import app
from controlplane.cli import serving
from controlplane.cli.main import build_parser

REPO = Path(__file__).resolve().parents[1]
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


def serve_config(argv: list[str], policy_file: Path | None = None) -> app.Config:
    """What `xdsctl serve ARGV` would run with, built by serve's own code; fails the test
    if serve would refuse it. The policy is read from `policy_file` (a container's path is
    not on this machine)."""
    args = dry_run(argv)
    assert args.command == "serve"
    if args.rollout_policy is not None:
        assert policy_file is not None, f"{argv} names a policy: say where it comes from"
        args.rollout_policy = policy_file
    try:
        return serving.serve_config(args)
    except ValueError as error:
        pytest.fail(f"xdsctl serve would refuse {argv}: {error}")


def assert_served_safely(config: app.Config) -> None:
    """TLS on xDS and admin, mTLS with node identity on xDS, mTLS on admin, no plaintext."""
    assert not config.allow_plaintext
    assert config.tls_cert and config.tls_key
    assert config.mtls and config.trust_domain
    assert config.admin_client_ca is not None


def dockerfile_cmd() -> list[str]:
    text = (REPO / "deploy/Dockerfile").read_text()
    cmd = re.search(r"^CMD\s+(\[.*?\])", text, re.MULTILINE | re.DOTALL)
    assert cmd, "deploy/Dockerfile has no exec-form CMD"
    return json.loads(cmd.group(1).replace("\\\n", ""))


def k8s_by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in K8S if doc["kind"] == kind]


def k8s_named(kind: str, name: str) -> dict[str, Any]:
    [doc] = [doc for doc in k8s_by_kind(kind) if doc["metadata"]["name"] == name]
    return doc


def k8s_args(container: dict[str, Any], field_values: dict[str, str]) -> list[str]:
    """The container's args as the kubelet runs them: each $(VAR) replaced by the
    container's env var VAR (a value, or `field_values[fieldPath]` for a fieldRef). An
    undefined VAR, or one from a Secret (it would show in the command line), fails the test."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "fieldRef" in var.get("valueFrom", {}):
            env[var["name"]] = field_values[var["valueFrom"]["fieldRef"]["fieldPath"]]

    def expand(match: re.Match[str]) -> str:
        name = match.group(1)
        assert name in env, f"$({name}) in args is not a plain or field env var of the container"
        return env[name]

    return [re.sub(r"\$\((\w+)\)", expand, arg) for arg in container["args"]]


class Compose:
    """One compose file at the repository's root (so `./` in it is the repository)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.data: dict[str, Any] = yaml.safe_load((REPO / name).read_text())
        self.services: dict[str, dict[str, Any]] = self.data["services"]

    def mounts(self, service: str) -> list[tuple[str, str]]:
        """(source, container path) of each volume of a service."""
        volumes = self.services[service].get("volumes", [])
        return [tuple(v.split(":")[:2]) for v in volumes]  # type: ignore[misc]

    def script_one_shots(self) -> list[str]:
        """The services that run a shell script of the repository once (`sh SCRIPT`)."""
        return [
            name
            for name, service in self.services.items()
            if service.get("entrypoint", [None])[0] == "sh"
        ]

    def volume_dir(self, root: Path, volume: str) -> Path:
        """Where a named volume stands under `root`: where a one-shot script (run with its
        root variable set to `root`) writes it, for the volumes such a one-shot mounts;
        root/volumes/NAME for the others."""
        for one_shot in self.script_one_shots():
            for source, target in self.mounts(one_shot):
                if source == volume:
                    return root / target.lstrip("/")
        return root / "volumes" / volume

    def mount_of(self, service: str, container_path: str) -> tuple[str, str]:
        """The (source, container path) of the mount a path inside a container is on."""
        for source, target in sorted(self.mounts(service), key=lambda m: -len(m[1])):
            if (container_path + "/").startswith(target.rstrip("/") + "/"):
                return source, target
        pytest.fail(f"{self.name}: {service}: {container_path} is not on a mount")

    def host_path(self, service: str, container_path: str, root: Path | None = None) -> Path:
        """Where a path inside a container comes from: the repository for bind mounts,
        volume_dir(root, ...) for named volumes (root None: bind mounts only)."""
        source, target = self.mount_of(service, container_path)
        inside = Path(container_path).relative_to(target)
        if source.startswith("./"):
            return REPO / source / inside
        if root is None:
            pytest.fail(f"{service}: {container_path} is on volume {source}, not a repo file")
        return self.volume_dir(root, source) / inside

    def run_one_shot(self, service: str, root: Path, env: dict[str, str]) -> None:
        """A one-shot script service outside Docker: its script with its command, every
        container path under `root`, `xdsctl` this checkout's, and `env` (the script's own
        variables for a root and for leaving file owners alone)."""
        spec = self.services[service]
        assert spec["entrypoint"][0] == "sh", spec["entrypoint"]
        script = self.host_path(service, spec["entrypoint"][1])
        command = [
            str(self.host_path(service, arg, root)) if arg.startswith("/") else arg
            for arg in spec["command"]
        ]
        bin_dir = root / "bin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        shim = bin_dir / "xdsctl"
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m controlplane.cli.main "$@"\n')
        shim.chmod(0o755)
        result = subprocess.run(
            ["sh", str(script), *command],
            cwd=REPO,
            env={
                **os.environ,
                "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
                "PYTHONPATH": str(REPO),
                **env,
            },
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, f"{service} failed:\n{result.stdout}{result.stderr}"

    def run_certgen(self, root: Path) -> None:
        """The certgen one-shot; its files stay this user's (no chown to 10001)."""
        self.run_one_shot("certgen", root, {"CERTGEN_ROOT": str(root), "CERTGEN_OWNER": ""})


MAIN = Compose("docker-compose.yml")
REPLICAS = Compose("docker-compose.replicas.yml")
COMPOSE_FILES = (MAIN, REPLICAS)

# docker-compose.yml, the single-xdscp stack, as most tests read it.
COMPOSE = MAIN.data
SERVICES = MAIN.services
mounts = MAIN.mounts
volume_dir = MAIN.volume_dir
mount_of = MAIN.mount_of
host_path = MAIN.host_path
run_certgen = MAIN.run_certgen
