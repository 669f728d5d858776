"""Envoy's own field rules (protoc-gen-validate annotations), checked before anything ships.

Envoy validates every message it receives against the `validate.rules` options in its
protos (required fields, length limits, ranges, durations, defined enums...) and NACKs a
violation. This module checks the same annotations here, so the operator gets a file and
line instead of a NACK from a canary.

Why an interpreter and not the PyPI `protoc-gen-validate` runtime: that runtime (1.3.3)
reads `FieldDescriptor.label`, which protobuf 7 removed, so it fails on every Envoy message.
With a shim it runs, but it exec()s Jinja-generated code per message type (about 4 s for the
example config's types on first use), mutates descriptor options (protobuf warns this will
raise), stops at `typed_config` (never unpacks an Any) and reports paths like `p.name`
without the enclosing fields. So the rules are read from the same annotations and
interpreted here, walking descriptors with full field paths and descending into Anys.

Covered: message required/skip, disabled/ignored messages, required oneofs; numeric
const/in/not_in/lt/lte/gt/gte (with exclusive ranges) for every scalar kind and wrappers;
bool const; string const/len/min_len/max_len/len_bytes/min_bytes/max_bytes/pattern (RE2)/
prefix/suffix/contains/not_contains/in/not_in/well-known formats and header regexes/
ignore_empty; bytes likewise; enum const/defined_only/in/not_in; repeated min_items/
max_items/unique/items; map min_pairs/max_pairs/keys/values; any required/in/not_in;
duration and timestamp required/const/ranges. Scanning the 2,071 Envoy message types shows
no other rule in use.
"""

from __future__ import annotations

import ipaddress
import operator
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any
from urllib.parse import urlparse

import re2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from validate import validate_pb2

from controlplane import resources
from controlplane.config.environments import MapKey, SourceMap, format_field_path
from controlplane.config.loader import ConfigProblem, SourcedResource

_ANY = "google.protobuf.Any"
_DURATION = "google.protobuf.Duration"
_TIMESTAMP = "google.protobuf.Timestamp"
_WRAPPERS_FILE = "google/protobuf/wrappers.proto"
_NUMERIC = frozenset(
    {"float", "double", "int32", "int64", "uint32", "uint64"}
    | {"sint32", "sint64", "fixed32", "fixed64", "sfixed32", "sfixed64"}
)
_HEADER_REGEX = {
    (validate_pb2.HTTP_HEADER_NAME, True): r"^:?[0-9a-zA-Z!#$%&'*+-.^_|~`]+$",
    (validate_pb2.HTTP_HEADER_VALUE, True): r"^[^\x00-\x08\x0A-\x1F\x7F]*$",
    (validate_pb2.HTTP_HEADER_NAME, False): r"^[^\x00\x0A\x0D]*$",
    (validate_pb2.HTTP_HEADER_VALUE, False): r"^[^\x00\x0A\x0D]*$",
}
# Lower bounds first: an upper bound below the lower one makes an exclusive range.
_BOUNDS: dict[str, tuple[Callable[[Any, Any], bool], str]] = {
    "gt": (operator.gt, "greater than"),
    "gte": (operator.ge, "at least"),
    "lt": (operator.lt, "less than"),
    "lte": (operator.le, "at most"),
}
_UUID = re.compile(r"^[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False

Steps = tuple[str | int, ...]


@dataclass(frozen=True)
class Violation:
    steps: Steps  # field names, list indices and map keys (MapKey) from the resource root
    field_path: str  # e.g. "Cluster.connect_timeout"
    message: str


def check_field_rules(
    loaded: Sequence[SourcedResource], sources: SourceMap | None = None
) -> list[ConfigProblem]:
    """A problem per violated annotation, located by `sources` (re-read from files if None).

    Resources in the order given; each resource's problems in line order.
    """
    sources = sources if sources is not None else SourceMap.from_files(loaded)
    problems = []
    for resource in loaded:
        found = [
            ConfigProblem(sources.locate(resource, v.steps), v.field_path, v.message)
            for v in violations(resource.message)
        ]
        problems += sorted(found, key=lambda p: p.location.line or 0)  # in the file's order
    return problems


def violations(message: Message) -> list[Violation]:
    """Every annotation `message` (and everything inside it, Anys included) violates."""
    found: list[Violation] = []
    _walk(message, (), message.DESCRIPTOR.name, found)
    return found


# --- Walking -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    skip: bool  # validate.disabled or validate.ignored: nothing inside is checked
    required_oneofs: tuple[str, ...]
    rules: tuple[tuple[FieldDescriptor, validate_pb2.FieldRules], ...]  # annotated fields
    no_descent: frozenset[str]  # message fields marked message.skip


@cache
def _plan(descriptor: Descriptor) -> _Plan:
    options = descriptor.GetOptions()
    skip = any(
        options.HasExtension(ext) and options.Extensions[ext]
        for ext in (validate_pb2.disabled, validate_pb2.ignored)
    )
    oneofs = tuple(
        oneof.name
        for oneof in descriptor.oneofs
        if oneof.GetOptions().HasExtension(validate_pb2.required)
        and oneof.GetOptions().Extensions[validate_pb2.required]
    )
    rules = tuple(
        (field, field.GetOptions().Extensions[validate_pb2.rules])
        for field in descriptor.fields
        if field.GetOptions().HasExtension(validate_pb2.rules)
    )
    no_descent = frozenset(field.name for field, rule in rules if rule.message.skip)
    return _Plan(skip, oneofs, rules, no_descent)


def _walk(message: Message, steps: Steps, root: str, out: list[Violation]) -> None:
    descriptor = message.DESCRIPTOR
    if descriptor.full_name == _ANY:
        try:
            inner = resources.unpack_any(message)  # type: ignore[arg-type]
        except resources.UnknownTypeError:
            return
        _walk(inner, steps, root, out)
        return
    plan = _plan(descriptor)
    if plan.skip:
        return
    for oneof in plan.required_oneofs:
        if message.WhichOneof(oneof) is None:
            names = ", ".join(f.name for f in descriptor.oneofs_by_name[oneof].fields)
            text = f"one of {names} is required [validate: oneof {oneof} required]"
            out.append(Violation(steps, format_field_path(root, steps), text))
    for field, rules in plan.rules:
        _check_field(message, field, rules, steps, root, out)
    for field, value in message.ListFields():  # only what is set can hold more to check
        if field.message_type is None or field.name in plan.no_descent:
            continue
        here = (*steps, field.name)
        if _is_map(field):
            if field.message_type.fields_by_name["value"].message_type is not None:
                for key, item in value.items():
                    _walk(item, (*here, MapKey(str(key))), root, out)
        elif field.is_repeated:
            for index, item in enumerate(value):
                _walk(item, (*here, index), root, out)
        else:
            _walk(value, here, root, out)


def _check_field(
    message: Message,
    field: FieldDescriptor,
    rules: validate_pb2.FieldRules,
    steps: Steps,
    root: str,
    out: list[Violation],
) -> None:
    here = (*steps, field.name)

    def report(text: str, at: Steps = here) -> None:
        out.append(Violation(at, format_field_path(root, at), text))

    value = getattr(message, field.name)
    if _is_map(field):
        for text, key in _map_rules(rules, value, field):
            report(text, here if key is None else (*here, MapKey(str(key))))
    elif field.is_repeated:
        for text, index in _repeated_rules(rules, list(value), field):
            report(text, here if index is None else (*here, index))
    else:
        is_set = message.HasField(field.name) if field.has_presence else True
        if field.containing_oneof is not None and not is_set:
            return  # rules on a oneof member hold only when that member is the one set
        for text in _single_rules(rules, value, field, is_set):
            report(text)


# --- Rules ---------------------------------------------------------------------------------


def _single_rules(
    rules: validate_pb2.FieldRules, value: Any, field: FieldDescriptor, is_set: bool
) -> Iterator[str]:
    """Rules of one singular value (a field, a list item, a map key or value)."""
    if rules.message.required and not is_set:
        yield "is required [validate: message.required]"
        return
    kind = rules.WhichOneof("type")
    if kind is None or kind in ("repeated", "map"):
        return
    typed = getattr(rules, kind)
    if kind in ("any", "duration", "timestamp"):
        if typed.required and not is_set:
            yield f"is required [validate: {kind}.required]"
            return
    elif field.message_type is not None and is_set:  # a wrapper (UInt32Value...)
        value = value.value
    if not is_set:  # an unset oneof member, proto3 optional or message: nothing to check
        return
    if kind in _NUMERIC:
        yield from _range_rules(kind, typed, value, _number_text, _same)
    elif kind == "bool":
        if typed.HasField("const") and value != typed.const:
            yield f"must be {str(typed.const).lower()} [validate: bool.const]"
    elif kind in ("string", "bytes"):
        yield from _text_rules(kind, typed, value)
    elif kind == "enum":
        yield from _enum_rules(typed, value, field)
    elif kind == "any":
        if _members(typed) and value.type_url not in _members(typed):
            yield f"type {value.type_url} is not one of {', '.join(_members(typed))} [validate: any.in]"
        if value.type_url in typed.not_in:
            yield f"type {value.type_url} is not allowed here [validate: any.not_in]"
    elif kind == "duration":
        yield from _range_rules(kind, typed, _nanos(value), _duration_text, _nanos)
    elif kind == "timestamp":
        yield from _timestamp_rules(typed, value)


def _range_rules(
    kind: str, typed: Any, value: Any, text: Callable[[Any], str], convert: Callable[[Any], Any]
) -> Iterator[str]:
    """const, in, not_in, and the lt/lte/gt/gte range (exclusive when upper < lower)."""
    if getattr(typed, "ignore_empty", False) and not value:
        return
    got = f"got {text(value)} [validate: {kind}"
    if typed.HasField("const") and value != convert(typed.const):
        yield f"must be {text(convert(typed.const))}, {got}.const]"
    members = [convert(v) for v in _members(typed)]
    if members and value not in members:
        yield f"must be one of {', '.join(text(m) for m in members)}, {got}.in]"
    if value in [convert(v) for v in typed.not_in]:
        yield f"must not be {text(value)} [validate: {kind}.not_in]"
    bounds = [(op, convert(getattr(typed, op))) for op in _BOUNDS if typed.HasField(op)]
    if not bounds:
        return
    ok = [_BOUNDS[op][0](value, bound) for op, bound in bounds]
    wanted = [f"{_BOUNDS[op][1]} {text(bound)}" for op, bound in bounds]
    ops = "/".join(op for op, _ in bounds)
    exclusive = len(bounds) == 2 and bounds[1][1] < bounds[0][1]  # e.g. gt 10, lt 5
    if exclusive and not any(ok):
        yield f"must be {' or '.join(wanted)}, {got}.{ops}]"
    elif not exclusive and not all(ok):
        yield f"must be {' and '.join(wanted)}, {got}.{ops}]"


def _text_rules(kind: str, typed: Any, value: str | bytes) -> Iterator[str]:
    """string and bytes rules: only the rules set are looked at (most fields set one)."""
    if typed.ignore_empty and not value:
        return
    for rule_field, bound in typed.ListFields():
        name = rule_field.name
        if name in ("ignore_empty", "strict") or (name in _WELL_KNOWN and not bound):
            continue
        if name == "well_known_regex":
            pattern = _HEADER_REGEX.get((bound, typed.strict))  # strict defaults to true
            if pattern and not _search(pattern, value):  # type: ignore[arg-type]
                what = validate_pb2.KnownRegex.Name(bound).lower().replace("_", " ")
                yield f"{value!r} is not a valid {what} [validate: {kind}.{name}]"
            continue
        if name in _WELL_KNOWN:
            if not _WELL_KNOWN[name](value):
                yield f"{value!r} is not a valid {name.replace('_', ' ')} [validate: {kind}.{name}]"
            continue
        holds, wanted = _TEXT_CHECKS[name]
        if not holds(value, bound):
            yield f"{wanted(bound, value)} [validate: {kind}.{name}]"


def _size(value: str | bytes) -> int:
    return len(value.encode("utf-8", "surrogatepass")) if isinstance(value, str) else len(value)


def _unit(value: str | bytes) -> str:
    return "character(s)" if isinstance(value, str) else "byte(s)"


# rule -> (holds(value, bound), what is wanted(bound, value))
_TEXT_CHECKS: dict[str, tuple[Callable[[Any, Any], bool], Callable[[Any, Any], str]]] = {
    "const": (operator.eq, lambda b, v: f"must be {b!r}"),
    "len": (lambda v, b: len(v) == b, lambda b, v: f"must be {b} {_unit(v)} long, got {len(v)}"),
    "min_len": (
        lambda v, b: len(v) >= b,
        lambda b, v: f"must be at least {b} {_unit(v)} long, got {len(v)}",
    ),
    "max_len": (
        lambda v, b: len(v) <= b,
        lambda b, v: f"must be at most {b} {_unit(v)} long, got {len(v)}",
    ),
    "len_bytes": (lambda v, b: _size(v) == b, lambda b, v: f"must be {b} bytes, got {_size(v)}"),
    "min_bytes": (
        lambda v, b: _size(v) >= b,
        lambda b, v: f"must be at least {b} byte(s), got {_size(v)}",
    ),
    "max_bytes": (
        lambda v, b: _size(v) <= b,
        lambda b, v: f"must be at most {b} bytes, got {_size(v)}",
    ),
    "prefix": (lambda v, b: v.startswith(b), lambda b, v: f"must start with {b!r}"),
    "suffix": (lambda v, b: v.endswith(b), lambda b, v: f"must end with {b!r}"),
    "contains": (lambda v, b: b in v, lambda b, v: f"must contain {b!r}"),
    "not_contains": (lambda v, b: b not in v, lambda b, v: f"must not contain {b!r}"),
    "in": (lambda v, b: v in b, lambda b, v: f"must be one of {', '.join(map(repr, b))}"),
    "not_in": (lambda v, b: v not in b, lambda b, v: f"must not be {v!r}"),
    "pattern": (
        lambda v, b: _search(b, v if isinstance(v, str) else v.decode("latin-1")),
        lambda b, v: f"must match the regex {b!r}",
    ),
}


def _enum_rules(typed: validate_pb2.EnumRules, value: int, field: FieldDescriptor) -> Iterator[str]:
    enum = field.enum_type
    name = enum.values_by_number[value].name if value in enum.values_by_number else str(value)
    if typed.HasField("const") and value != typed.const:
        yield f"must be {_enum_name(field, typed.const)}, got {name} [validate: enum.const]"
    if typed.defined_only and value not in enum.values_by_number:
        yield f"{value} is not a defined {enum.name} value [validate: enum.defined_only]"
    if _members(typed) and value not in _members(typed):
        allowed = ", ".join(_enum_name(field, v) for v in _members(typed))
        yield f"must be one of {allowed}, got {name} [validate: enum.in]"
    if value in typed.not_in:
        yield f"must not be {name} [validate: enum.not_in]"


def _timestamp_rules(typed: validate_pb2.TimestampRules, value: Any) -> Iterator[str]:
    yield from _range_rules("timestamp", typed, _nanos(value), _timestamp_text, _nanos)
    now = time.time_ns()
    if typed.lt_now and _nanos(value) >= now:
        yield "must be in the past [validate: timestamp.lt_now]"
    if typed.gt_now and _nanos(value) <= now:
        yield "must be in the future [validate: timestamp.gt_now]"
    if typed.HasField("within") and abs(_nanos(value) - now) > _nanos(typed.within):
        yield f"must be within {_duration_text(_nanos(typed.within))} of now [validate: timestamp.within]"


def _repeated_rules(
    rules: validate_pb2.FieldRules, items: list[Any], field: FieldDescriptor
) -> Iterator[tuple[str, int | None]]:
    if rules.WhichOneof("type") != "repeated":
        return
    typed = rules.repeated
    if typed.ignore_empty and not items:
        return
    if typed.HasField("min_items") and len(items) < typed.min_items:
        yield (
            f"needs at least {typed.min_items} item(s), got {len(items)} [validate: repeated.min_items]",
            None,
        )
    if typed.HasField("max_items") and len(items) > typed.max_items:
        yield (
            f"takes at most {typed.max_items} item(s), got {len(items)} [validate: repeated.max_items]",
            None,
        )
    if typed.unique:
        seen: set[Any] = set()
        for index, item in enumerate(items):
            key = item.SerializeToString(deterministic=True) if isinstance(item, Message) else item
            if key in seen:
                yield "duplicates an earlier item [validate: repeated.unique]", index
            seen.add(key)
    if typed.HasField("items"):
        for index, item in enumerate(items):
            for text in _single_rules(typed.items, item, field, True):
                yield text, index


def _map_rules(
    rules: validate_pb2.FieldRules, value: Any, field: FieldDescriptor
) -> Iterator[tuple[str, Any]]:
    if rules.WhichOneof("type") != "map":
        return
    typed = rules.map
    if typed.ignore_empty and not value:
        return
    if typed.HasField("min_pairs") and len(value) < typed.min_pairs:
        yield (
            f"needs at least {typed.min_pairs} entr(ies), got {len(value)} [validate: map.min_pairs]",
            None,
        )
    if typed.HasField("max_pairs") and len(value) > typed.max_pairs:
        yield (
            f"takes at most {typed.max_pairs} entr(ies), got {len(value)} [validate: map.max_pairs]",
            None,
        )
    key_field = field.message_type.fields_by_name["key"]
    value_field = field.message_type.fields_by_name["value"]
    for key, item in value.items():
        if typed.HasField("keys"):
            for text in _single_rules(typed.keys, key, key_field, True):
                yield f"key {key!r} {text}", key
        if typed.HasField("values"):
            for text in _single_rules(typed.values, item, value_field, True):
                yield text, key


# --- Helpers -------------------------------------------------------------------------------


@cache
def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


@cache
def _compiled(pattern: str) -> Any:
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error:
        return re.compile(pattern)


def _search(pattern: str, value: str) -> bool:
    return _compiled(pattern).search(value) is not None


def _members(typed: Any) -> Any:
    """A rule's `in` list (a Python keyword, so not an attribute name)."""
    return getattr(typed, "in")


def _same(value: Any) -> Any:
    return value


def _number_text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _nanos(value: Any) -> int:
    return value.seconds * 1_000_000_000 + value.nanos


def _duration_text(nanos: int) -> str:
    seconds, rest = divmod(nanos, 1_000_000_000)
    return f"{seconds}s" if not rest else f"{nanos / 1e9:g}s"


def _timestamp_text(nanos: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(nanos // 1_000_000_000))


def _enum_name(field: FieldDescriptor, number: int) -> str:
    value = field.enum_type.values_by_number.get(number)
    return value.name if value is not None else str(number)


def _hostname(value: str) -> bool:
    host = value[:-1] if value.endswith(".") else value
    if not host or len(host) > 253:
        return False
    return all(
        0 < len(part) <= 63
        and part[0] != "-"
        and part[-1] != "-"
        and re.fullmatch(r"[A-Za-z0-9-]+", part) is not None
        for part in host.split(".")
    )


def _ip(value: str | bytes, version: int | None = None) -> bool:
    try:
        address = ipaddress.ip_address(value)  # bytes: 4 or 16 packed octets
    except ValueError:
        return False
    return version is None or address.version == version


def _uri(value: str, absolute: bool) -> bool:
    try:
        parsed = urlparse(value)
    except ValueError:
        return False
    return bool(parsed.scheme) or not absolute


def _email(value: str) -> bool:
    address = value.split("<", 1)[1].split(">", 1)[0] if "<" in value else value
    local, at, host = address.rpartition("@")
    return bool(at and local) and len(local) <= 64 and _hostname(host)


_WELL_KNOWN = {
    "email": _email,
    "hostname": _hostname,
    "ip": _ip,
    "ipv4": lambda v: _ip(v, 4),
    "ipv6": lambda v: _ip(v, 6),
    "uri": lambda v: _uri(v, True),
    "uri_ref": lambda v: _uri(v, False),
    "address": lambda v: _ip(v) or _hostname(v),
    "uuid": lambda v: _UUID.match(v) is not None,
}
