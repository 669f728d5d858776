"""Environments: one base config, one small overlay per environment, one snapshot each.

Layout of a config directory:

    DIR/*.yaml, DIR/**/*.yaml        base resources (Envoy's `resources:` form), shared by all
    DIR/environments/<env>.yaml      one overlay per environment (also .yml / .json)

Without an environment, `environments/` is ignored and the base is loaded as it is.

An overlay is declarative and holds at most three keys, applied in this order:

    resources:         # extra resources only this environment has (same form as the base)
    - "@type": ...
    patches:           # changes to resources matched by type and name
    - "@type": cluster           # short name (cluster, endpoint, listener, route, secret)
      name: web                  # or a full type URL
      merge: {...}               # JSON merge patch (RFC 7386) of the resource's YAML form:
                                 # mappings merge key by key, `null` deletes a key, and any
                                 # other value (lists included) replaces what was there whole
    - "@type": route
      name: debug_routes
      remove: true               # drops the resource from this environment
    variables:         # substituted last, in base and overlay string values alike
      API_PORT: 8082

`${NAME}` inside a string is replaced by the variable's text; a string that is exactly
`${NAME}` takes the variable's own value (a number, a mapping...). `$${` writes a literal
`${`. A variable nobody defines is an error naming the file and line that uses it.

Everything is merged as plain values *before* protobuf parsing, so a bad value still names
the file and line it was written on: the overlay's for patched values, the base's otherwise.
`SourceMap` keeps those origins for later stages (field rules, lint) to point at lines too.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from controlplane import resources
from controlplane.config import loader
from controlplane.config.loader import (
    CONFIG_SUFFIXES,
    RESOURCES_KEY,
    TYPE_KEY,
    ConfigError,
    ConfigProblem,
    Location,
    SourcedResource,
)
from controlplane.config.yaml_source import ValuePath, YamlDocument, YamlSourceError, parse_file

ENVIRONMENTS_DIR = "environments"
_OVERLAY_KEYS = ("resources", "patches", "variables")
_PATCH_KEYS = (TYPE_KEY, "name", "merge", "remove")
_VARIABLE = re.compile(r"\$(\$?)\{([^}]*)\}")
_VARIABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ENV_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class UnknownEnvironmentError(ConfigError):
    """The environment asked for has no overlay file (the message lists those that do)."""


class MapKey(str):
    """A map key in a field path: rendered `[key]`, looked up like any mapping key."""

    __slots__ = ()


def format_field_path(root: str, steps: Iterable[str | int]) -> str:
    """`Cluster.metadata.filter_metadata[xdscp.backend]`, as the loader spells field paths."""
    text = root
    for step in steps:
        text += f"[{step}]" if isinstance(step, int | MapKey) else f".{step}"
    return text


# --- Where values were written -------------------------------------------------------------


@dataclass(frozen=True)
class _Origin:
    """A subtree written at `doc_path` of `file`."""

    file: str
    document: YamlDocument
    doc_path: ValuePath

    def location(self, rest: ValuePath) -> Location:
        return Location(self.file, self.document.line((*self.doc_path, *rest)))


@dataclass
class _Item:
    """One resource as plain values, before parsing, with the origin of each subtree."""

    resource_type: resources.ResourceType
    body: dict[str, Any]
    origins: dict[ValuePath, _Origin]

    @property
    def name(self) -> str | None:
        key = "cluster_name" if self.resource_type.type_url == resources.ENDPOINT else "name"
        name = self.body.get(key, self.body.get(_camel(key)))
        return name if isinstance(name, str) else None

    def locate(self, path: ValuePath) -> Location:
        """Location of the value at `path` in `body`: the longest prefix with an origin."""
        for end in range(len(path), -1, -1):
            origin = self.origins.get(path[:end])
            if origin is not None:
                return origin.location(path[end:])
        raise AssertionError("every item has an origin for its root")


class SourceMap:
    """Finds the file and line of a value inside a loaded resource, by its field path."""

    def __init__(self, items: dict[tuple[str, str], _Item]) -> None:
        self._items = items

    @classmethod
    def from_files(cls, loaded: Iterable[SourcedResource]) -> SourceMap:
        """Re-reads each resource's file to find its item (for resources from `load_directory`)."""
        documents: dict[str, tuple[YamlDocument, dict[int | None, int]] | None] = {}
        items: dict[tuple[str, str], _Item] = {}
        for resource in loaded:
            file = resource.location.file
            if file not in documents:
                documents[file] = _items_by_line(Path(file))
            found = documents[file]
            index = found[1].get(resource.location.line) if found else None
            if found is None or index is None:
                continue
            document = found[0]
            body = document.value[RESOURCES_KEY][index]
            origin = _Origin(file, document, (RESOURCES_KEY, index))
            kind = resources.resource_type(resource.type_url)
            items[(resource.type_url, resource.name)] = _Item(kind, body, {(): origin})
        return cls(items)

    def locate(self, resource: SourcedResource, steps: Sequence[str | int]) -> Location:
        """Where the field at `steps` (proto field names, list indices, map keys) was written.

        Falls back to the deepest enclosing value that was written, then to the resource.
        """
        item = self._items.get((resource.type_url, resource.name))
        if item is None:
            return resource.location
        node: Any = item.body
        path: list[str | int] = []
        for step in steps:
            if isinstance(step, int) and isinstance(node, list) and 0 <= step < len(node):
                key: str | int | None = step
            elif isinstance(step, str) and isinstance(node, dict):
                key = step if step in node or isinstance(step, MapKey) else _camel(step)
                key = key if key in node else None
            else:
                key = None
            if key is None:
                break
            path.append(key)
            node = node[key]
        return item.locate(tuple(path))


def _items_by_line(file: Path) -> tuple[YamlDocument, dict[int | None, int]] | None:
    """The file's document, and the index of the `resources:` item starting on each line."""
    try:
        document = parse_file(file)
    except YamlSourceError:
        return None
    items = document.value.get(RESOURCES_KEY) if isinstance(document.value, dict) else None
    if not isinstance(items, list):
        return None
    by_line: dict[int | None, int] = {}
    for index in range(len(items)):
        by_line.setdefault(document.line((RESOURCES_KEY, index)), index)
    return document, by_line


# --- Loading -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedConfig:
    environment: str | None
    resources: list[SourcedResource]
    sources: SourceMap


def environment_names(directory: str | Path) -> list[str]:
    """The environments `directory` defines (stems of `environments/*.yaml`), sorted."""
    return sorted(_overlay_files(Path(directory)))


def load_environment(directory: str | Path, env: str | None = None) -> list[SourcedResource]:
    """The resources of `directory` for `env` (the base alone when `env` is None)."""
    return load_config(directory, env).resources


def load_config(directory: str | Path, env: str | None = None) -> LoadedConfig:
    """Like `load_environment`, plus a SourceMap that locates values inside each resource.

    Raises ConfigError (every problem, each with file and line), or UnknownEnvironmentError.
    """
    root = Path(directory)
    if not root.is_dir():
        raise ConfigError([ConfigProblem(Location(str(directory)), None, "not a directory")])
    overlay_file = _overlay_file(root, env) if env is not None else None
    problems: list[ConfigProblem] = []
    items = _base_items(root, problems)
    variables: dict[str, tuple[Any, Location]] = {}
    if overlay_file is not None:
        items = _apply_overlay(overlay_file, items, variables, problems)
    loaded: list[SourcedResource] = []
    by_key: dict[tuple[str, str], _Item] = {}
    for item in items:
        if not _substitute(item, variables, env, problems):
            continue  # parsing a "${NAME}" left in place would only repeat the problem
        resource, found = parse_item(item.resource_type, item.body, item.locate)
        problems.extend(found)
        if resource is not None:
            loaded.append(resource)
            by_key.setdefault((resource.type_url, resource.name), item)
    problems.extend(loader.duplicates(loaded))
    if problems:
        raise ConfigError(problems)
    return LoadedConfig(env, loaded, SourceMap(by_key))


def parse_item(
    resource_type: resources.ResourceType,
    body: dict[str, Any],
    locate: Callable[[ValuePath], Location],
) -> tuple[SourcedResource | None, list[ConfigProblem]]:
    """Parse one resource's plain values (without "@type"), locating problems with `locate`.

    `locate` maps a value path inside the item to where it was written. This wraps the
    loader's per-item parser, which reads lines from a YamlDocument: a stand-in document
    hands out tokens, and each token is turned back into its real Location.
    """
    seen: list[Location] = []

    class _Tokens:
        def line(self, path: ValuePath) -> int:
            seen.append(locate(path[2:]))  # drop ("resources", index)
            return len(seen) - 1

    raw: list[ConfigProblem] = []
    resource = loader.parse_resource(_Tokens(), "", 0, resource_type, body, raw)  # type: ignore[arg-type]
    problems = [replace(p, location=seen[p.location.line or 0]) for p in raw]
    if resource is not None:
        resource = replace(resource, location=seen[resource.location.line or 0])
    return resource, problems


def _overlay_files(root: Path) -> dict[str, Path]:
    folder = root / ENVIRONMENTS_DIR
    if not folder.is_dir():
        return {}
    # Not only regular files: an overlay that cannot be read is refused when chosen, by reason.
    return {
        file.stem: file
        for file in sorted(folder.iterdir())
        if not file.is_dir()
        and file.suffix.lower() in CONFIG_SUFFIXES
        and not file.name.startswith(".")
        and _ENV_NAME.match(file.stem)
    }


def _overlay_file(root: Path, env: str) -> Path:
    files = _overlay_files(root)
    if env in files:
        return files[env]
    folder = root / ENVIRONMENTS_DIR
    known = ", ".join(sorted(files)) or f"none: {folder} holds no overlay files"
    message = f'unknown environment "{env}"; available: {known}'
    raise UnknownEnvironmentError([ConfigProblem(Location(str(folder)), None, message)])


def _base_items(root: Path, problems: list[ConfigProblem]) -> list[_Item]:
    files, refused = loader.config_files(root, skip=root / ENVIRONMENTS_DIR)
    problems.extend(refused)
    items: list[_Item] = []
    for file in files:
        document = _parse(file, problems)
        if document is not None:
            items.extend(_document_items(document, str(file), problems))
    return items


def _parse(file: Path, problems: list[ConfigProblem]) -> YamlDocument | None:
    try:
        return parse_file(file)
    except YamlSourceError as err:
        problems.extend(
            ConfigProblem(Location(str(file), p.line), None, p.message) for p in err.problems
        )
        return None


def _document_items(
    document: YamlDocument, file: str, problems: list[ConfigProblem]
) -> Iterator[_Item]:
    """The well-formed items of a `{resources: [...]}` document (others reported)."""
    for index, resource_type, body in loader.resource_items(document, file, problems):
        origin = _Origin(file, document, (RESOURCES_KEY, index))
        yield _Item(resource_type, body, {(): origin})


# --- Overlays ------------------------------------------------------------------------------


def _apply_overlay(
    file: Path,
    items: list[_Item],
    variables: dict[str, tuple[Any, Location]],
    problems: list[ConfigProblem],
) -> list[_Item]:
    document = _parse(file, problems)
    if document is None:
        return items
    display = str(file)

    def problem(path: ValuePath, message: str) -> None:
        problems.append(ConfigProblem(Location(display, document.line(path)), None, message))

    top = document.value
    if top is None:
        return items
    if not isinstance(top, dict):
        problem((), f"an overlay is a mapping of {', '.join(_OVERLAY_KEYS)}")
        return items
    for key in top:
        if key not in _OVERLAY_KEYS:
            problem((key,), f'unexpected key "{key}"; an overlay holds {", ".join(_OVERLAY_KEYS)}')
    if RESOURCES_KEY in top:
        only = {RESOURCES_KEY: top[RESOURCES_KEY]}
        extra = YamlDocument(only, document.key_lines)
        items = [*items, *_document_items(extra, display, problems)]
    patches = top.get("patches") or []
    if not isinstance(patches, list):
        problem(("patches",), "patches must be a list")
        patches = []
    for index, patch in enumerate(patches):
        origin = _Origin(display, document, ())
        items = _apply_patch(patch, ("patches", index), items, origin, problem)
    _read_variables(top.get("variables"), display, document, variables, problem)
    return items


def _read_variables(
    value: Any,
    file: str,
    document: YamlDocument,
    variables: dict[str, tuple[Any, Location]],
    problem: Callable[[ValuePath, str], None],
) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        problem(("variables",), "variables must be a mapping of NAME: value")
        return
    for name, variable in value.items():
        if not _VARIABLE_NAME.match(name):
            problem(("variables", name), f'bad variable name "{name}" (letters, digits, _)')
        elif variable is None:
            problem(("variables", name), f'variable "{name}" has no value')
        else:
            location = Location(file, document.line(("variables", name)))
            variables[name] = (variable, location)


def _apply_patch(
    patch: Any,
    path: ValuePath,
    items: list[_Item],
    overlay: _Origin,
    problem: Callable[[ValuePath, str], None],
) -> list[_Item]:
    if not isinstance(patch, dict):
        problem(path, f"a patch is a mapping of {', '.join(_PATCH_KEYS)}")
        return items
    for key in patch:
        if key not in _PATCH_KEYS:
            problem((*path, key), f'unexpected key "{key}"; a patch holds {", ".join(_PATCH_KEYS)}')
            return items
    kind = _patch_type(patch.get(TYPE_KEY))
    if kind is None:
        short = ", ".join(resources.BY_SHORT_NAME)
        problem((*path, TYPE_KEY), f'a patch needs "@type": one of {short} or a type URL')
        return items
    name = patch.get("name")
    if not isinstance(name, str) or not name:
        problem((*path, "name"), "a patch needs the name of the resource it changes")
        return items
    remove, merge = patch.get("remove"), patch.get("merge")
    if (remove is True) == (merge is not None) or remove not in (None, True):
        problem(path, 'a patch has either "merge: {...}" or "remove: true"')
        return items
    matches = [item for item in items if item.resource_type == kind and item.name == name]
    if not matches:
        problem((*path, "name"), f'no {kind.short_name} named "{name}" to patch')
        return items
    if remove:
        return [item for item in items if item not in matches]
    if not isinstance(merge, dict):
        problem((*path, "merge"), "merge must be a mapping (the fields to change)")
        return items
    for key in merge:
        if key in (TYPE_KEY, "name", "cluster_name", "clusterName"):
            problem((*path, "merge", key), f'a patch cannot change "{key}"')
            return items
    for item in matches:
        merge_origin = replace(overlay, doc_path=(*path, "merge"))
        _merge(item.body, merge, (), item.origins, merge_origin)
    return items


def _patch_type(value: Any) -> resources.ResourceType | None:
    if not isinstance(value, str):
        return None
    return resources.BY_SHORT_NAME.get(value) or resources.BY_URL.get(value)


def _merge(
    target: dict[str, Any],
    patch: dict[str, Any],
    path: ValuePath,
    origins: dict[ValuePath, _Origin],
    patch_origin: _Origin,
) -> None:
    """RFC 7386 merge of `patch` into `target`, recording where each new subtree came from."""
    for key, value in patch.items():
        sub = (*path, key)
        for stale in [p for p in origins if p[: len(sub)] == sub]:
            if (
                value is None
                or not isinstance(value, dict)
                or not isinstance(target.get(key), dict)
            ):
                del origins[stale]
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value, sub, origins, patch_origin)
        else:
            target[key] = _without_nulls(copy.deepcopy(value))
            origins[sub] = replace(patch_origin, doc_path=(*patch_origin.doc_path, *sub))


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return value


# --- Variables -----------------------------------------------------------------------------


def _substitute(
    item: _Item,
    variables: dict[str, tuple[Any, Location]],
    env: str | None,
    problems: list[ConfigProblem],
) -> bool:
    """Substitute variables in the item's strings; False if any problem was found."""
    before = len(problems)

    def undefined(name: str, path: ValuePath) -> None:
        if env is None:
            why = "no environment given (--env)"
        else:
            why = f'environment "{env}" defines {", ".join(sorted(variables)) or "none"}'
        message = f"undefined variable ${{{name}}}: {why}"
        problems.append(ConfigProblem(item.locate(path), None, message))

    def value_of(text: str, path: ValuePath) -> Any:
        whole = _VARIABLE.fullmatch(text)
        if whole and not whole.group(1):
            name = whole.group(2)
            if name not in variables:
                undefined(name, path)
                return text
            return copy.deepcopy(variables[name][0])

        def one(match: re.Match[str]) -> str:
            if match.group(1):
                return "${" + match.group(2) + "}"
            name = match.group(2)
            if name not in variables:
                undefined(name, path)
                return match.group(0)
            value = variables[name][0]
            if isinstance(value, dict | list):
                location = variables[name][1]
                message = f"variable ${{{name}}} ({location}) is not text; use it as a whole value"
                problems.append(ConfigProblem(item.locate(path), None, message))
                return match.group(0)
            return _text(value)

        return _VARIABLE.sub(one, text)

    if _mentions_variables(item.body):
        item.body = _walk_strings(item.body, (), value_of)
    return len(problems) == before


def _mentions_variables(value: Any) -> bool:
    if isinstance(value, str):
        return "${" in value
    if isinstance(value, dict):
        value = value.values()
    elif not isinstance(value, list):
        return False
    return any(_mentions_variables(item) for item in value)


def _walk_strings(value: Any, path: ValuePath, change: Callable[[str, ValuePath], Any]) -> Any:
    if isinstance(value, str):
        return change(value, path) if "${" in value else value
    if isinstance(value, dict):
        return {k: _walk_strings(v, (*path, k), change) for k, v in value.items()}
    if isinstance(value, list):
        return [_walk_strings(v, (*path, i), change) for i, v in enumerate(value)]
    return value


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# --- Helpers -------------------------------------------------------------------------------


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)
