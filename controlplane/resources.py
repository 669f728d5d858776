"""Envoy resource types: the one place that spells a type URL.

Holds the ADS order (CDS, EDS, LDS, RDS, SDS: the order matters, it is how a change makes
before it breaks), the message class of each type, how a resource is named, deterministic
serialization, and the names one resource references in another type (cluster -> EDS name,
listener -> RDS name, TLS context -> SDS secret).
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cache

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import extension_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2, scoped_route_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.runtime.v3 import rtds_pb2
from google.protobuf import any_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message

TYPE_PREFIX = "type.googleapis.com/"

CLUSTER = TYPE_PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT = TYPE_PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = TYPE_PREFIX + "envoy.config.listener.v3.Listener"
ROUTE = TYPE_PREFIX + "envoy.config.route.v3.RouteConfiguration"
SECRET = TYPE_PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"
SCOPED_ROUTE = TYPE_PREFIX + "envoy.config.route.v3.ScopedRouteConfiguration"
VIRTUAL_HOST = TYPE_PREFIX + "envoy.config.route.v3.VirtualHost"
RUNTIME = TYPE_PREFIX + "envoy.service.runtime.v3.Runtime"
EXTENSION_CONFIG = TYPE_PREFIX + "envoy.config.core.v3.TypedExtensionConfig"


@dataclass(frozen=True)
class ResourceType:
    type_url: str
    short_name: str
    message_class: type[Message]
    # SotW: a wildcard type sends every resource; the others send only the names asked for.
    wildcard: bool


# ADS order. Clusters and their endpoints are in place before the listeners and routes that
# point at them, so an update makes before it breaks; route scopes come before the route
# configurations they name. Do not reorder.
ADS_ORDER: tuple[ResourceType, ...] = (
    ResourceType(CLUSTER, "cluster", cluster_pb2.Cluster, wildcard=True),
    ResourceType(ENDPOINT, "endpoint", endpoint_pb2.ClusterLoadAssignment, wildcard=False),
    ResourceType(LISTENER, "listener", listener_pb2.Listener, wildcard=True),
    ResourceType(
        SCOPED_ROUTE, "scoped-route", scoped_route_pb2.ScopedRouteConfiguration, wildcard=True
    ),
    ResourceType(ROUTE, "route", route_pb2.RouteConfiguration, wildcard=False),
    ResourceType(VIRTUAL_HOST, "virtual-host", route_components_pb2.VirtualHost, wildcard=False),
    ResourceType(SECRET, "secret", secret_pb2.Secret, wildcard=False),
    ResourceType(RUNTIME, "runtime", rtds_pb2.Runtime, wildcard=False),
    ResourceType(
        EXTENSION_CONFIG, "extension-config", extension_pb2.TypedExtensionConfig, wildcard=False
    ),
)

BY_URL: dict[str, ResourceType] = {t.type_url: t for t in ADS_ORDER}
BY_SHORT_NAME: dict[str, ResourceType] = {t.short_name: t for t in ADS_ORDER}

_HCM_RDS = "envoy.extensions.filters.network.http_connection_manager.v3.Rds"
_SDS_SECRET_CONFIG = "envoy.extensions.transport_sockets.tls.v3.SdsSecretConfig"
_ANY = "google.protobuf.Any"


class UnknownTypeError(ValueError):
    """A type URL that names no message this process knows."""


def resource_type(type_url: str) -> ResourceType:
    try:
        return BY_URL[type_url]
    except KeyError:
        raise UnknownTypeError(f"unsupported resource type {type_url!r}") from None


def resource_name(message: Message) -> str:
    """The name Envoy knows a resource by (a ClusterLoadAssignment's is its cluster_name)."""
    if isinstance(message, endpoint_pb2.ClusterLoadAssignment):
        return message.cluster_name
    return message.name  # type: ignore[attr-defined]


def parse(type_url: str, body: bytes) -> Message:
    """A resource of a served type from its serialized bytes."""
    message = resource_type(type_url).message_class()
    message.ParseFromString(body)
    return message


DESCRIPTOR_PACKAGES = ("envoy", "xds", "udpa", "contrib")


@cache
def load_all_descriptors() -> int:
    """Import every Envoy/xds/udpa protobuf module, so any `@type` in a typed_config resolves.

    Takes most of a second once per process; returns how many modules were imported. Paths
    that must start fast load only what they meet: `load_descriptors_for`.
    """
    count = 0
    for package_name in DESCRIPTOR_PACKAGES:
        try:
            package = importlib.import_module(package_name)
        except ImportError:
            continue
        for module in pkgutil.walk_packages(package.__path__, package_name + "."):
            if module.name.endswith("_pb2"):
                importlib.import_module(module.name)
                count += 1
    return count


# A message's full name after a "/" (the end of a type URL), as serialized bytes hold it.
_TYPE_NAME_IN_BYTES = re.compile(rb"/([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+)")


def load_descriptors_for(full_name: str) -> bool:
    """Import the generated modules of the protobuf package that defines the message
    `full_name` (e.g. envoy.extensions.filters.http.router.v3.Router), and with them what
    they import. False when no such package exists."""
    parts = full_name.split(".")
    if parts[0] not in DESCRIPTOR_PACKAGES:
        return False
    # A nested message (pkg.Outer.Inner) is defined by the longest prefix that is a package.
    return any(_load_package(".".join(parts[:end])) for end in range(len(parts) - 1, 0, -1))


def load_types(type_urls: Iterable[str]) -> None:
    """Load the message types these type URLs (or full names) name, where not known yet."""
    for name in {url.rsplit("/", 1)[-1] for url in type_urls}:
        if _descriptor(name) is None:
            load_descriptors_for(name)


def load_descriptors_within(bodies: Iterable[bytes]) -> None:
    """Load the message types that serialized messages name in their Anys, at any depth: an
    Any's type URL is plain bytes inside its parent's."""
    load_types(m.decode() for body in bodies for m in _TYPE_NAME_IN_BYTES.findall(body))


def _descriptor(full_name: str) -> Descriptor | None:
    """The message type the descriptor pool knows by this name, or None."""
    try:
        return descriptor_pool.Default().FindMessageTypeByName(full_name)
    except (KeyError, TypeError):  # TypeError: not text upb can take (an unpaired surrogate)
        return None


@cache
def _load_package(package: str) -> bool:
    loaded = False
    for root in ("", "contrib."):
        try:
            spec = importlib.util.find_spec(root + package)
        except (ImportError, ValueError):
            continue
        if spec is None or spec.submodule_search_locations is None:
            continue
        for module in pkgutil.iter_modules(spec.submodule_search_locations, f"{root}{package}."):
            if module.name.endswith("_pb2"):
                importlib.import_module(module.name)
                loaded = True
    return loaded


def message_class_for(type_url: str) -> type[Message]:
    """The generated class of any message type the descriptor pool knows, or can learn by
    importing the package that defines it."""
    full_name = type_url.rsplit("/", 1)[-1]
    descriptor = _descriptor(full_name)
    if descriptor is None and load_descriptors_for(full_name):
        descriptor = _descriptor(full_name)
    if descriptor is None:
        raise UnknownTypeError(f"unknown type {type_url!r}")
    return message_factory.GetMessageClass(descriptor)


def unpack_any(packed: any_pb2.Any) -> Message:
    message = message_class_for(packed.type_url)()
    message.ParseFromString(packed.value)
    return message


def _sub_messages(message: Message, wanted: Callable[[Descriptor], bool]) -> Iterator[Message]:
    """Every message directly inside `message` (repeated fields and map values included)
    that may hold, itself or below it, a message `wanted` picks: a walk looking for those
    skips the rest (an endpoint's address, a timeout), which cannot."""
    for field, value in message.ListFields():
        if field.type != field.TYPE_MESSAGE:
            continue
        if not (field.is_extension or may_hold(field.message_type, wanted)):
            continue
        if field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            if value_field.type == value_field.TYPE_MESSAGE:
                yield from value.values()
        elif field.is_repeated:
            yield from value
        else:
            yield value


@cache
def may_hold(message_type: Descriptor, wanted: Callable[[Descriptor], bool]) -> bool:
    """Whether a message of this type can hold a message that `wanted` picks, at any depth
    (itself included), going by the types its fields can hold. `wanted` should pick Any
    too: an Any can hold any message."""
    seen = {message_type.full_name}
    pending = [message_type]
    while pending:
        current = pending.pop()
        if wanted(current):
            return True
        for field in current.fields:
            sub = field.message_type
            if sub is not None and sub.full_name not in seen:
                seen.add(sub.full_name)
                pending.append(sub)
    return False


def _is_any(message_type: Descriptor) -> bool:
    return message_type.full_name == _ANY


def canonicalize(message: Message) -> None:
    """Re-pack every nested Any with deterministic serialization, in place.

    Map order inside an Any's bytes otherwise depends on how the message was built, and the
    snapshot version is a hash of these bytes.
    """
    for sub in _sub_messages(message, _is_any):
        if sub.DESCRIPTOR.full_name == _ANY:
            inner = unpack_any(sub)
            canonicalize(inner)
            sub.Pack(inner, type_url_prefix=sub.type_url.rsplit("/", 1)[0], deterministic=True)
        else:
            canonicalize(sub)


def serialize(message: Message) -> bytes:
    """Deterministic bytes of an already canonicalized message."""
    return message.SerializeToString(deterministic=True)


def _served_by_us(config_source: Message) -> bool:
    """True when a ConfigSource points back at this control plane (ADS or `self`)."""
    return config_source.HasField("ads") or config_source.HasField("self")


def references(message: Message) -> Iterator[tuple[str, str]]:
    """(type URL, name) of each resource this one needs from the same snapshot.

    Only references resolved over ADS count: a secret or route fetched from another source is
    not this snapshot's business.
    """
    if isinstance(message, cluster_pb2.Cluster):
        eds = message.eds_cluster_config
        if message.type == cluster_pb2.Cluster.EDS and _served_by_us(eds.eds_config):
            yield ENDPOINT, eds.service_name or message.name
    if (
        isinstance(message, scoped_route_pb2.ScopedRouteConfiguration)
        and message.route_configuration_name
    ):
        yield ROUTE, message.route_configuration_name
    yield from _nested_references(message)


def _discovers_its_config(message: Message) -> bool:
    """A filter whose config comes from ECDS over ADS, with no default to fall back on."""
    if "config_discovery" not in message.DESCRIPTOR.fields_by_name or not message.HasField(
        "config_discovery"
    ):
        return False
    source = message.config_discovery  # type: ignore[attr-defined]
    return _served_by_us(source.config_source) and not source.HasField("default_config")


def _may_reference(message_type: Descriptor) -> bool:
    """A message of this type may name a resource of the snapshot (or is an Any)."""
    return (
        message_type.full_name in (_ANY, _HCM_RDS, _SDS_SECRET_CONFIG)
        or "config_discovery" in message_type.fields_by_name
    )


def _nested_references(message: Message) -> Iterator[tuple[str, str]]:
    for sub in _sub_messages(message, _may_reference):
        full_name = sub.DESCRIPTOR.full_name
        if full_name == _ANY:
            try:
                sub = unpack_any(sub)
            except UnknownTypeError:
                continue
            full_name = sub.DESCRIPTOR.full_name
        if full_name == _HCM_RDS and _served_by_us(sub.config_source):
            yield ROUTE, sub.route_config_name
        elif full_name == _SDS_SECRET_CONFIG and _served_by_us(sub.sds_config):
            yield SECRET, sub.name
        elif _discovers_its_config(sub):
            yield EXTENSION_CONFIG, sub.name  # type: ignore[attr-defined]
        yield from _nested_references(sub)
