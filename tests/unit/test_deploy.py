"""deploy/ and docker-compose.yml, checked without a Docker engine: every file they refer to
exists, every xdsctl command in them parses (a dry run of the CLI), and what those commands
would load (policies, config) loads. Envoy bootstraps are validated by Envoy itself in
tests/integration/test_deploy_files.py."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from controlplane.cli.main import build_parser
from controlplane.config import load_directory
from controlplane.observability.metrics import Metrics
from controlplane.rollout.policy import load_policies
from controlplane.snapshot import Snapshot

REPO = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
K8S = list(yaml.safe_load_all((REPO / "deploy/k8s/xdscp.yaml").read_text()))


def dry_run(argv: list[str]) -> object:
    """Parse like xdsctl would; argparse exits on an invalid command line."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exit:
        pytest.fail(f"not a valid xdsctl command line: {argv} (exit {exit.code})")


def host_path(service: dict, container_path: str) -> Path:  # type: ignore[type-arg]
    """Where a path inside a compose container comes from on the host (bind mounts)."""
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./") and (container_path + "/").startswith(target.rstrip("/") + "/"):
            return REPO / source / Path(container_path).relative_to(target)
    pytest.fail(f"{container_path} is not mounted from the repository")


def test_every_bind_mount_and_build_file_exists() -> None:
    for name, service in COMPOSE["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name}: {source} does not exist"
        if "build" in service:
            build = service["build"]
            assert (REPO / build["context"] / build["dockerfile"]).is_file(), name


def test_compose_has_the_promised_services() -> None:
    services = COMPOSE["services"]
    assert {"xdscp", "envoy-canary", "envoy-web", "upstream", "prometheus", "grafana"} <= set(
        services
    )
    canary = yaml.safe_load(
        host_path(services["envoy-canary"], "/etc/envoy/envoy.yaml").read_text()
    )
    assert canary["node"]["metadata"] == {"canary": "true"}


def test_compose_xdsctl_commands_parse_and_what_they_load_loads() -> None:
    services = COMPOSE["services"]
    serve = dry_run(services["xdscp"]["command"])
    assert serve.command == "serve"
    policies = load_policies(host_path(services["xdscp"], str(serve.rollout_policy)))
    assert "edge" in policies

    publish = dry_run(services["publish"]["command"])
    assert publish.command == "publish" and publish.group == "edge"
    loaded = load_directory(host_path(services["publish"], str(publish.directory)))
    Snapshot.from_messages((r.type_url, r.message) for r in loaded)  # consistent

    healthcheck = " ".join(services["xdscp"]["healthcheck"]["test"])
    port = serve.http_address.rsplit(":", 1)[1]
    assert f"127.0.0.1:{port}/readyz" in healthcheck


def test_dockerfile_runs_as_non_root_and_its_default_command_parses() -> None:
    text = (REPO / "deploy/Dockerfile").read_text()
    user = re.search(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert user and user.group(1) not in ("0", "root")
    for source in re.findall(r"^COPY\s+(.+?)\s+\S+$", text, re.MULTILINE):
        for path in source.split():
            assert (REPO / path).exists(), f"COPY {path}: missing"
    cmd = re.search(r"^CMD\s+(\[.*?\])", text, re.MULTILINE | re.DOTALL)
    assert cmd
    dry_run(json.loads(cmd.group(1).replace("\\\n", "")))


def test_kubernetes_manifests() -> None:
    by_kind = {doc["kind"]: doc for doc in K8S}
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"} <= set(by_kind)
    pod = by_kind["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    args = dry_run(container["args"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert int(args.http_address.rsplit(":", 1)[1]) == ports["http"]
    assert int(args.xds_address.rsplit(":", 1)[1]) == ports["xds"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert pod["securityContext"]["runAsNonRoot"] is True

    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    policy_path = Path(args.rollout_policy)
    assert mounts[str(policy_path.parent)] == "config"
    configmap = by_kind["ConfigMap"]["data"]
    assert policy_path.name in configmap
    assert mounts[str(Path(args.store).parent)] == "data"


def test_configmap_policy_loads(tmp_path) -> None:
    configmap = next(doc for doc in K8S if doc["kind"] == "ConfigMap")
    (tmp_path / "policy.yaml").write_text(configmap["data"]["rollout-policy.yaml"])
    assert "edge" in load_policies(tmp_path / "policy.yaml")


def exposed_metric_names() -> set[str]:
    class OneGroup:
        def stream_counts(self) -> dict[str, int]:
            return {"sotw": 1}

        def node_counts(self) -> dict[str, tuple[int, int]]:
            return {"edge": (1, 0)}

        def pointers(self) -> dict[str, dict[str, str]]:
            return {"edge": {"stable": "v"}}

        def stable_sizes(self) -> dict[str, int]:
            return {"edge": 1}

        def rollout_phases(self) -> dict[str, str]:
            return {"edge": "promoted"}

    metrics = Metrics()
    metrics.watch(OneGroup())
    for counter in (metrics.pushes, metrics.acks, metrics.nacks, metrics.pushed_bytes):
        counter.labels("t", "edge")
    metrics.stream_errors.labels("malformed")
    metrics.rollouts.labels("edge", "promoted")
    metrics.convergence.labels("edge")
    metrics.rollback_duration.labels("edge")
    text = metrics.exposition().decode()
    return {
        line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and line[0] != "#"
    }


def test_dashboard_and_alerts_only_use_metrics_xdscp_exposes() -> None:
    exposed = exposed_metric_names()
    dashboard = json.loads((REPO / "deploy/grafana/dashboards/xdscp.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    rules = yaml.safe_load((REPO / "deploy/prometheus/alerts.yml").read_text())
    exprs += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    used = {name for expr in exprs for name in re.findall(r"\bxdscp_[a-z_]+", expr)}
    assert used, "no xdscp metrics referenced"
    assert used <= exposed, f"not exposed by xdscp: {sorted(used - exposed)}"
    datasource = yaml.safe_load(
        (REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    assert {p["datasource"]["uid"] for p in dashboard["panels"]} == {datasource["uid"]}


@pytest.mark.parametrize("path", ["README.md", "docker-compose.yml"])
def test_documented_xdsctl_commands_parse(path: str) -> None:
    """Every `xdsctl ...` line in a code block of the docs is a valid command line."""
    text = (REPO / path).read_text()
    checked = 0
    for line in re.findall(
        r"^\s*(?:#\s*)?(?:\.venv/bin/)?(?:docker compose exec xdscp )?xdsctl (.+)$",
        text,
        re.MULTILINE,
    ):
        command = line.split("#")[0].strip().rstrip("\\").strip()
        if "|" in command or "[" in command or "..." in command:
            continue  # a usage synopsis, not a runnable line
        dry_run(shlex.split(command))
        checked += 1
    assert checked, f"no runnable xdsctl line found in {path}"
