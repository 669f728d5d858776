"""Lint rules: config Envoy accepts but that is almost certainly wrong, or fragile.

Each rule has an id and a name ("XDS004 shadowed-route"), a severity, a one-line hint, and
a check over all the resources of one snapshot. An `error` is what Envoy would NACK or what
plainly breaks traffic: it fails `xdsctl validate`, and `refusals` stops a publish, in
xdsctl and again in the server (any admin client may publish). A `warning` is fragile
config that Envoy serves: validate prints it and exits 0. The rules, in `RULES`:

    XDS001 keepalive-ordering  an HTTP cluster's upstream idle_timeout is set and shorter
                               than its backend's keep-alive (metadata "xdscp.backend")
    XDS002 tcp-keepalive       clusters behind a long-lived tcp_proxy set TCP keepalive
    XDS003 idempotent-retry    retry policies on idempotent routes retry reset, connect-failure
    XDS004 shadowed-route      no route is unreachable behind an earlier one in its host
    XDS005 invalid-re2         every regex compiles with RE2 within Envoy's program size
    XDS006 duplicate-name      unique resources, virtual hosts, domains, filter chains, addresses
    XDS007 unused-cluster      every cluster is used by a route, listener or other cluster
    XDS008 unknown-cluster     routes and tcp proxies send traffic only to known clusters
                               (and cluster specifier plugins their route config defines)

Errors: XDS004 (the route's traffic goes elsewhere), XDS005 and XDS006 (Envoy NACKs them),
XDS008 (Envoy answers 503, or NACKs a listener whose inline routes name it). Warnings:
XDS001, XDS002, XDS003 (failures under load or on idle, not an outage) and XDS007.

Suppressing one rule for one resource takes a stated reason, in the metadata of the
resource or of any element on the way to what the finding is about (a virtual host, a
route, a filter chain; the innermost one that suppresses wins):

    metadata:
      filter_metadata:
        xdscp.lint:
          suppress:
            keepalive-ordering: "backend closes idle after 5m; pool idle is 4m59s by design"

A suppression without a reason, or naming no known rule, is itself an error
(XDS000 lint-suppression), and suppresses nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import re2
from google.protobuf import json_format
from google.protobuf.message import Message

from controlplane import resources
from controlplane.config.environments import MapKey, SourceMap, format_field_path
from controlplane.config.loader import Location, SourcedResource

ERROR, WARNING = "error", "warning"
SUPPRESS_KEY = "xdscp.lint"
BACKEND_KEY = "xdscp.backend"
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
LONG_LIVED_SECONDS = 300.0  # a tcp_proxy idle timeout above this (or none) is long-lived
TCP_PROXY_DEFAULT_IDLE = 3600.0
RE2_PROGRAM_SIZE_LIMIT = 100  # Envoy's default re2.max_program_size.error_level
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

_ANY = "google.protobuf.Any"
# Well-known types no rule looks into (walking them is most of the cost on large configs).
_LEAVES = frozenset(
    "google.protobuf." + name
    for name in (
        *("Duration", "Timestamp", "Struct", "Value", "ListValue", "Empty", "FieldMask"),
        *("BoolValue", "UInt32Value", "UInt64Value", "Int32Value", "Int64Value"),
        *("DoubleValue", "FloatValue", "StringValue", "BytesValue"),
    )
)
_HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_TCP_PROXY = "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
# Every regex Envoy compiles from xDS: Envoy's own matchers and the xds.type generic ones.
_REGEX_MATCHERS = frozenset(
    {"envoy.type.matcher.v3.RegexMatcher", "xds.type.matcher.v3.RegexMatcher"}
)
_METADATA = "envoy.config.core.v3.Metadata"
# Where traffic goes: message type -> field naming the cluster.
_TRAFFIC_TARGETS = {
    "envoy.config.route.v3.RouteAction": "cluster",
    "envoy.config.route.v3.WeightedCluster.ClusterWeight": "name",
    "envoy.config.route.v3.RouteAction.RequestMirrorPolicy": "cluster",
    _TCP_PROXY: "cluster",
    _TCP_PROXY + ".WeightedCluster.ClusterWeight": "name",
}
_DYNAMIC_CLUSTER = ("cluster_header", "cluster_specifier_plugin", "inline_cluster_specifier_plugin")
_DURATION_TEXT = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_METHOD_REGEX = re.compile(r"^\^?\(?([A-Z]+(?:\|[A-Z]+)*)\)?\$?$")
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False

Steps = tuple[str | int, ...]
_DECLARED_AT: Steps = ("metadata", "filter_metadata", MapKey(BACKEND_KEY), "keepalive_timeout")


@dataclass(frozen=True)
class Hit:
    """What a check found: a resource, the field path inside it, and what is wrong."""

    resource: SourcedResource
    steps: Steps
    message: str


class Context:
    """One snapshot's resources, with the walks the checks share computed once."""

    def __init__(self, loaded: list[SourcedResource]) -> None:
        self.resources = loaded
        self._nodes: dict[int, list[tuple[Message, Steps]]] = {}

    def of(self, type_url: str) -> list[SourcedResource]:
        return [r for r in self.resources if r.type_url == type_url]

    def nodes(self, resource: SourcedResource) -> list[tuple[Message, Steps]]:
        """Every message inside the resource (Anys unpacked) with its steps, cached."""
        if id(resource) not in self._nodes:
            self._nodes[id(resource)] = list(_walk(resource.message, ()))
        return self._nodes[id(resource)]

    @cached_property
    def clusters(self) -> dict[str, SourcedResource]:
        return {r.name: r for r in self.of(resources.CLUSTER)}

    @cached_property
    def route_tables(self) -> list[tuple[SourcedResource, Steps, Message]]:
        """(resource, steps, RouteConfiguration): RDS resources and routes inline in HCMs."""
        tables: list[tuple[SourcedResource, Steps, Message]] = [
            (r, (), r.message) for r in self.of(resources.ROUTE)
        ]
        for listener in self.of(resources.LISTENER):
            for message, steps in self.nodes(listener):
                if message.DESCRIPTOR.full_name == _HCM and message.HasField("route_config"):
                    tables.append((listener, (*steps, "route_config"), message.route_config))
        return tables

    @cached_property
    def traffic_targets(self) -> list[tuple[SourcedResource, Steps, str, str]]:
        """(resource, steps, message type, cluster name) of every route and proxy target."""
        found = []
        for resource in self.of(resources.LISTENER) + self.of(resources.ROUTE):
            for message, steps in self.nodes(resource):
                field_name = _TRAFFIC_TARGETS.get(message.DESCRIPTOR.full_name)
                if field_name and getattr(message, field_name):
                    name = getattr(message, field_name)
                    found.append(
                        (resource, (*steps, field_name), message.DESCRIPTOR.full_name, name)
                    )
        return found


def _walk(message: Message, steps: Steps) -> Iterator[tuple[Message, Steps]]:
    if message.DESCRIPTOR.full_name == _ANY:
        try:
            message = resources.unpack_any(message)  # type: ignore[arg-type]
        except resources.UnknownTypeError:
            return
    yield message, steps
    for fd, value in message.ListFields():
        if fd.message_type is None or fd.message_type.full_name in _LEAVES:
            continue
        if fd.message_type.GetOptions().map_entry:
            if fd.message_type.fields_by_name["value"].message_type is not None:
                for key, item in value.items():
                    yield from _walk(item, (*steps, fd.name, MapKey(str(key))))
        elif fd.is_repeated:
            for index, item in enumerate(value):
                yield from _walk(item, (*steps, fd.name, index))
        else:
            yield from _walk(value, (*steps, fd.name))


# --- XDS001 keepalive-ordering ------------------------------------------------------------


def _keepalive_ordering(context: Context) -> Iterator[Hit]:
    routed = {name for _, _, kind, name in context.traffic_targets if kind != _TCP_PROXY}
    for resource in context.of(resources.CLUSTER):
        cluster = resource.message
        declared, raw = _backend_keepalive(cluster)
        options = _http_options(cluster)
        if raw is None and options is None and resource.name not in routed:
            continue  # not an HTTP cluster
        if raw is not None and declared is None:
            text = f"keepalive_timeout {raw!r} is not a duration like 75s"
            yield Hit(resource, _DECLARED_AT, text)
            continue
        idle, idle_at = _idle_timeout(cluster, options)
        if idle is None:
            closes = f"; the backend closes them after {_seconds(declared)}" if declared else ""
            text = f"upstream idle_timeout is not set (Envoy keeps idle connections 1h){closes}"
            yield Hit(resource, idle_at, text)
        elif declared is None:
            text = (
                f"HTTP cluster declares no backend keep-alive timeout "
                f'(metadata.filter_metadata["{BACKEND_KEY}"].keepalive_timeout), so its idle_timeout '
                f"{_seconds(idle)} cannot be checked"
            )
            yield Hit(resource, ("metadata",), text)
        elif idle >= declared:
            text = (
                f"upstream idle_timeout {_seconds(idle)} is not shorter than the backend's "
                f"keep-alive timeout {_seconds(declared)}: Envoy may reuse a connection the "
                "backend is closing, and the request fails with a reset"
            )
            yield Hit(resource, idle_at, text)


def _backend_keepalive(cluster: Message) -> tuple[float | None, object]:
    """(seconds or None if unreadable, the raw declared value or None if not declared)."""
    backend = cluster.metadata.filter_metadata.get(BACKEND_KEY)  # type: ignore[attr-defined]
    if backend is None or "keepalive_timeout" not in backend.fields:
        return None, None
    value = backend.fields["keepalive_timeout"]
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        return (value.number_value if value.number_value > 0 else None), value.number_value
    if kind == "string_value":
        match = _DURATION_TEXT.match(value.string_value.strip())
        seconds = float(match.group(1)) * _UNITS[match.group(2)] if match else None
        return (seconds if seconds else None), value.string_value
    return None, json_format.MessageToDict(value)


def _http_options(cluster: Message) -> Message | None:
    packed = cluster.typed_extension_protocol_options.get(HTTP_OPTIONS)  # type: ignore[attr-defined]
    if packed is None:
        return None
    try:
        return resources.unpack_any(packed)
    except resources.UnknownTypeError:
        return None


def _idle_timeout(cluster: Message, options: Message | None) -> tuple[float | None, Steps]:
    if options is not None:
        at: Steps = ("typed_extension_protocol_options", MapKey(HTTP_OPTIONS))
        common = options.common_http_protocol_options  # type: ignore[attr-defined]
    else:
        at, common = (), cluster.common_http_protocol_options  # type: ignore[attr-defined]
    if common.HasField("idle_timeout"):
        at = (*at, "common_http_protocol_options", "idle_timeout")
        seconds = _duration(common, "idle_timeout", 0.0)
        return (seconds if seconds > 0 else None), at  # 0s disables the timeout
    return None, at or ("typed_extension_protocol_options",)


# --- XDS002 tcp-keepalive -----------------------------------------------------------------


def _tcp_keepalive(context: Context) -> Iterator[Hit]:
    reported: set[str] = set()
    for listener in context.of(resources.LISTENER):
        for proxy, _ in context.nodes(listener):
            if proxy.DESCRIPTOR.full_name != _TCP_PROXY:
                continue
            idle = _duration(proxy, "idle_timeout", TCP_PROXY_DEFAULT_IDLE)
            if 0 < idle <= LONG_LIVED_SECONDS:
                continue
            why = f"idle_timeout {_seconds(idle)}" if idle else "no idle_timeout"
            names = [proxy.cluster] + [w.name for w in proxy.weighted_clusters.clusters]
            for name in names:
                cluster = context.clusters.get(name)
                if cluster is None or name in reported:
                    continue
                reported.add(name)
                options = cluster.message.upstream_connection_options  # type: ignore[attr-defined]
                carries = (
                    f"carries long-lived TCP sessions (listener {listener.name}: tcp_proxy {why})"
                )
                if not options.HasField("tcp_keepalive"):
                    text = f"{carries} but sets no TCP keepalive: NATs and load balancers drop idle sessions silently"
                    yield Hit(cluster, ("upstream_connection_options",), text)
                elif not options.tcp_keepalive.HasField("keepalive_time"):
                    text = f"{carries}; its tcp_keepalive has no keepalive_time, and the kernel default (7200s) outlasts most middlebox idle timeouts"
                    yield Hit(cluster, ("upstream_connection_options", "tcp_keepalive"), text)


# --- XDS003 idempotent-retry, XDS004 shadowed-route ----------------------------------------


def _idempotent_retry(context: Context) -> Iterator[Hit]:
    for resource, base, table in context.route_tables:
        for v, host in enumerate(table.virtual_hosts):  # type: ignore[attr-defined]
            for r, route in enumerate(host.routes):
                methods = _methods(route.match)
                if not route.HasField("route") or not methods or methods - IDEMPOTENT_METHODS:
                    continue
                if route.route.HasField("retry_policy"):
                    policy, at = (
                        route.route.retry_policy,
                        (*base, "virtual_hosts", v, "routes", r, "route"),
                    )
                elif host.HasField("retry_policy"):
                    policy, at = host.retry_policy, (*base, "virtual_hosts", v)
                else:
                    continue
                conditions = {c.strip() for c in policy.retry_on.split(",") if c.strip()}
                missing = [c for c in ("reset", "connect-failure") if c not in conditions]
                if missing and "5xx" not in conditions:
                    text = (
                        f"{'/'.join(sorted(methods))} route retries on "
                        f"{policy.retry_on or 'nothing'!r} but not on {', '.join(missing)}"
                    )
                    yield Hit(resource, (*at, "retry_policy", "retry_on"), text)


def _methods(match: Message) -> set[str] | None:
    """The HTTP methods a route match is limited to, or None when it takes any method."""
    for header in match.headers:  # type: ignore[attr-defined]
        if header.name != ":method" or header.invert_match:
            continue
        string_match = header.string_match
        exact = header.exact_match or (string_match.exact if string_match.HasField("exact") else "")
        if exact:
            return {exact.upper()}
        regex = header.safe_regex_match.regex or string_match.safe_regex.regex
        found = _METHOD_REGEX.match(regex) if regex else None
        if found:
            return set(found.group(1).split("|"))
    return None


def _shadowed_route(context: Context) -> Iterator[Hit]:
    for resource, base, table in context.route_tables:
        for v, host in enumerate(table.virtual_hosts):  # type: ignore[attr-defined]
            earlier_routes = _EarlierRoutes()
            for j, later in enumerate(host.routes):
                for i in earlier_routes.that_may_cover(later.match):
                    earlier = host.routes[i]
                    if _covers(earlier.match, later.match):
                        text = (
                            f"route {_route_label(later, j)} in virtual host {host.name} can never "
                            f"match: route {_route_label(earlier, i)} ({_describe(earlier.match)}) "
                            "takes every request it would"
                        )
                        yield Hit(resource, (*base, "virtual_hosts", v, "routes", j, "match"), text)
                        break
                earlier_routes.add(j, later.match)


_PATH_KINDS = ("prefix", "path", "path_separated_prefix")


class _EarlierRoutes:
    """The routes before one in its virtual host, indexed by path so that a route is checked
    (`_covers`) only against those that could take its requests: a prefix of its path, its
    exact path, and the few that can cover any path (catch-alls, regexes, CONNECT). A
    virtual host of n routes costs about n * path length, not n * n."""

    def __init__(self) -> None:
        self._any: list[int] = []
        self._by_prefix: dict[tuple[bool, str], list[int]] = {}  # (case-sensitive, text)
        self._by_path: dict[tuple[bool, str], list[int]] = {}

    def add(self, index: int, match: Message) -> None:
        kind = match.WhichOneof("path_specifier")
        sensitive = match.case_sensitive.value if match.HasField("case_sensitive") else True  # type: ignore[attr-defined]
        text = getattr(match, kind) if kind in _PATH_KINDS else ""
        text = text if sensitive else text.lower()
        if kind not in _PATH_KINDS or (kind != "path" and not text):
            self._any.append(index)  # "" covers every path; regexes and CONNECT, checked as is
            return
        table = self._by_path if kind == "path" else self._by_prefix
        table.setdefault((sensitive, text), []).append(index)

    def that_may_cover(self, match: Message) -> list[int]:
        """Indexes of the earlier routes `_covers` could answer True for, in order."""
        found = list(self._any)
        kind = match.WhichOneof("path_specifier")
        if kind in _PATH_KINDS:
            path = getattr(match, kind)
            for sensitive, text in ((True, path), (False, path.lower())):
                found += self._by_path.get((sensitive, text), [])
                for end in range(1, len(text) + 1):
                    found += self._by_prefix.get((sensitive, text[:end]), [])
        return sorted(found)


def _covers(a: Message, b: Message) -> bool:
    """True when every request matching `b` also matches `a` (conservative: False if unsure)."""
    for fd, value in a.ListFields():
        if fd.name in ("headers", "query_parameters"):
            wanted = [m.SerializeToString(deterministic=True) for m in getattr(b, fd.name)]
            if any(m.SerializeToString(deterministic=True) not in wanted for m in value):
                return False
        elif fd.containing_oneof is None and fd.name != "case_sensitive":
            same = b.HasField(fd.name) and getattr(b, fd.name) == value
            if fd.name == "runtime_fraction" or not same:
                return False
    kind_a, kind_b = a.WhichOneof("path_specifier"), b.WhichOneof("path_specifier")
    if kind_a == "prefix" and a.prefix == "":  # type: ignore[attr-defined]
        return kind_b != "connect_matcher"
    if kind_a == "connect_matcher" or kind_b == "connect_matcher":
        return kind_a == kind_b
    if {kind_a, kind_b} & {None, "path_match_policy"}:
        return False
    sensitive_a = a.case_sensitive.value if a.HasField("case_sensitive") else True  # type: ignore[attr-defined]
    sensitive_b = b.case_sensitive.value if b.HasField("case_sensitive") else True  # type: ignore[attr-defined]
    if sensitive_a and not sensitive_b:
        return False
    fold = (lambda s: s) if sensitive_a else str.lower
    if kind_a == "safe_regex":
        if kind_b == "safe_regex":
            return a.safe_regex.regex == b.safe_regex.regex  # type: ignore[attr-defined]
        compiled = _re2(a.safe_regex.regex)  # type: ignore[attr-defined]
        return kind_b == "path" and compiled is not None and compiled.fullmatch(b.path) is not None  # type: ignore[attr-defined]
    if kind_b == "safe_regex":
        return False
    pa, pb = fold(getattr(a, kind_a)), fold(getattr(b, kind_b))
    if kind_a == "prefix":
        return pb.startswith(pa)
    if kind_a == "path":
        return kind_b == "path" and pa == pb
    # path_separated_prefix: the prefix, then "/", "?" or the end
    if kind_b == "prefix":
        return pb.startswith(pa + "/")
    return pb == pa or pb.startswith(pa + "/")


def _route_label(route: Message, index: int) -> str:
    return f'{index} "{route.name}"' if route.name else str(index)  # type: ignore[attr-defined]


def _describe(match: Message) -> str:
    kind = match.WhichOneof("path_specifier")
    text = f"{kind} {getattr(match, kind)!r}" if kind and kind != "safe_regex" else str(kind)
    if kind == "safe_regex":
        text = f"safe_regex {match.safe_regex.regex!r}"  # type: ignore[attr-defined]
    if match.headers:  # type: ignore[attr-defined]
        text += " with " + ", ".join(h.name for h in match.headers) + " matched"  # type: ignore[attr-defined]
    return text


# --- XDS005 invalid-re2 --------------------------------------------------------------------


def _invalid_re2(context: Context) -> Iterator[Hit]:
    for resource in context.resources:
        for message, steps in context.nodes(resource):
            if message.DESCRIPTOR.full_name not in _REGEX_MATCHERS:
                continue
            regex = message.regex  # type: ignore[attr-defined]
            try:
                compiled = re2.compile(regex, _RE2_OPTIONS)
            except re2.error as err:
                reason = err.args[0].decode() if isinstance(err.args[0], bytes) else str(err)
                yield Hit(resource, (*steps, "regex"), f'"{regex}" is not valid RE2: {reason}')
                continue
            raised = getattr(message.google_re2, "max_program_size", None)  # type: ignore[attr-defined]
            limit = (raised.value if raised is not None else 0) or RE2_PROGRAM_SIZE_LIMIT
            if compiled.programsize > limit:
                text = (
                    f'"{regex}" compiles to an RE2 program of size {compiled.programsize}, '
                    f"over Envoy's limit of {limit}"
                )
                yield Hit(resource, (*steps, "regex"), text)


def _re2(regex: str) -> object | None:
    try:
        return re2.compile(regex, _RE2_OPTIONS)
    except re2.error:
        return None


# --- XDS006 duplicate-name -----------------------------------------------------------------


def _duplicate_name(context: Context) -> Iterator[Hit]:
    first: dict[tuple[str, str], SourcedResource] = {}
    for resource in context.resources:
        key = (resource.type_url, resource.name)
        if key in first:
            text = f"{resource.message.DESCRIPTOR.name} name also used at {first[key].location}"
            field_name = "cluster_name" if resource.type_url == resources.ENDPOINT else "name"
            yield Hit(resource, (field_name,), text)
        first.setdefault(key, resource)
    for resource, base, table in context.route_tables:
        hosts: dict[str, int] = {}
        domains: dict[str, str] = {}
        for v, host in enumerate(table.virtual_hosts):  # type: ignore[attr-defined]
            if host.name in hosts:
                text = f"virtual host name {host.name!r} also used by virtual_hosts[{hosts[host.name]}]"
                yield Hit(resource, (*base, "virtual_hosts", v, "name"), text)
            hosts.setdefault(host.name, v)
            for d, domain in enumerate(host.domains):
                if domain.lower() in domains:
                    text = f"domain {domain!r} is also served by virtual host {domains[domain.lower()]} (Envoy refuses this)"
                    yield Hit(resource, (*base, "virtual_hosts", v, "domains", d), text)
                domains.setdefault(domain.lower(), host.name)
    addresses: dict[tuple[object, ...], str] = {}
    for listener in context.of(resources.LISTENER):
        chains: dict[str, int] = {}
        for c, chain in enumerate(listener.message.filter_chains):  # type: ignore[attr-defined]
            if chain.name and chain.name in chains:
                text = f"filter chain name {chain.name!r} also used by filter_chains[{chains[chain.name]}]"
                yield Hit(listener, ("filter_chains", c, "name"), text)
            chains.setdefault(chain.name, c)
        key = _address_key(listener.message.address)  # type: ignore[attr-defined]
        if key is not None and key in addresses:
            text = (
                f"listens on {key[1]}:{key[2]}, like listener {addresses[key]} (Envoy refuses this)"
            )
            yield Hit(listener, ("address",), text)
        elif key is not None:
            addresses[key] = listener.name


def _address_key(address: Message) -> tuple[object, ...] | None:
    if address.HasField("socket_address") and address.socket_address.port_value:  # type: ignore[attr-defined]
        socket = address.socket_address  # type: ignore[attr-defined]
        return ("socket", socket.address, socket.port_value, socket.protocol)
    if address.HasField("pipe"):
        return ("pipe", address.pipe.path, "")  # type: ignore[attr-defined]
    return None


# --- XDS007 unused-cluster, XDS008 unknown-cluster ----------------------------------------


def _unused_cluster(context: Context) -> Iterator[Hit]:
    for _, _, table in context.route_tables:
        if table.cluster_specifier_plugins or any(  # type: ignore[attr-defined]
            route.route.WhichOneof("cluster_specifier") in _DYNAMIC_CLUSTER
            for host in table.virtual_hosts  # type: ignore[attr-defined]
            for route in host.routes
        ):
            return  # clusters chosen at request time: any cluster may be used
    used: set[str] = set()
    for resource in context.resources:
        if resource.type_url == resources.ENDPOINT:
            continue
        for message, _ in context.nodes(resource):
            for name in _named_clusters(message):
                if not (resource.type_url == resources.CLUSTER and name == resource.name):
                    used.add(name)
    for name, cluster in context.clusters.items():
        if name not in used:
            yield Hit(cluster, (), "no route, listener or other cluster references this cluster")


def _named_clusters(message: Message) -> Iterator[str]:
    """Cluster names a message refers to: `cluster`/`cluster_name` fields and known lists."""
    fields = message.DESCRIPTOR.fields_by_name
    for name in ("cluster", "cluster_name"):
        fd = fields.get(name)
        is_name = fd is not None and fd.type == fd.TYPE_STRING and not fd.is_repeated
        if is_name and (value := getattr(message, name)):
            yield value
    full_name = message.DESCRIPTOR.full_name
    if _TRAFFIC_TARGETS.get(full_name) == "name":
        yield message.name  # type: ignore[attr-defined]
    if full_name == "envoy.extensions.clusters.aggregate.v3.ClusterConfig":
        yield from message.clusters  # type: ignore[attr-defined]


def _unknown_cluster(context: Context) -> Iterator[Hit]:
    for resource, steps, _, name in context.traffic_targets:
        if name not in context.clusters:
            yield Hit(
                resource, steps, f'sends traffic to cluster "{name}", which is not in the config'
            )
    # A route may leave the choice to a plugin its route configuration defines (Envoy NACKs
    # a name it does not define).
    for resource, base, table in context.route_tables:
        plugins = {p.extension.name for p in table.cluster_specifier_plugins}  # type: ignore[attr-defined]
        for v, host in enumerate(table.virtual_hosts):  # type: ignore[attr-defined]
            for r, route in enumerate(host.routes):
                name = route.route.cluster_specifier_plugin
                if name and name not in plugins:
                    at = (
                        *base,
                        "virtual_hosts",
                        v,
                        "routes",
                        r,
                        "route",
                        "cluster_specifier_plugin",
                    )
                    text = f'names cluster specifier plugin "{name}", which its route configuration does not define'
                    yield Hit(resource, at, text)


# --- Registry and running ------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    id: str
    name: str
    severity: str  # ERROR or WARNING
    hint: str
    check: Callable[[Context], Iterable[Hit]]


@dataclass(frozen=True)
class Finding:
    rule_id: str
    rule_name: str
    severity: str
    resource_type: str  # short name: cluster, endpoint, listener, route, secret
    resource_name: str
    location: Location
    field_path: str | None
    message: str
    hint: str
    suppressed: str | None = field(default=None, compare=False)  # the reason, when suppressed

    def __str__(self) -> str:
        where = f"{self.location}: {self.field_path}" if self.field_path else str(self.location)
        return (
            f"{self.severity}[{self.rule_id} {self.rule_name}]: {where}: "
            f"{self.resource_type} {self.resource_name}: {self.message}"
        )


SUPPRESSION_RULE = Rule(
    "XDS000",
    "lint-suppression",
    ERROR,
    f'write `suppress: {{rule-name: "why this is fine"}}` under metadata "{SUPPRESS_KEY}"',
    lambda context: (),
)

RULES: tuple[Rule, ...] = (
    Rule("XDS001", "keepalive-ordering", WARNING,
         "set common_http_protocol_options.idle_timeout below the keep-alive timeout the "
         f'backend declares in metadata "{BACKEND_KEY}".keepalive_timeout',
         _keepalive_ordering),
    Rule("XDS002", "tcp-keepalive", WARNING,
         "set upstream_connection_options.tcp_keepalive with a keepalive_time under the idle "
         "timeout of NATs and load balancers on the path (300s or less)",
         _tcp_keepalive),
    Rule("XDS003", "idempotent-retry", WARNING,
         "add reset,connect-failure to retry_on (5xx covers both)",
         _idempotent_retry),
    Rule("XDS004", "shadowed-route", ERROR,
         "put the more specific route first, or remove the unreachable one",
         _shadowed_route),
    Rule("XDS005", "invalid-re2", ERROR,
         "Envoy compiles regexes with RE2: no lookaround or backreferences, and a program "
         f"size within max_program_size ({RE2_PROGRAM_SIZE_LIMIT} unless raised)",
         _invalid_re2),
    Rule("XDS006", "duplicate-name", ERROR,
         "give each one its own name (or address)",
         _duplicate_name),
    Rule("XDS007", "unused-cluster", WARNING,
         "remove the cluster, or route to it",
         _unused_cluster),
    Rule("XDS008", "unknown-cluster", ERROR,
         "add the cluster, or fix the name (Envoy answers 503 for it meanwhile)",
         _unknown_cluster),
)  # fmt: skip

_BY_KEY: dict[str, Rule] = {key: r for r in RULES for key in (r.id, r.name)}


def rule(key: str) -> Rule:
    """A rule by id ("XDS004") or name ("shadowed-route")."""
    return _BY_KEY[key]


def lint(
    loaded: Sequence[SourcedResource],
    sources: SourceMap | None = None,
    *,
    include_suppressed: bool = False,
    severity: str | None = None,
) -> list[Finding]:
    """Findings of every rule (or of the rules of one `severity`) over one snapshot's
    resources: broken suppressions first, then rule by rule. Suppressed findings are left out
    unless `include_suppressed` (then `suppressed` holds the reason)."""
    sources = sources if sources is not None else SourceMap.from_files(loaded)
    context = Context(list(loaded))
    suppressions, findings = _suppressions(context, sources)
    for each in RULES:
        if severity is not None and each.severity != severity:
            continue
        for hit in each.check(context):
            reason = _reason(suppressions, hit, each)
            if reason is None or include_suppressed:
                findings.append(_finding(each, hit, sources, reason))
    return findings


class LintRefusal(ValueError):
    """Error-level findings: the snapshot is not to be published."""

    def __init__(self, findings: list[Finding]) -> None:
        self.findings = findings
        super().__init__("\n".join(str(f) for f in findings))


def refusals(loaded: Sequence[SourcedResource], sources: SourceMap | None = None) -> list[Finding]:
    """What stops a publish: every error-level finding not suppressed with a reason (a
    suppression without one is itself an error). xdsctl and the server both ask this."""
    return lint(loaded, sources, severity=ERROR)


def check_publishable(items: Iterable[tuple[str, Message]], where: str) -> None:
    """Raise LintRefusal if `refusals` finds anything in (type URL, message) pairs that come
    with no file (an admin request); findings are located at `where`."""
    location = Location(where)
    loaded = [
        SourcedResource(url, resources.resource_name(message), message, location)
        for url, message in items
    ]
    if found := refusals(loaded, SourceMap({})):
        raise LintRefusal(found)


def _finding(rule: Rule, hit: Hit, sources: SourceMap, reason: str | None = None) -> Finding:
    resource = hit.resource
    return Finding(
        rule.id,
        rule.name,
        rule.severity,
        resources.resource_type(resource.type_url).short_name,
        resource.name,
        sources.locate(resource, hit.steps),
        format_field_path(resource.message.DESCRIPTOR.name, hit.steps) if hit.steps else None,
        hit.message,
        rule.hint,
        reason,
    )


# (type URL, resource name, steps of the element holding the metadata) -> rule name -> reason
_Suppressions = dict[tuple[str, str, Steps], dict[str, str]]


def _reason(suppressions: _Suppressions, hit: Hit, rule: Rule) -> str | None:
    resource = hit.resource
    for end in range(len(hit.steps), -1, -1):
        reasons = suppressions.get((resource.type_url, resource.name, hit.steps[:end]))
        if reasons and rule.name in reasons:
            return reasons[rule.name]
    return None


def _suppressions(context: Context, sources: SourceMap) -> tuple[_Suppressions, list[Finding]]:
    found: _Suppressions = {}
    problems: list[Finding] = []
    for resource in context.resources:
        for metadata, steps in context.nodes(resource):
            if metadata.DESCRIPTOR.full_name != _METADATA or not steps or steps[-1] != "metadata":
                continue
            value = metadata.filter_metadata.get(SUPPRESS_KEY)  # type: ignore[attr-defined]
            if value is None:
                continue
            at = (*steps, "filter_metadata", MapKey(SUPPRESS_KEY))
            reasons: dict[str, str] = {}
            for text, where in _read_suppress(json_format.MessageToDict(value), at, reasons):
                problems.append(_finding(SUPPRESSION_RULE, Hit(resource, where, text), sources))
            found[(resource.type_url, resource.name, steps[:-1])] = reasons
    return found, problems


def _read_suppress(
    value: dict[str, object], at: Steps, reasons: dict[str, str]
) -> Iterator[tuple[str, Steps]]:
    for key in value:
        if key != "suppress":
            yield f'unexpected key "{key}"; only "suppress" is read', (*at, key)
    suppress = value.get("suppress")
    if not isinstance(suppress, dict):
        if "suppress" in value:
            yield "suppress must map rule names to reasons", (*at, "suppress")
        return
    for key, reason in suppress.items():
        where = (*at, "suppress", key)
        known = _BY_KEY.get(key)
        if known is None:
            names = ", ".join(r.name for r in RULES)
            yield f'suppresses unknown rule "{key}"; rules: {names}', where
        elif not isinstance(reason, str) or not reason.strip():
            yield f"suppressing {known.name} needs a reason (a non-empty string)", where
        else:
            reasons[known.name] = reason.strip()


def _duration(message: Message, field_name: str, default: float) -> float:
    if not message.HasField(field_name):
        return default
    return getattr(message, field_name).ToNanoseconds() / 1e9


def _seconds(value: float | None) -> str:
    return "?" if value is None else f"{value:g}s"
