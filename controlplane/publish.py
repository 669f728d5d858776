"""Publishing input: resources packed as Any (from xdsctl) -> a validated Snapshot.

Nothing here stores or serves; the rollout controller decides where the snapshot goes.
What any admin client publishes meets the same bar as `xdsctl publish`: no dangling
reference (Snapshot), no violation of Envoy's field rules (config.field_rules), and no
error-level lint finding (config.lint.refusals). xdsctl leaves these checks to the server,
and runs them itself only to locate in its files what the server refused.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable

from google.protobuf import any_pb2
from google.protobuf.message import Message

from controlplane import resources
from controlplane.caches import ByteBoundedCache
from controlplane.config.field_rules import violations
from controlplane.config.lint import check_publishable
from controlplane.snapshot import Resource, Snapshot

REQUEST_LOCATION = "publish request"

# Field rules depend on one resource alone: a resource (type URL, content digest) that passed
# them once passes again, so a publish checks only what is new since. Up to this many are
# remembered (about 150 bytes each); past it the set starts again, which costs time only.
FIELD_RULES_PASSED_LIMIT = 50_000
_field_rules_passed: set[tuple[str, str]] = set()

# One publish is checked at a time (each in a worker thread): what the checks keep for the
# next (prepared resources, field rules passed) is not shared between threads.
_CHECKING = threading.Lock()

# Resources prepared from what publishes sent, by (type URL, bytes sent): see _prepared.
PREPARED_BUDGET_BYTES = 32 << 20
# An entry holds the bytes sent (its key), the canonical bytes, and once served, the two
# response entries built from them; plus a Resource and its name.
PREPARED_BYTES_PER_BYTE = 4
PREPARED_OVERHEAD_BYTES = 500
_PREPARED: ByteBoundedCache[tuple[str, bytes], Resource] = ByteBoundedCache(
    "publish_prepared", PREPARED_BUDGET_BYTES
)


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
    items = [(item.type_url, item.value) for item in packed]
    # Canonicalizing, serializing and linting a large config takes a while: keep the loop
    # serving.
    return await asyncio.to_thread(_checked, items)


def _checked(packed: list[tuple[str, bytes]]) -> Snapshot:
    with _CHECKING:
        prepared = _prepared(packed)
        snapshot = Snapshot.from_resources(prepared)
        checked = [(r, r.message()) for r in prepared]
        _check_field_rules(checked)
        check_publishable([(r.type_url, m) for r, m in checked], REQUEST_LOCATION)
        return snapshot


def _prepared(packed: list[tuple[str, bytes]]) -> list[Resource]:
    """The resources that resources' bytes, as a client sent them, make: canonicalized and
    serialized as Snapshot.from_messages does. The same bytes always make the same resource,
    so the ones recent publishes sent are kept (by type URL and bytes), and a publish
    prepares only what is new since; a kept resource also keeps what it worked out once (its
    references). The new ones are all parsed before any is canonicalized, as they were before
    any was kept: a request with several bad resources is refused for the same one."""
    kept = [_PREPARED.get(item) for item in packed]
    parsed = {
        index: resources.parse(type_url, body)
        for index, ((type_url, body), resource) in enumerate(zip(packed, kept, strict=True))
        if resource is None
    }
    for message in parsed.values():
        resources.canonicalize(message)
    made = {index: _made(packed[index], message) for index, message in parsed.items()}
    return [made[index] if resource is None else resource for index, resource in enumerate(kept)]


def _made(sent: tuple[str, bytes], message: Message) -> Resource:
    type_url, body = sent
    resource = Resource(type_url, resources.resource_name(message), resources.serialize(message))
    return _PREPARED.put(
        sent, resource, PREPARED_BYTES_PER_BYTE * len(body) + PREPARED_OVERHEAD_BYTES
    )


def _check_field_rules(checked: list[tuple[Resource, Message]]) -> None:
    problems: list[str] = []
    passed: list[tuple[str, str]] = []
    for resource, message in checked:
        key = (resource.type_url, resource.version)
        if key in _field_rules_passed:
            continue
        found = violations(message)
        if not found:
            passed.append(key)
        kind = resources.resource_type(resource.type_url).short_name
        problems += [f"{kind} {resource.name}: {v.field_path}: {v.message}" for v in found]
    if problems:
        raise FieldRuleRefusal(problems)
    if len(_field_rules_passed) + len(passed) > FIELD_RULES_PASSED_LIMIT:
        _field_rules_passed.clear()
    _field_rules_passed.update(passed)
