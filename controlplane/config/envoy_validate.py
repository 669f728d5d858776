"""Ask a real Envoy binary whether it would take a snapshot: `envoy --mode validate`.

Our own checks (parsing, field rules, lint) cannot know everything Envoy refuses: two filter
chains with the same match, a listener address already taken, an extension's own checks.
So a snapshot is rendered as a static bootstrap and handed to `envoy --mode validate`,
which builds the whole server configuration without binding a port or connecting anywhere.

Rendering (`render_bootstrap`, pure) turns what ADS would deliver into static resources:

- EDS clusters fed over ADS become STATIC clusters with their ClusterLoadAssignment inlined
  as `load_assignment`;
- HTTP connection managers that fetch routes over ADS get the RouteConfiguration inlined as
  `route_config` (with `validate_clusters: false` unless set, as RDS would have it);
- SDS secrets from ADS become static secrets, and their `sds_config` is dropped;
- a ConfigSource still pointing at ADS after that (ECDS, VHDS...) is served by a
  placeholder ADS cluster, which validate mode never dials.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import json_format
from google.protobuf.message import Message

from controlplane import resources
from controlplane.snapshot import Snapshot

DEFAULT_TIMEOUT_SECONDS = 60.0
NODE_ID = "xdscp-validate"
ADS_PLACEHOLDER_CLUSTER = "xdscp_validate_ads"
_ANY = "google.protobuf.Any"
_HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_SDS_SECRET_CONFIG = "envoy.extensions.transport_sockets.tls.v3.SdsSecretConfig"
_CONFIG_SOURCE = "envoy.config.core.v3.ConfigSource"
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_ERROR_PREFIX = re.compile(r"error initializing configuration '[^']*': ")


@dataclass(frozen=True)
class EnvoyVerdict:
    ok: bool
    message: str  # Envoy's own words: why it refuses, or its "OK" line
    output: str  # everything Envoy printed


class EnvoyUnavailableError(RuntimeError):
    """The Envoy binary cannot be run (missing, not executable)."""


def validate_with_envoy(
    snapshot: Snapshot,
    envoy: str | Path,
    *,
    group: str = "default",
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
) -> EnvoyVerdict:
    """Run `envoy --mode validate` on the snapshot rendered as a static bootstrap."""
    binary = Path(envoy)
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise EnvoyUnavailableError(f"no executable Envoy at {binary}")
    bootstrap = render_bootstrap(snapshot, group=group)
    with tempfile.TemporaryDirectory(prefix="xdscp-validate-") as workdir:
        path = Path(workdir) / "bootstrap.json"
        path.write_text(json.dumps(bootstrap, indent=1))
        command = [
            str(binary),
            "--mode",
            "validate",
            "-c",
            str(path),
            "--use-dynamic-base-id",
            "--log-level",
            "error",
            "--log-format",
            "%v",
        ]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            return EnvoyVerdict(False, f"Envoy did not finish validating within {timeout:g}s", "")
        except OSError as err:
            raise EnvoyUnavailableError(f"cannot run {binary}: {err.strerror}") from None
    output = (done.stdout + done.stderr).replace(str(path), "bootstrap.json").strip()
    return EnvoyVerdict(done.returncode == 0, _message(output, done.returncode), output)


def _message(output: str, returncode: int) -> str:
    """Envoy's reason, without the config path; a proto dump Envoy puts in it is cut out."""
    if returncode == 0:
        lines = [line.strip() for line in output.splitlines()]
        return next((line for line in lines if line.endswith(" OK")), "OK")
    found = _ERROR_PREFIX.search(output)
    lines = (output[found.end() :] if found else output).strip().splitlines()
    if not lines:
        return f"Envoy exited with status {returncode}"
    # "Proto constraint validation failed" comes after a dump of the message: "\n: (reason)"
    reasons = [line[2:].strip() for line in lines[1:] if line.startswith(": ")]
    return reasons[-1] if reasons else lines[0].strip()


# --- Rendering (pure) ----------------------------------------------------------------------


def render_bootstrap(snapshot: Snapshot, *, group: str = "default") -> dict[str, Any]:
    """A static bootstrap holding the snapshot's resources, as Envoy's JSON form."""
    resources.load_all_descriptors()
    by_type = {
        t.type_url: {name: r.message() for name, r in snapshot.resources(t.type_url).items()}
        for t in resources.ADS_ORDER
    }
    bootstrap = bootstrap_pb2.Bootstrap()
    bootstrap.node.id = NODE_ID
    bootstrap.node.cluster = group
    static = bootstrap.static_resources
    for cluster in by_type[resources.CLUSTER].values():
        _inline_endpoints(cluster, by_type[resources.ENDPOINT])
        static.clusters.append(cluster)
    for listener in by_type[resources.LISTENER].values():
        static.listeners.append(listener)
    for secret in by_type[resources.SECRET].values():
        static.secrets.append(secret)
    leftover = [_inline(m, by_type[resources.ROUTE]) for m in [*static.clusters, *static.listeners]]
    if any(leftover):
        _add_ads_placeholder(bootstrap)
    return json_format.MessageToDict(bootstrap, preserving_proto_field_name=True)


def _served_by_us(source: Message) -> bool:
    return source.HasField("ads") or source.HasField("self")


def _inline_endpoints(cluster: cluster_pb2.Cluster, endpoints: dict[str, Message]) -> None:
    if cluster.type != cluster_pb2.Cluster.EDS:
        return
    eds = cluster.eds_cluster_config
    assignment = endpoints.get(eds.service_name or cluster.name)
    if not _served_by_us(eds.eds_config) or assignment is None:
        return
    cluster.ClearField("eds_cluster_config")
    cluster.type = cluster_pb2.Cluster.STATIC
    cluster.load_assignment.CopyFrom(assignment)
    cluster.load_assignment.cluster_name = cluster.name


def _inline(message: Message, routes: dict[str, Message]) -> bool:
    """Rewrite ADS references inside `message` in place; True if any ADS source is left."""
    leftover = False
    name = message.DESCRIPTOR.full_name
    if name == _HCM and message.HasField("rds") and _served_by_us(message.rds.config_source):
        route = routes.get(message.rds.route_config_name)
        if route is not None:
            message.route_config.CopyFrom(route)  # clears the rds oneof
            if not message.route_config.HasField("validate_clusters"):
                message.route_config.validate_clusters.value = False
    elif name == _SDS_SECRET_CONFIG and _served_by_us(message.sds_config):
        message.ClearField("sds_config")
    elif name == _CONFIG_SOURCE and message.HasField("ads"):
        leftover = True
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            items = (
                value.values() if field.message_type.fields_by_name["value"].message_type else []
            )
        else:
            items = value if field.is_repeated else [value]
        for item in items:
            leftover |= _inline_any(item, routes) if _is_any(item) else _inline(item, routes)
    return leftover


def _is_any(message: Message) -> bool:
    return message.DESCRIPTOR.full_name == _ANY


def _inline_any(packed: Any, routes: dict[str, Message]) -> bool:
    try:
        inner = resources.unpack_any(packed)
    except resources.UnknownTypeError:
        return False
    leftover = _inline(inner, routes)
    packed.Pack(inner, type_url_prefix=packed.type_url.rsplit("/", 1)[0], deterministic=True)
    return leftover


def _add_ads_placeholder(bootstrap: bootstrap_pb2.Bootstrap) -> None:
    ads = bootstrap.dynamic_resources.ads_config
    ads.api_type = ads.GRPC
    ads.transport_api_version = config_source_pb2.ApiVersion.V3
    ads.grpc_services.add().envoy_grpc.cluster_name = ADS_PLACEHOLDER_CLUSTER
    cluster = bootstrap.static_resources.clusters.add(name=ADS_PLACEHOLDER_CLUSTER)
    cluster.type = cluster_pb2.Cluster.STATIC
    cluster.connect_timeout.FromSeconds(1)
    cluster.load_assignment.cluster_name = ADS_PLACEHOLDER_CLUSTER
    endpoint = cluster.load_assignment.endpoints.add().lb_endpoints.add().endpoint
    endpoint.address.socket_address.address = "127.0.0.1"
    endpoint.address.socket_address.port_value = 1
    http2 = http_protocol_options_pb2.HttpProtocolOptions()
    http2.explicit_http_config.http2_protocol_options.SetInParent()
    cluster.typed_extension_protocol_options[_HTTP_OPTIONS].Pack(http2)
