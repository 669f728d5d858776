"""What changes between two snapshots, per resource and per field, readable by a person.

`diff_snapshots(old, new)` compares resources by type (in ADS order) and name: added,
removed, or changed. A changed resource lists its changed fields by path, comparing the
JSON form of the messages with every `typed_config` Any expanded, so paths go inside them:

    ~ listener edge_http
        filter_chains[0].filters[0].typed_config.stat_prefix: "edge" -> "edge_http"
        metadata.filter_metadata["xdscp.lint"]: (unset) -> {"suppress": ...}

Lists are aligned item by item (difflib), so inserting one route shows one added item
rather than every later route as changed. The output is deterministic: the same two
snapshots always give the same text. Pure: no I/O.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format

from controlplane import resources
from controlplane.snapshot import Snapshot

ADDED, REMOVED, CHANGED = "added", "removed", "changed"
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class _Unset:
    def __repr__(self) -> str:
        return "(unset)"


UNSET: Any = _Unset()


@dataclass(frozen=True)
class FieldChange:
    path: str  # e.g. "common_http_protocol_options.idle_timeout", "routes[2]"
    old: Any  # UNSET when the field was not there
    new: Any  # UNSET when the field is gone


@dataclass(frozen=True)
class ResourceDiff:
    type_url: str
    name: str
    kind: str  # ADDED, REMOVED or CHANGED
    changes: tuple[FieldChange, ...] = ()

    @property
    def short_type(self) -> str:
        return resources.resource_type(self.type_url).short_name


def diff_snapshots(old: Snapshot | None, new: Snapshot) -> list[ResourceDiff]:
    """Every resource that differs, in ADS type order then by name. None is an empty `old`."""
    diffs: list[ResourceDiff] = []
    for resource_type in resources.ADS_ORDER:
        url = resource_type.type_url
        before = old.resources(url) if old is not None else {}
        after = new.resources(url)
        for name in sorted(set(before) | set(after)):
            if name not in before:
                diffs.append(ResourceDiff(url, name, ADDED))
            elif name not in after:
                diffs.append(ResourceDiff(url, name, REMOVED))
            elif before[name].body != after[name].body:
                resources.load_descriptors_within((before[name].body, after[name].body))
                changes = tuple(_changes(_as_dict(before[name]), _as_dict(after[name]), ""))
                diffs.append(ResourceDiff(url, name, CHANGED, changes))
    return diffs


def render_diff(diffs: list[ResourceDiff]) -> str:
    """The diff as text: one line per resource, then its changed fields indented."""
    if not diffs:
        return "no changes\n"
    lines: list[str] = []
    for diff in diffs:
        if diff.kind == ADDED:
            lines.append(f"+ {diff.short_type} {diff.name} (added)")
        elif diff.kind == REMOVED:
            lines.append(f"- {diff.short_type} {diff.name} (removed)")
        else:
            lines.append(f"~ {diff.short_type} {diff.name}")
            lines.extend(
                f"    {change.path}: {_show(change.old)} -> {_show(change.new)}"
                for change in diff.changes
            )
    counts = {kind: sum(1 for d in diffs if d.kind == kind) for kind in (ADDED, REMOVED, CHANGED)}
    lines.append(", ".join(f"{n} {kind}" for kind, n in counts.items()))
    return "\n".join(lines) + "\n"


def _as_dict(resource: Any) -> dict[str, Any]:
    """The JSON form, with Anys expanded (json_format does so with "@type" and the fields)."""
    fields = json_format.MessageToDict(resource.message(), preserving_proto_field_name=True)
    return json.loads(json.dumps(fields))  # plain dicts, deterministic key handling


def _changes(old: Any, new: Any, path: str) -> Iterator[FieldChange]:
    if old == new:
        return
    if isinstance(old, dict) and isinstance(new, dict):
        if old.get("@type") != new.get("@type"):  # a different message: no field-wise diff
            yield FieldChange(path, old, new)
            return
        for key in sorted(set(old) | set(new)):
            sub = _join(path, key)
            if key not in old:
                yield FieldChange(sub, UNSET, new[key])
            elif key not in new:
                yield FieldChange(sub, old[key], UNSET)
            else:
                yield from _changes(old[key], new[key], sub)
    elif isinstance(old, list) and isinstance(new, list):
        yield from _list_changes(old, new, path)
    else:
        yield FieldChange(path, old, new)


def _list_changes(old: list[Any], new: list[Any], path: str) -> Iterator[FieldChange]:
    keys_old = [json.dumps(item, sort_keys=True) for item in old]
    keys_new = [json.dumps(item, sort_keys=True) for item in new]
    matcher = difflib.SequenceMatcher(a=keys_old, b=keys_new, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        paired = min(i2 - i1, j2 - j1)
        for offset in range(paired):
            yield from _changes(old[i1 + offset], new[j1 + offset], f"{path}[{j1 + offset}]")
        for index in range(i1 + paired, i2):
            yield FieldChange(f"{path}[{index}]", old[index], UNSET)
        for index in range(j1 + paired, j2):
            yield FieldChange(f"{path}[{index}]", UNSET, new[index])


def _join(path: str, key: str) -> str:
    if _IDENTIFIER.match(key) or key == "@type":
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key)}]"


def _show(value: Any) -> str:
    if value is UNSET:
        return "(unset)"
    return json.dumps(value, sort_keys=True, separators=(", ", ": "), ensure_ascii=False)
