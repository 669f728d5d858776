"""deploy/ and docker-compose.yml, checked without a Docker engine: every file they refer to
exists, every xdsctl command in them parses (a dry run of the CLI), every `xdsctl serve` in
them would start (app.Config accepts it: TLS wherever it listens beyond loopback), what those
commands would load (policies, config) loads, and the certificates line up with who uses them.
Envoy validates the bootstraps, and the compose layout runs end to end, in
tests/integration/test_deploy_files.py."""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane import app
from controlplane.config import load_directory
from controlplane.observability.metrics import Metrics
from controlplane.rollout.policy import load_policies
from controlplane.snapshot import Snapshot
from controlplane.xds import identity
from tests.deploy_layout import (
    COMPOSE_FILES,
    K8S,
    MAIN,
    REPO,
    SERVICES,
    Compose,
    assert_served_safely,
    dockerfile_cmd,
    dry_run,
    host_path,
    k8s_args,
    k8s_by_kind,
    k8s_named,
    mount_of,
    mounts,
    serve_config,
)


@pytest.mark.parametrize("compose", COMPOSE_FILES, ids=lambda c: c.name)
def test_every_bind_mount_named_volume_and_build_file_exists(compose: Compose) -> None:
    declared = set(compose.data.get("volumes") or {})
    for name, service in compose.services.items():
        for source, _ in compose.mounts(name):
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
        if "build" in service:
            build = service["build"]
            assert (REPO / build["context"] / build["dockerfile"]).is_file(), name


def test_compose_has_the_promised_services() -> None:
    assert {
        "certgen", "xdscp", "envoy-canary", "envoy-web", "publish", "upstream", "prometheus",
        "grafana",
    } <= set(SERVICES)  # fmt: skip
    canary = yaml.safe_load(host_path("envoy-canary", "/etc/envoy/envoy.yaml").read_text())
    assert canary["node"]["metadata"] == {"canary": "true"}


def test_compose_xdsctl_commands_parse_and_what_they_load_loads() -> None:
    serve = dry_run(SERVICES["xdscp"]["command"])
    policy = host_path("xdscp", str(serve.rollout_policy))
    assert "edge" in load_policies(policy)

    publish = dry_run(SERVICES["publish"]["command"])
    assert publish.command == "publish" and publish.group == "edge"
    loaded = load_directory(host_path("publish", str(publish.directory)))
    Snapshot.from_messages((r.type_url, r.message) for r in loaded)  # consistent

    healthcheck = " ".join(SERVICES["xdscp"]["healthcheck"]["test"])
    port = serve.http_address.rsplit(":", 1)[1]
    assert f"127.0.0.1:{port}/readyz" in healthcheck


def test_compose_serve_would_start_with_tls() -> None:
    argv = SERVICES["xdscp"]["command"]
    config = serve_config(argv, host_path("xdscp", str(dry_run(argv).rollout_policy)))
    assert_served_safely(config)
    # With TLS on xDS the fresh probe (it has no client certificate) uses the Unix socket
    # beside the store, which must be on the writable data volume.
    assert config.unix_socket is not None
    assert ("xdscp-data", str(config.unix_socket.parent)) in mounts("xdscp")


def published(service: str, compose: Compose = MAIN) -> list[tuple[str, int]]:
    """(host address, container port) of each port a compose service publishes."""
    found = []
    for port in compose.services[service].get("ports", []):
        host, _, rest = str(port).rpartition(":")
        ip, _, _host_port = host.rpartition(":")
        found.append((ip, int(rest)))
    return found


@pytest.mark.parametrize("compose", COMPOSE_FILES, ids=lambda c: c.name)
def test_compose_publishes_ports_on_loopback_only(compose: Compose) -> None:
    """The stack is for this machine: the admin API above all, but also the Envoys' admin
    pages, Prometheus and Grafana, are not offered to the network."""
    admin_port = int(dry_run(SERVICES["xdscp"]["command"]).admin_address.rsplit(":", 1)[1])
    assert ("127.0.0.1", admin_port) in published("xdscp", compose)  # in REPLICAS: the front
    for name in compose.services:
        for ip, port in published(name, compose):
            assert ip and ipaddress.ip_address(ip).is_loopback, f"{name} publishes {port} on {ip!r}"


def certgen_args() -> Any:
    command = SERVICES["certgen"]["command"]
    assert command[0] == "xdsctl"
    args = dry_run(command[1:])
    assert args.command == "certgen"
    assert str(args.directory) == "/pki"  # where certgen.sh copies from
    return args


def test_compose_certificates_are_made_first_and_kept_apart() -> None:
    certgen = SERVICES["certgen"]
    script = host_path("certgen", certgen["entrypoint"][1])
    assert certgen["entrypoint"][0] == "sh" and script.is_file()
    written = {source for source, _ in mounts("certgen") if not source.startswith("./")}
    assert "pki" in written
    for name in SERVICES:
        if name == "certgen":
            continue
        uses = {source for source, _ in mounts(name)} & written
        assert "pki" not in uses, f"{name} must not see the CA key"
        if uses:
            depends = SERVICES[name].get("depends_on", {})
            assert depends.get("certgen") == {"condition": "service_completed_successfully"}, name
            for volume in SERVICES[name]["volumes"]:
                if volume.split(":")[0] in written:
                    assert volume.endswith(":ro"), f"{name}: {volume} must be read-only"


def xds_cluster(bootstrap: dict[str, Any]) -> dict[str, Any]:
    grpc = bootstrap["dynamic_resources"]["ads_config"]["grpc_services"]
    [name] = {g["envoy_grpc"]["cluster_name"] for g in grpc}
    [cluster] = [c for c in bootstrap["static_resources"]["clusters"] if c["name"] == name]
    return cluster


@pytest.mark.parametrize("service", ["envoy-canary", "envoy-web"])
def test_compose_envoys_use_mtls_with_their_own_certificate(service: str) -> None:
    """Each Envoy shows the certificate certgen made for its node id and group (the canary
    role for the one whose metadata makes it a canary), and checks xdscp's for its name."""
    certgen = certgen_args()
    serve = dry_run(SERVICES["xdscp"]["command"])
    assert certgen.trust_domain == serve.trust_domain
    bootstrap = yaml.safe_load(host_path(service, "/etc/envoy/envoy.yaml").read_text())
    node = bootstrap["node"]
    canary = node.get("metadata", {}).get("canary") == "true"
    spec = f"{node['cluster']}/{node['id']}"
    assert spec in (certgen.canary if canary else certgen.node), f"certgen makes none for {spec}"
    role = "canary" if canary else "node"

    cluster = xds_cluster(bootstrap)
    [endpoint] = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    assert address["address"] == "xdscp"  # the compose service
    assert address["port_value"] == int(serve.xds_address.rsplit(":", 1)[1])
    socket = cluster["transport_socket"]
    assert socket["name"] == "envoy.transport_sockets.tls"
    context = socket["typed_config"]
    assert context["@type"].endswith("tls.v3.UpstreamTlsContext")
    assert context["sni"] in certgen.server_name
    common = context["common_tls_context"]
    assert common["alpn_protocols"] == ["h2"]
    [certificate] = common["tls_certificates"]
    stem = f"{role}-{node['cluster']}-{node['id']}"
    assert Path(certificate["certificate_chain"]["filename"]).name == f"{stem}.pem"
    assert Path(certificate["private_key"]["filename"]).name == f"{stem}.key"
    validation = common["validation_context"]
    assert Path(validation["trusted_ca"]["filename"]).name == "ca.pem"
    assert validation["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": context["sni"]}}
    ]


@pytest.mark.parametrize("service", ["xdscp", "publish"])
def test_compose_xdsctl_has_its_tls_settings(service: str) -> None:
    """The variables xdsctl reads (its files are checked in tests/integration)."""
    environment = SERVICES[service]["environment"]
    written = {source for source, _ in mounts("certgen")}
    for name in ("XDSCTL_TLS_CA", "XDSCTL_TLS_CERT", "XDSCTL_TLS_KEY"):
        assert mount_of(service, environment[name])[0] in written, name
    assert environment["XDSCTL_TLS_SERVER_NAME"] in certgen_args().server_name
    assert certgen_args().admin_client


def test_dockerfile_runs_as_non_root_and_its_default_command_would_start() -> None:
    text = (REPO / "deploy/Dockerfile").read_text()
    user = re.search(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert user and user.group(1) not in ("0", "root")
    for source in re.findall(r"^COPY\s+(.+?)\s+\S+$", text, re.MULTILINE):
        for path in source.split():
            assert (REPO / path).exists(), f"COPY {path}: missing"
    config = serve_config(dockerfile_cmd())
    assert_served_safely(config)
    for path in (config.tls_cert, config.tls_key, config.xds_client_ca, config.admin_client_ca):
        assert str(path).startswith("/etc/xdscp/tls/"), path  # where the comment says


POD_NAME = "xdscp-7c9d5b8f6d-x2kfp"  # a Deployment's pod name: the replica id


def deployment_container() -> tuple[dict[str, Any], dict[str, Any]]:
    [deployment] = k8s_by_kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    return pod, container


def deployment_args() -> list[str]:
    """The serve command line of a replica, as the kubelet expands it."""
    _, container = deployment_container()
    return k8s_args(container, {"metadata.name": POD_NAME})


def deployment_config(tmp_path: Path) -> app.Config:
    """What a replica's `serve` would run with, its policy from the ConfigMap."""
    [configmap] = k8s_by_kind("ConfigMap")
    (tmp_path / "policy.yaml").write_text(configmap["data"]["rollout-policy.yaml"])
    return serve_config(deployment_args(), tmp_path / "policy.yaml")


def test_kubernetes_manifests() -> None:
    kinds = {doc["kind"] for doc in K8S}
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"} <= kinds
    pod, container = deployment_container()
    args = dry_run(deployment_args())
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert int(args.http_address.rsplit(":", 1)[1]) == ports["http"]
    assert int(args.xds_address.rsplit(":", 1)[1]) == ports["xds"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert pod["securityContext"]["runAsNonRoot"] is True

    mounted = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    policy_path = Path(args.rollout_policy)
    assert mounted[str(policy_path.parent)] == "config"
    [configmap] = k8s_by_kind("ConfigMap")
    assert policy_path.name in configmap["data"]
    # The state dir (the fresh probe's socket) is writable under a read-only root file system.
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "emptyDir" in volumes[mounted[str(args.state_dir)]]


def test_kubernetes_runs_replicas_that_stay_available() -> None:
    [deployment] = k8s_by_kind("Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] >= 3
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    [budget] = k8s_by_kind("PodDisruptionBudget")
    labels = spec["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"] == labels
    assert budget["spec"]["minAvailable"] == spec["replicas"] - 1
    pod, _ = deployment_container()
    [spread] = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    term = spread["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"] == labels
    # No volume a second pod could not also mount: the store is the database.
    assert not k8s_by_kind("PersistentVolumeClaim")
    assert not any("persistentVolumeClaim" in volume for volume in pod["volumes"])


def test_kubernetes_replicas_share_the_database_without_its_password_in_args(
    tmp_path: Path,
) -> None:
    pod, container = deployment_container()
    args = dry_run(deployment_args())
    assert args.replica_id == POD_NAME  # each pod its own id, from the Downward API
    assert "--replica-id=$(POD_NAME)" in container["args"]
    database = deployment_config(tmp_path).database
    assert database is not None, "--store is not a database URL"
    assert database.password is None
    assert "sslmode" in database.options  # the connection to the database is encrypted
    postgres = k8s_named("Service", database.host)
    assert postgres["spec"]["type"] == "ExternalName"
    assert database.port == "5432"

    env = {e["name"]: e for e in container["env"]}
    assert env["PGPASSWORD"]["valueFrom"] == {
        "secretKeyRef": {"name": "xdscp-database", "key": "password"}
    }
    secret_vars = {n for n, e in env.items() if "secretKeyRef" in e.get("valueFrom", {})}
    for arg in container["args"]:
        assert not any(f"$({name})" in arg for name in secret_vars), arg
        assert "password" not in arg.lower(), arg

    # Every replica reads the same admin tokens: files of one Secret.
    mount = {m["name"]: m for m in container["volumeMounts"]}["tokens"]
    assert mount["readOnly"] is True
    [volume] = [v for v in pod["volumes"] if v["name"] == "tokens"]
    tokens = {
        f"{mount['mountPath']}/{item['path']}": item["key"] for item in volume["secret"]["items"]
    }
    assert volume["secret"]["secretName"] == "xdscp-admin-tokens"
    assert tokens[str(args.admin_token_file)] == "admin-token"
    assert tokens[str(args.admin_read_token_file)] == "admin-read-token"
    assert env["XDSCTL_TOKEN_FILE"]["value"] == str(args.admin_token_file)


def test_kubernetes_serve_would_start_with_tls_from_cert_manager(tmp_path: Path) -> None:
    pod, container = deployment_container()
    config = deployment_config(tmp_path)
    assert_served_safely(config)
    assert config.admin_address.is_loopback  # reached by kubectl exec or port-forward only
    service = k8s_named("Service", "xdscp")
    assert config.admin_address.port not in {p["port"] for p in service["spec"]["ports"]}
    [deployment] = k8s_by_kind("Deployment")
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]

    # Every TLS file serve and xdsctl read is an item of the tls volume, from a secret that
    # cert-manager fills from a Certificate of the CA issuer.
    mount = {m["name"]: m for m in container["volumeMounts"]}["tls"]
    assert mount["readOnly"] is True
    [volume] = [v for v in pod["volumes"] if v["name"] == "tls"]
    items = {
        f"{mount['mountPath']}/{item['path']}": (source["secret"]["name"], item["key"])
        for source in volume["projected"]["sources"]
        for item in source["secret"]["items"]
    }
    certificates = {c["spec"]["secretName"]: c for c in k8s_by_kind("Certificate")}
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    read = [config.tls_cert, config.tls_key, config.xds_client_ca, config.admin_client_ca]
    read += [env["XDSCTL_TLS_CA"], env["XDSCTL_TLS_CERT"], env["XDSCTL_TLS_KEY"]]
    for path in map(str, read):
        assert path in items, f"{path} is not in the tls volume"
        secret, _ = items[path]
        assert certificates[secret]["spec"]["issuerRef"]["name"] == "xdscp-ca"
    assert items[str(config.tls_cert)] == ("xdscp-server-tls", "tls.crt")
    assert items[str(config.tls_key)] == ("xdscp-server-tls", "tls.key")
    assert items[str(config.xds_client_ca)][1] == "ca.crt"
    assert items[env["XDSCTL_TLS_CERT"]][0] == items[env["XDSCTL_TLS_KEY"]][0]
    admin_client = certificates[items[env["XDSCTL_TLS_CERT"]][0]]["spec"]
    assert "client auth" in admin_client["usages"]
    assert env["XDSCTL_SERVER"] == config.admin_address.grpc_target()

    server = certificates["xdscp-server-tls"]["spec"]
    assert service["metadata"]["name"] in server["dnsNames"]
    assert env["XDSCTL_TLS_SERVER_NAME"] in server["dnsNames"]
    assert "server auth" in server["usages"]


def test_kubernetes_ca_chain_and_node_certificates() -> None:
    issuers = {i["metadata"]["name"]: i["spec"] for i in k8s_by_kind("Issuer")}
    certificates = {c["metadata"]["name"]: c["spec"] for c in k8s_by_kind("Certificate")}
    ca = certificates["xdscp-ca"]
    assert ca["isCA"] is True
    assert "selfSigned" in issuers[ca["issuerRef"]["name"]]
    assert issuers["xdscp-ca"] == {"ca": {"secretName": ca["secretName"]}}

    trust_domain = dry_run(deployment_args()).trust_domain
    nodes = [c for c in certificates.values() if c.get("uris")]
    assert nodes, "no example node certificate"
    for spec in nodes:
        assert spec["issuerRef"]["name"] == "xdscp-ca"
        assert "client auth" in spec["usages"]
        grants = identity.grants(trust_domain, spec["uris"], spec.get("dnsNames", []))
        assert len(grants) == len(spec["uris"]), f"{spec['uris']} grant nothing in {trust_domain}"
    assert any(g.canary for c in nodes for g in identity.grants(trust_domain, c["uris"], []))


def test_configmap_policy_loads(tmp_path) -> None:
    [configmap] = k8s_by_kind("ConfigMap")
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

        def stuck_counts(self) -> dict[str, int]:
            return {"edge": 0}

        def guards_watching(self) -> dict[str, int]:
            return {"edge": 0}

    metrics = Metrics()
    metrics.watch(OneGroup())
    metrics.stream_events.of("t", "edge")
    metrics.stream_errors.labels("malformed")
    metrics.rollouts.labels("edge", "promoted")
    metrics.convergence.labels("edge")
    metrics.rollback_duration.labels("edge")
    metrics.guard_trips.labels("edge")
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


@pytest.mark.parametrize(
    "path",
    [
        "README.md",
        "docs/replicas.md",
        "docker-compose.yml",
        "docker-compose.replicas.yml",
        "deploy/k8s/xdscp.yaml",
    ],
)
def test_documented_xdsctl_commands_parse(path: str) -> None:
    """Every `xdsctl ...` line in a code block of the docs is a valid command line."""
    text = (REPO / path).read_text()
    checked = 0
    for line in re.findall(
        r"^\s*(?:#\s*)?(?:\.venv/bin/)?"
        r"(?:docker compose (?:-f \S+ )?exec [\w-]+ |kubectl exec \S+ -- )?xdsctl (.+)$",
        text,
        re.MULTILINE,
    ):
        command = line.split("#")[0].strip().rstrip("\\").strip()
        if "|" in command or "[" in command or "..." in command:
            continue  # a usage synopsis, not a runnable line
        dry_run(shlex.split(command))
        checked += 1
    assert checked, f"no runnable xdsctl line found in {path}"
