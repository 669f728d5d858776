"""Read a YAML (or JSON) config file into plain Python values that remember their lines.

The job: turn text into dicts, lists and scalars, and keep a map from each value's path
(`("resources", 0, "name")`) to the 1-based line it was written on, so a later stage can
point an operator at the exact line of a problem. Stricter than `yaml.safe_load`: a
duplicate mapping key is an error (naming both lines), as is a tag we do not understand.
Aliases are measured before anything is built, so an alias bomb is refused at once, and so
is nesting deeper than `inputs.MAX_DEPTH`. Nothing here knows about protobuf or Envoy.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from controlplane.config import inputs

# The C loader is several times faster; the pure-Python one composes the same nodes.
_LOADER: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_MERGE_TAG = "tag:yaml.org,2002:merge"
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_STR_TAG = "tag:yaml.org,2002:str"

_SURROGATE = re.compile("[\ud800-\udfff]")

ValuePath = tuple[str | int, ...]


@dataclass(frozen=True)
class SourceProblem:
    line: int | None  # 1-based
    message: str


class YamlSourceError(Exception):
    """The file could not be read into values; one entry per problem found."""

    def __init__(self, problems: list[SourceProblem]) -> None:
        super().__init__("\n".join(p.message for p in problems))
        self.problems = problems


@dataclass(frozen=True)
class YamlDocument:
    """A file's plain value plus the line of every key and item in it."""

    value: Any
    # Path of a mapping entry -> line of its key; path of a list item -> line of the item;
    # the root's path () -> the line the document's value starts on.
    key_lines: Mapping[ValuePath, int] = field(default_factory=dict)

    def line(self, path: ValuePath) -> int | None:
        """Line of the deepest node reachable on `path` (a key's own line for mapping entries)."""
        for end in range(len(path), -1, -1):
            line = self.key_lines.get(path[:end])
            if line is not None:
                return line
        return None


def parse_file(path: Path) -> YamlDocument:
    """Parse one file; `.json` files fall back to the json module if YAML rejects them."""
    try:
        text = inputs.read_text(path)
    except inputs.UnreadableError as err:
        raise YamlSourceError([SourceProblem(err.problem.line, err.problem.message)]) from None
    return parse_text(text, is_json=path.suffix.lower() == ".json")


def parse_text(text: str, *, is_json: bool = False) -> YamlDocument:
    try:
        root = yaml.compose(text, Loader=_LOADER)
    except yaml.YAMLError as err:
        if is_json:
            return _parse_json(text)
        raise YamlSourceError([_yaml_problem(err)]) from None
    if root is None:
        return YamlDocument(None)
    if "&" in text:  # an anchor, so maybe aliases: size what they add before building
        _Measure().check(root)
    return _Builder().document(root)


def _yaml_problem(err: yaml.YAMLError) -> SourceProblem:
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        parts = [p for p in (err.context, err.problem) if p]
        line = mark.line + 1 if mark is not None else None
        return SourceProblem(line, "invalid YAML: " + "; ".join(parts or ["parse error"]))
    return SourceProblem(None, f"invalid YAML: {err}")


def _parse_json(text: str) -> YamlDocument:
    """JSON that YAML would not take (tabs, say): values without lines, duplicate keys refused."""
    duplicates: list[str] = []

    def pairs_to_dict(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                duplicates.append(key)
            result[key] = value
        return result

    try:
        value = json.loads(text, object_pairs_hook=pairs_to_dict)
    except json.JSONDecodeError as err:
        raise YamlSourceError([SourceProblem(err.lineno, f"invalid JSON: {err.msg}")]) from None
    except RecursionError:
        raise YamlSourceError([SourceProblem(None, _too_deep())]) from None
    if _nests_too_deep(value):
        raise YamlSourceError([SourceProblem(None, _too_deep())])
    if duplicates:
        problems = [SourceProblem(None, f'duplicate key "{key}"') for key in duplicates]
        raise YamlSourceError(problems)
    return YamlDocument(value)


class _Measure:
    """Sizes the document as built, before building: what aliases add, and how deep it nests.

    Each mapping and list node is sized once (aliases share nodes), so this costs one step
    per node written, however far the aliases would expand.
    """

    def __init__(self) -> None:
        self._sizes: dict[int, tuple[int, int]] = {}  # node id -> (values, depth) as built
        self._alias_values = 0

    def check(self, root: Node) -> None:
        self._size(root, 0)

    def _size(self, node: Node, depth: int) -> tuple[int, int]:
        if depth > inputs.MAX_DEPTH:
            raise YamlSourceError([SourceProblem(_line(node), _too_deep())])
        if isinstance(node, ScalarNode):
            return 1, 0
        known = self._sizes.get(id(node))
        if known is not None:  # an alias (or a recursive one, sized (0, 0) while in progress)
            self._count_alias(node, known, depth)
            return known
        self._sizes[id(node)] = (0, 0)
        children = node.value if isinstance(node, SequenceNode) else [v for _, v in node.value]
        values, deepest = 1, 0
        for child in children:
            size, child_depth = self._size(child, depth + 1)
            values += size
            deepest = max(deepest, child_depth + 1)
        self._sizes[id(node)] = (values, deepest)
        return values, deepest

    def _count_alias(self, node: Node, known: tuple[int, int], depth: int) -> None:
        values, deepest = known
        if depth + deepest > inputs.MAX_DEPTH:
            raise YamlSourceError([SourceProblem(_line(node), _too_deep())])
        self._alias_values += values
        if self._alias_values > inputs.MAX_ALIAS_VALUES:
            limit = inputs.MAX_ALIAS_VALUES
            message = f"aliases add over {limit:,} values, the limit per file (alias bomb?)"
            raise YamlSourceError([SourceProblem(_line(node), message)])


class _Builder:
    """Builds plain values from composed nodes, recording lines and collecting problems."""

    def __init__(self) -> None:
        self.key_lines: dict[ValuePath, int] = {}
        self.problems: list[SourceProblem] = []
        self._scalars = SafeConstructor()
        self._active: set[int] = set()  # ids of nodes being built: a repeat is a recursive alias

    def document(self, root: Node) -> YamlDocument:
        self.key_lines[()] = _line(root)
        value = self.build(root, ())
        if self.problems:
            raise YamlSourceError(self.problems)
        return YamlDocument(value, self.key_lines)

    def build(self, node: Node, path: ValuePath) -> Any:
        """The value of `node`, whose line the caller has recorded at `path`."""
        if len(path) > inputs.MAX_DEPTH:  # measured already if the file has aliases
            raise YamlSourceError([SourceProblem(_line(node), _too_deep())])
        if isinstance(node, ScalarNode):  # a scalar holds nothing, so it cannot recurse
            return self._scalar(node)
        if id(node) in self._active:
            self.problems.append(SourceProblem(_line(node), "recursive alias"))
            return None
        if node.tag not in (_MAP_TAG, _SEQ_TAG):
            self.problems.append(SourceProblem(_line(node), f"unsupported YAML tag {node.tag}"))
            return None
        self._active.add(id(node))
        try:
            if isinstance(node, MappingNode):
                return self._mapping(node, path)
            return self._sequence(node, path)
        finally:
            self._active.discard(id(node))

    def _sequence(self, node: SequenceNode, path: ValuePath) -> list[Any]:
        items = []
        for index, child in enumerate(node.value):
            child_path = (*path, index)
            self.key_lines[child_path] = _line(child)
            items.append(self.build(child, child_path))
        return items

    def _mapping(self, node: MappingNode, path: ValuePath) -> dict[str, Any]:
        result: dict[str, Any] = {}
        first_line: dict[str, int] = {}
        merges: list[Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merges.append(value_node)
                continue
            key = self._key(key_node)
            if key is None:
                continue
            line = _line(key_node)
            if key in first_line:
                message = f'duplicate key "{key}" (first on line {first_line[key]})'
                self.problems.append(SourceProblem(line, message))
                continue
            first_line[key] = line
            child_path = (*path, key)
            self.key_lines[child_path] = line
            result[key] = self.build(value_node, child_path)
        for merged in merges:
            self._merge(merged, result, path)
        return result

    def _merge(self, node: Node, result: dict[str, Any], path: ValuePath) -> None:
        """`<<: *base` (or a list of them): keys not already set come from the merged maps."""
        sources = node.value if isinstance(node, SequenceNode) else [node]
        for source in sources:
            if not isinstance(source, MappingNode):
                self.problems.append(SourceProblem(_line(source), "merge (<<) needs a mapping"))
                continue
            for key_node, value_node in source.value:
                key = self._key(key_node)
                if key is None or key in result or key_node.tag == _MERGE_TAG:
                    continue
                self.key_lines[(*path, key)] = _line(key_node)
                result[key] = self.build(value_node, (*path, key))

    def _key(self, node: Node) -> str | None:
        """Mapping keys are kept as the text written (JSON keys are strings)."""
        if not isinstance(node, ScalarNode):
            self.problems.append(SourceProblem(_line(node), "mapping keys must be plain scalars"))
            return None
        return str(node.value)

    def _scalar(self, node: ScalarNode) -> Any:
        if node.tag == _TIMESTAMP_TAG:
            return node.value  # a date-looking string stays a string
        if node.tag == _STR_TAG:
            value = node.value  # what SafeConstructor makes of it, without its bookkeeping
        else:
            try:
                value = self._scalars.construct_object(node)
            except yaml.constructor.ConstructorError as err:
                self.problems.append(SourceProblem(_line(node), f"unsupported YAML: {err.problem}"))
                return None
        if isinstance(value, str) and _SURROGATE.search(value):
            # "\ud83d\ude00" escapes come out as two halves; join them as JSON would.
            value = value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return value


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def _nests_too_deep(value: Any, depth: int = 0) -> bool:
    if depth > inputs.MAX_DEPTH:
        return True
    if isinstance(value, dict):
        value = list(value.values())
    return isinstance(value, list) and any(_nests_too_deep(item, depth + 1) for item in value)


def _too_deep() -> str:
    return f"nested deeper than {inputs.MAX_DEPTH} levels, the limit per file"
