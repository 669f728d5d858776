"""Load operator-written Envoy config into Envoy messages, or say exactly what is wrong.

The job: read every `*.yaml`/`*.yml`/`*.json` file under a directory (Envoy's own v3 form:
a top-level `resources:` list of items with an `"@type"`), parse each item into its Envoy
message with protobuf's json_format, canonicalize it, and check names are present and
unique. Strict and all-or-nothing: every problem in every file is collected and raised as
one ConfigError, each problem naming file, line and field path; nothing partial is returned.
Which entries of the directory are read, and the limits on them, are `inputs`'s rules.

Protobuf reports only the first problem, and its field path skips oneof hops, so problems
are located by walking the values alongside the message descriptors instead (see
_check_message); protobuf's own text is kept only for what a single field's value got wrong.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from google.protobuf import any_pb2, json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from controlplane import resources
from controlplane.config import inputs, plain_values
from controlplane.config.inputs import CONFIG_SUFFIXES
from controlplane.config.yaml_source import (
    ValuePath,
    YamlDocument,
    YamlSourceError,
    parse_file,
)
from controlplane.snapshot import ConsistencyError, Snapshot

RESOURCES_KEY = "resources"
TYPE_KEY = plain_values.TYPE_KEY  # "@type": one spelling, where messages are filled

_ANY = "google.protobuf.Any"
# Messages json_format reads from a scalar or free-form value: checked by parsing, not walked.
_LEAF_MESSAGES = frozenset(
    "google.protobuf." + name
    for name in ("Duration", "Timestamp", "FieldMask", "Struct", "Value", "ListValue")
)
_WRAPPERS_FILE = "google/protobuf/wrappers.proto"
_FAILED_PREFIX = re.compile(r"^(?:Failed to parse \S+ field: )+")
_REWRITES = (
    (
        re.compile(r"^invalid literal for int\(\) with base 10: (.*)$"),
        r"expected an integer, got \1",
    ),
    (re.compile(r"^could not convert string to float: (.*)$"), r"expected a number, got \1"),
    (
        re.compile(r"^expected string or bytes-like object, got '(\w+)'$"),
        r"expected a string, got \1",
    ),
    (re.compile(r"^Struct must be in a dict which is (.*)$"), r"expected a mapping, got \1"),
    (re.compile(r"^ListValue must be in \[\] which is (.*)$"), r"expected a list, got \1"),
)


@dataclass(frozen=True)
class Location:
    file: str  # the path as given, e.g. "examples/config/clusters.yaml"
    line: int | None = None  # 1-based

    def __str__(self) -> str:
        return self.file if self.line is None else f"{self.file}:{self.line}"


@dataclass(frozen=True)
class ConfigProblem:
    location: Location
    field_path: str | None  # e.g. "Cluster.connect_timeout"
    message: str

    def __str__(self) -> str:
        where = f"{self.location}: {self.field_path}" if self.field_path else str(self.location)
        return f"{where}: {self.message}"


class ConfigError(Exception):
    """The config is not loadable; `problems` holds every reason found, in file order."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))


@dataclass(frozen=True)
class SourcedResource:
    type_url: str
    name: str
    message: Message  # canonicalized
    location: Location  # where the item starts


def load_directory(path: str | Path) -> list[SourcedResource]:
    """Every resource in the config files under `path`, in file then item order."""
    directory = Path(path)
    if not directory.is_dir():
        raise ConfigError([ConfigProblem(Location(str(path)), None, "not a directory")])
    files, problems = config_files(directory)
    return _load_files(files, problems)


def load_file(path: str | Path) -> list[SourcedResource]:
    """The resources of one config file (names checked for uniqueness within it)."""
    return _load_files([Path(path)], [])


def config_files(
    directory: Path, skip: Path | None = None
) -> tuple[list[Path], list[ConfigProblem]]:
    """The config files under `directory` (sorted, `skip` left out), and a problem for each
    entry refused (see `inputs`). Raises ConfigError, with nothing read, when the files
    together are over the limit per directory."""
    listing = inputs.config_files(directory, skip)
    problems = [_input_problem(problem) for problem in listing.problems]
    over = listing.over_total(directory)
    if over is not None:
        raise ConfigError([*problems, _input_problem(over)])
    if not listing.files and not problems:
        suffixes = ", ".join("*" + suffix for suffix in CONFIG_SUFFIXES)
        problems.append(ConfigProblem(Location(str(directory)), None, f"no {suffixes} files"))
    return [file.path for file in listing.files], problems


def _input_problem(problem: inputs.InputProblem) -> ConfigProblem:
    return ConfigProblem(Location(str(problem.path), problem.line), None, problem.message)


def _load_files(files: list[Path], problems: list[ConfigProblem]) -> list[SourcedResource]:
    loaded: list[SourcedResource] = []
    for file in files:
        loaded.extend(_load_one(file, problems))
    problems.extend(duplicates(loaded))
    if problems:
        raise ConfigError(problems)
    return loaded


def _load_one(file: Path, problems: list[ConfigProblem]) -> list[SourcedResource]:
    display = str(file)
    try:
        document = parse_file(file)
    except YamlSourceError as err:
        problems.extend(
            ConfigProblem(Location(display, p.line), None, p.message) for p in err.problems
        )
        return []
    loaded = []
    for index, resource_type, body in resource_items(document, display, problems):
        resource = parse_resource(document, display, index, resource_type, body, problems)
        if resource is not None:
            loaded.append(resource)
    return loaded


def resource_items(
    document: YamlDocument, file: str, problems: list[ConfigProblem]
) -> Iterator[tuple[int, resources.ResourceType, dict[str, Any]]]:
    """(index, type, fields without "@type") of each well-formed item of `resources:`."""

    def problem(path: ValuePath, message: str) -> None:
        problems.append(ConfigProblem(Location(file, document.line(path)), None, message))

    top = document.value
    if not isinstance(top, dict):
        kind = "empty file" if top is None else f"top level is a {_kind(top)}"
        problem((), f'{kind}; expected a mapping with a single key "{RESOURCES_KEY}"')
        return
    for key in top:
        if key != RESOURCES_KEY:
            problem((key,), f'unexpected top-level key "{key}"; only "{RESOURCES_KEY}" is allowed')
    if RESOURCES_KEY not in top:
        problem((), f'missing top-level "{RESOURCES_KEY}" list')
        return
    items = top[RESOURCES_KEY]
    if not isinstance(items, list):
        problem((RESOURCES_KEY,), f'"{RESOURCES_KEY}" must be a list, not a {_kind(items)}')
        return
    for index, item in enumerate(items):
        path = (RESOURCES_KEY, index)
        if not isinstance(item, dict):
            problem(path, f"a resource must be a mapping, not a {_kind(item)}")
            continue
        type_url = item.get(TYPE_KEY)
        if type_url not in resources.BY_URL:
            supported = ", ".join(t.type_url for t in resources.ADS_ORDER)
            what = f'unknown resource type "{type_url}"' if TYPE_KEY in item else 'missing "@type"'
            problem((*path, TYPE_KEY), f"{what}; supported: {supported}")
            continue
        body = {key: value for key, value in item.items() if key != TYPE_KEY}
        yield index, resources.BY_URL[type_url], body


def parse_resource(
    document: YamlDocument,
    file: str,
    index: int,
    resource_type: resources.ResourceType,
    body: dict[str, Any],
    problems: list[ConfigProblem],
) -> SourcedResource | None:
    item_path = (RESOURCES_KEY, index)
    message = resource_type.message_class()
    descriptor = message.DESCRIPTOR
    findings: list[_Finding] = []
    if not plain_values.fill(message, body):  # json_format's reading, done faster, or not
        message = resource_type.message_class()
        resources.load_types(any_types(body))  # what its typed_configs name, before parsing
        error = _parse_error(body, message)
        if error is not None or _spelled_twice(body, descriptor):
            findings = list(_check_message(body, descriptor, _At((), descriptor.name)))
        if error is not None and not findings:
            findings = [_Finding((), descriptor.name, _clean(error, descriptor.name))]
    for finding in findings:
        location = Location(file, document.line((*item_path, *finding.path)))
        problems.append(ConfigProblem(location, finding.field_path, finding.message))
    if findings:
        return None
    resources.canonicalize(message)
    name = resources.resource_name(message)
    location = Location(file, document.line(item_path))
    if not name:
        field = "cluster_name" if resource_type.type_url == resources.ENDPOINT else "name"
        problems.append(ConfigProblem(location, f"{descriptor.name}.{field}", "missing name"))
        return None
    return SourcedResource(resource_type.type_url, name, message, location)


def any_types(value: Any) -> Iterator[str]:
    """Every "@type" string inside a resource's plain value, at any depth."""
    if isinstance(value, dict):
        if isinstance(type_url := value.get(TYPE_KEY), str):
            yield type_url
        for item in value.values():
            yield from any_types(item)
    elif isinstance(value, list):
        for item in value:
            yield from any_types(item)


def _parse_error(value: Any, message: Message) -> str | None:
    """json_format's complaint about `value` as `message` (which it fills), or None."""
    try:
        json_format.ParseDict(value, message, ignore_unknown_fields=False)
    except plain_values.JSON_FORMAT_REFUSALS as err:
        return str(err)
    return None


def snapshot_of(loaded: list[SourcedResource]) -> Snapshot:
    """The snapshot of loaded resources; a dangling reference is a ConfigProblem located at
    the resource that holds it."""
    try:
        return Snapshot.from_messages((r.type_url, r.message) for r in loaded)
    except ConsistencyError as error:
        where = {(r.type_url, r.name): r.location for r in loaded}
        raise ConfigError(
            [ConfigProblem(where[(d.from_type, d.from_name)], None, str(d)) for d in error.dangling]
        ) from None


def duplicates(loaded: list[SourcedResource]) -> Iterator[ConfigProblem]:
    """A problem for each resource whose type and name an earlier one already has."""
    first: dict[tuple[str, str], SourcedResource] = {}
    for resource in loaded:
        key = (resource.type_url, resource.name)
        if key in first:
            kind = resource.message.DESCRIPTOR.name
            message = f'duplicate {kind} "{resource.name}" (first defined at {first[key].location})'
            yield ConfigProblem(resource.location, None, message)
        else:
            first[key] = resource


# --- Locating problems: walk the values alongside the descriptors -------------------------


@dataclass(frozen=True)
class _At:
    """Where the walk is: path of the value inside the item, and the field path so far."""

    path: ValuePath
    field_path: str

    def field(self, key: str, field: FieldDescriptor) -> _At:
        return _At((*self.path, key), f"{self.field_path}.{field.name}")

    def item(self, key: str | int) -> _At:
        return _At((*self.path, key), f"{self.field_path}[{key}]")


@dataclass(frozen=True)
class _Finding:
    path: ValuePath  # inside the item: the line reported is that of its deepest node
    field_path: str
    message: str


@dataclass(frozen=True)
class _Probe:
    """Parses one value on its own, wrapped as a field of its parent message."""

    parent: Descriptor
    wrap: Callable[[Any], Any]

    def error(self, value: Any) -> str | None:
        message = message_factory.GetMessageClass(self.parent)()
        return _parse_error(self.wrap(value), message)


def _check_message(value: Any, descriptor: Descriptor, at: _At) -> Iterator[_Finding]:
    """Where json_format's refusal of `value` as a `descriptor` message lies.

    Structural problems (unknown field, wrong shape, a field or oneof set twice under two
    spellings, unknown Any type) are found by the walk itself; each scalar and
    well-known-type value is also parsed on its own, to find which one protobuf rejects.
    Walked only after json_format refused, or after `_spelled_twice` (json_format refuses
    every other problem found here).
    """
    if not isinstance(value, dict):
        yield _Finding(
            at.path, at.field_path, f"expected a mapping ({descriptor.name}), got {_kind(value)}"
        )
        return
    if descriptor.full_name == _ANY:
        yield from _check_any(value, at)
        return
    fields = plain_values.fields_by_key(descriptor)
    set_by_field: dict[str, str] = {}
    set_by_oneof: dict[str, str] = {}
    for key, sub in value.items():
        field = fields.get(key)
        if field is None:
            yield _Finding((*at.path, key), at.field_path, _unknown_field(key, descriptor))
            continue
        if field.name in set_by_field:
            message = f'"{key}" and "{set_by_field[field.name]}" both set field {field.name}'
            yield _Finding((*at.path, key), at.field_path, message)
            continue
        set_by_field[field.name] = key
        oneof = field.containing_oneof
        if oneof is not None and sub is not None:
            if oneof.name in set_by_oneof:
                other = set_by_oneof[oneof.name]
                message = f'"{key}" and "{other}" are alternatives ({oneof.name}); set only one'
                yield _Finding((*at.path, key), at.field_path, message)
                continue
            set_by_oneof[oneof.name] = key
        if sub is not None:
            yield from _check_field(sub, key, field, descriptor, at.field(key, field))


def _spelled_twice(value: Any, descriptor: Descriptor) -> bool:
    """Whether a value json_format accepted sets some field twice, under its proto name and
    its JSON name: json_format takes both (the last wins)."""
    if descriptor.full_name == _ANY:
        message_class = resources.message_class_for(value[TYPE_KEY])
        descriptor = message_class.DESCRIPTOR
        if _is_leaf(descriptor):
            return False
    fields = plain_values.fields_by_key(descriptor)
    names = set()
    for key, sub in value.items():
        field = fields.get(key)
        if field is None:  # "@type" of an Any
            continue
        if field.name in names:
            return True
        names.add(field.name)
        message_type = field.message_type
        if sub is None or message_type is None:
            continue
        if _is_map(field):
            message_type = message_type.fields_by_name["value"].message_type
            if message_type is None:
                continue
            sub = sub.values()
        elif not field.is_repeated:
            sub = (sub,)
        if not _is_leaf(message_type) and any(_spelled_twice(v, message_type) for v in sub):
            return True
    return False


def _check_field(
    value: Any, key: str, field: FieldDescriptor, parent: Descriptor, at: _At
) -> Iterator[_Finding]:
    if _is_map(field):
        if not isinstance(value, dict):
            yield _Finding(at.path, at.field_path, f"expected a mapping, got {_kind(value)}")
            return
        value_field = field.message_type.fields_by_name["value"]
        for map_key, item in value.items():
            wrap = _wrapper(key, lambda v, k=map_key: {k: v})
            yield from _check_value(item, value_field, at.item(map_key), _Probe(parent, wrap))
    elif field.is_repeated:
        if not isinstance(value, list):
            yield _Finding(at.path, at.field_path, f"expected a list, got {_kind(value)}")
            return
        for index, item in enumerate(value):
            wrap = _wrapper(key, lambda v: [v])
            yield from _check_value(item, field, at.item(index), _Probe(parent, wrap))
    else:
        yield from _check_value(value, field, at, _Probe(parent, _wrapper(key, None)))


def _wrapper(key: str, inner: Callable[[Any], Any] | None) -> Callable[[Any], dict[str, Any]]:
    return lambda value: {key: inner(value) if inner else value}


def _check_value(value: Any, field: FieldDescriptor, at: _At, probe: _Probe) -> Iterator[_Finding]:
    message_type = field.message_type
    if message_type is not None and not _is_leaf(message_type):
        yield from _check_message(value, message_type, at)
        return
    error = probe.error(value)
    if error is not None:
        yield _Finding(at.path, at.field_path, _leaf_message(error, field, value, probe.parent))


def _check_any(value: dict[str, Any], at: _At) -> Iterator[_Finding]:
    type_url = value.get(TYPE_KEY)
    if not isinstance(type_url, str) or not type_url:
        yield _Finding(at.path, at.field_path, 'missing "@type" (a type URL naming the message)')
        return
    try:
        message_class = resources.message_class_for(type_url)
    except resources.UnknownTypeError:
        yield _Finding((*at.path, TYPE_KEY), at.field_path, f'unknown type "{type_url}"')
        return
    descriptor = message_class.DESCRIPTOR
    if _is_leaf(descriptor):  # {"@type": ..., "value": ...}
        error = _parse_error(value, any_pb2.Any())
        if error is not None:
            yield _Finding(at.path, at.field_path, _clean(error, "Any"))
        return
    fields = {key: sub for key, sub in value.items() if key != TYPE_KEY}
    yield from _check_message(fields, descriptor, at)


# --- Helpers -------------------------------------------------------------------------------


@cache
def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


@cache
def _is_leaf(descriptor: Descriptor) -> bool:
    return descriptor.full_name in _LEAF_MESSAGES or descriptor.file.name == _WRAPPERS_FILE


def _unknown_field(key: str, descriptor: Descriptor) -> str:
    names = [field.name for field in descriptor.fields]
    snake = re.sub(r"(?<!^)([A-Z])", r"_\1", key).lower()
    close = difflib.get_close_matches(snake, names, n=1)
    hint = f' (did you mean "{close[0]}"?)' if close else ""
    return f'unknown field "{key}"{hint}; valid fields: {", ".join(names)}'


def _leaf_message(error: str, field: FieldDescriptor, value: Any, parent: Descriptor) -> str:
    enum_type = field.enum_type
    if enum_type is not None:
        valid = ", ".join(enum_value.name for enum_value in enum_type.values)
        return f"invalid value {value!r} for {enum_type.name}; valid values: {valid}"
    return _clean(error, parent.name)


def _clean(error: str, root: str) -> str:
    """json_format's innermost complaint, without "Failed to parse" prefixes or "at" path."""
    text = _FAILED_PREFIX.sub("", error).split("\n", 1)[0]
    for marker in (f' at "{root}', f" at {root}"):
        cut = text.rfind(marker)
        if cut >= 0:
            text = text[:cut]
            break
    text = text.rstrip(". ")
    for pattern, replacement in _REWRITES:
        text = pattern.sub(replacement, text)
    return text


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__
