"""Publishing input: resources packed as Any (from xdsctl) -> a validated Snapshot.

Nothing here stores or serves; the rollout controller decides where the snapshot goes.
What any admin client publishes meets the same bar as `xdsctl publish`: no dangling
reference (Snapshot), no violation of Envoy's field rules (config.field_rules), and no
error-level lint finding (config.lint.refusals). xdsctl leaves these checks to the server,
and runs them itself only to locate in its files what the server refused.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from google.protobuf import any_pb2
from google.protobuf.message import Message

from controlplane import resources
from controlplane.config.field_rules import violations
from controlplane.config.lint import check_publishable
from controlplane.snapshot import Snapshot

REQUEST_LOCATION = "publish request"

# Field rules depend on one resource alone: a resource (type URL, content digest) that passed
# them once passes again, so a publish checks only what is new since. Up to this many are
# remembered (about 150 bytes each); past it the set starts again, which costs time only.
FIELD_RULES_PASSED_LIMIT = 50_000
_field_rules_passed: set[tuple[str, str]] = set()


class FieldRuleRefusal(ValueError):
    """Violations of Envoy's field rules, which Envoy would NACK: not to be published."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(
            f"{len(problems)} field rule violation(s), which Envoy would NACK: "
            + "; ".join(problems)
        )


async def build_snapshot(packed: Iterable[any_pb2.Any]) -> Snapshot:
    """Raises UnknownTypeError, DecodeError, DuplicateResourceError, ConsistencyError,
    FieldRuleRefusal or LintRefusal."""
    items = [(item.type_url, resources.parse(item.type_url, item.value)) for item in packed]
    # Canonicalizing, serializing and linting a large config takes a while: keep the loop
    # serving.
    return await asyncio.to_thread(_checked, items)


def _checked(items: list[tuple[str, Message]]) -> Snapshot:
    snapshot = Snapshot.from_messages(items)
    _check_field_rules(items, snapshot)
    check_publishable(items, REQUEST_LOCATION)
    return snapshot


def _check_field_rules(items: list[tuple[str, Message]], snapshot: Snapshot) -> None:
    problems: list[str] = []
    passed: list[tuple[str, str]] = []
    for type_url, message in items:
        name = resources.resource_name(message)
        key = (type_url, snapshot.resources(type_url)[name].version)
        if key in _field_rules_passed:
            continue
        found = violations(message)
        if not found:
            passed.append(key)
        kind = resources.resource_type(type_url).short_name
        problems += [f"{kind} {name}: {v.field_path}: {v.message}" for v in found]
    if problems:
        raise FieldRuleRefusal(problems)
    if len(_field_rules_passed) + len(passed) > FIELD_RULES_PASSED_LIMIT:
        _field_rules_passed.clear()
    _field_rules_passed.update(passed)
