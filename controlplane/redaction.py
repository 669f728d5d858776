"""Redaction: key material stays out of what xdscp shows and logs.

`redact(message)` replaces, in place, every value Envoy's own protos mark sensitive
(`udpa.annotations.sensitive`: a TLS private key, its password, a PKCS#12 bundle, a private
key provider's config, generic secrets, session ticket keys, a gRPC channel's private key,
...), wherever it sits in a resource: inside `Any`s (a listener's inline
DownstreamTlsContext) and TypedStructs too. These are the fields Envoy redacts from its own
/config_dump, so the rule follows Envoy's protos as they grow rather than a list kept here.

What replaces a value: a sensitive DataSource held inline (`inline_bytes`, `inline_string`)
becomes `inline_string: "[redacted]"`; one that names a `filename` or an
`environment_variable` is kept, since it says where the secret is, not what it is. Any
other sensitive string or bytes becomes "[redacted]"; map keys are names and are kept.
Certificates, CAs and everything else that is public stay as they are.

`redact_pem_keys(text)` takes PEM private key blocks out of free text (log lines, Envoy's
NACK texts), including a block cut short by clipping.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from functools import cache
from typing import Any

from google.protobuf import descriptor, json_format, wrappers_pb2
from google.protobuf.message import Message
from udpa.annotations import sensitive_pb2

from controlplane import resources
from controlplane.resources import UnknownTypeError
from controlplane.snapshot import Resource, Snapshot

REDACTED = "[redacted]"
REDACTED_PRIVATE_KEY = "[redacted private key]"

# What a redacted value becomes, given its bytes: REDACTED unless told otherwise.
Mask = Callable[[bytes], str]

_ANY = "google.protobuf.Any"
_DATA_SOURCE = "envoy.config.core.v3.DataSource"
_INLINE = ("inline_bytes", "inline_string")
_TYPED_STRUCTS = ("xds.type.v3.TypedStruct", "udpa.type.v1.TypedStruct")
_TEXT = (descriptor.FieldDescriptor.TYPE_STRING, descriptor.FieldDescriptor.TYPE_BYTES)
_PEM_PRIVATE_KEY = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|\Z)", re.DOTALL
)


def constant_mask(value: bytes) -> str:
    return REDACTED


def fingerprint_mask() -> Mask:
    """A mask that tells values apart without showing them: within this process equal values
    get equal marks ("[redacted 1f2e3d4c]"), so a diff can say a key changed. The key is
    random and never leaves the process, so a mark reveals nothing about its value."""
    key = secrets.token_bytes(32)
    return lambda value: f"[redacted {hmac.new(key, value, hashlib.sha256).hexdigest()[:8]}]"


def redact(message: Message, mask: Mask = constant_mask) -> bool:
    """Replace the key material in `message`, in place; True when it held any. Every Any is
    looked inside (`resources.message_class_for` loads the types it meets)."""
    return _walk(message, False, mask)


def redact_body(type_url: str, body: bytes, mask: Mask = constant_mask) -> bytes:
    """A serialized resource with its key material replaced; `body` itself when it held none."""
    message = resources.parse(type_url, body)
    return resources.serialize(message) if redact(message, mask) else body


def redact_resource(resource: Resource, mask: Mask = constant_mask) -> Resource:
    """`resource` itself when it holds no key material, else a redacted copy."""
    body = redact_body(resource.type_url, resource.body, mask)
    return resource if body is resource.body else Resource(resource.type_url, resource.name, body)


def redact_snapshot(snapshot: Snapshot, mask: Mask = constant_mask) -> Snapshot:
    """`snapshot` itself when it holds no key material, else a copy with its resources
    redacted (whose version is not the original's)."""
    shown = [redact_resource(r, mask) for r in snapshot.all_resources()]
    if all(a is b for a, b in zip(shown, snapshot.all_resources(), strict=True)):
        return snapshot
    return Snapshot.from_serialized((r.type_url, r.name, r.body) for r in shown)


def redact_differences(
    old: Snapshot | None, new: Snapshot, mask: Mask = constant_mask
) -> tuple[Snapshot | None, Snapshot]:
    """What a diff of `old` and `new` shows: the resources in which they differ, each side
    redacted. What both hold alike shows in no diff, so it is left out, not redacted (with
    one mask, equal resources would stay equal)."""
    if old is None:
        return None, redact_snapshot(new, mask)
    return (
        redact_snapshot(_differing(old, new), mask),
        redact_snapshot(_differing(new, old), mask),
    )


def _differing(these: Snapshot, others: Snapshot) -> Snapshot:
    """The resources of `these` that `others` lacks or holds with other bytes."""
    return Snapshot.from_serialized(
        (r.type_url, r.name, r.body)
        for r in these.all_resources()
        if (other := others.resources(r.type_url).get(r.name)) is None or other.body != r.body
    )


def redact_pem_keys(text: str) -> str:
    """`text` with every PEM private key block (or what is left of one) replaced."""
    if "PRIVATE KEY-----" not in text:
        return text
    return _PEM_PRIVATE_KEY.sub(REDACTED_PRIVATE_KEY, text)


def _walk(message: Message, sensitive: bool, mask: Mask) -> bool:
    """`sensitive`: an enclosing field is marked sensitive, so every value below is secret."""
    name = message.DESCRIPTOR.full_name
    if name == _ANY:
        return _walk_any(message, sensitive, mask)
    if name in _TYPED_STRUCTS:
        return _walk_typed_struct(message, sensitive, mask)
    if sensitive and name == _DATA_SOURCE:
        kind = message.WhichOneof("specifier")
        if kind not in _INLINE:
            return False
        value = getattr(message, kind)
        message.inline_string = mask(value if isinstance(value, bytes) else value.encode())
        return True
    held = False
    for field, value in message.ListFields():
        inner = sensitive or _is_sensitive(field)
        if field.type == field.TYPE_MESSAGE:
            if not (inner or _may_hold_secrets(field.message_type)):
                continue
            if field.message_type.GetOptions().map_entry:
                held |= _walk_map(field.message_type, value, inner, mask)
            else:
                for sub in value if field.is_repeated else (value,):
                    held |= _walk(sub, inner, mask)
        elif inner and field.type in _TEXT:
            masked = [_masked(item, mask) for item in (value if field.is_repeated else [value])]
            if field.is_repeated:
                del value[:]
                value.extend(masked)
            else:
                setattr(message, field.name, masked[0])
            held = True
    return held


def _walk_map(entry: descriptor.Descriptor, values: Any, sensitive: bool, mask: Mask) -> bool:
    """Map values only: the keys are names."""
    value_field = entry.fields_by_name["value"]
    if value_field.type == value_field.TYPE_MESSAGE:
        held = False
        for sub in values.values():
            held |= _walk(sub, sensitive, mask)
        return held
    if not (sensitive and value_field.type in _TEXT) or not values:
        return False
    for key in list(values):
        values[key] = _masked(values[key], mask)
    return True


def _walk_any(packed: Any, sensitive: bool, mask: Mask) -> bool:
    try:
        inner = resources.unpack_any(packed)
    except UnknownTypeError:
        if not sensitive:
            return False  # a stored snapshot has none: publish refuses types it cannot read
        packed.Pack(wrappers_pb2.StringValue(value=mask(packed.value)))  # nothing to look inside
        return True
    if not (sensitive or _may_hold_secrets(inner.DESCRIPTOR)) or not _walk(inner, sensitive, mask):
        return False
    packed.Pack(inner, type_url_prefix=packed.type_url.rsplit("/", 1)[0], deterministic=True)
    return True


def _walk_typed_struct(typed: Any, sensitive: bool, mask: Mask) -> bool:
    """A TypedStruct is a message written as a Struct: read it as its type to find the secrets."""
    try:
        message = resources.message_class_for(typed.type_url)()
        json_format.ParseDict(json_format.MessageToDict(typed.value), message)
    except (UnknownTypeError, json_format.ParseError):
        return _walk(typed.value, sensitive, mask)
    if not _walk(message, sensitive, mask):
        return False
    typed.value.Clear()
    typed.value.update(json_format.MessageToDict(message, preserving_proto_field_name=True))
    return True


def _masked(value: str | bytes, mask: Mask) -> str | bytes:
    if isinstance(value, bytes):
        return mask(value).encode()
    return mask(value.encode())


@cache
def _is_sensitive(field: descriptor.FieldDescriptor) -> bool:
    return field.GetOptions().Extensions[sensitive_pb2.sensitive]


def _may_hold_secrets(message_type: descriptor.Descriptor) -> bool:
    """Whether any message of this type can hold key material: a sensitive field, or an Any
    (which can hold anything), somewhere below it."""
    return resources.may_hold(message_type, _holds_secrets)


def _holds_secrets(message_type: descriptor.Descriptor) -> bool:
    return message_type.full_name in (_ANY, *_TYPED_STRUCTS) or any(
        _is_sensitive(field) for field in message_type.fields
    )
