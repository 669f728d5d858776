"""Fill an Envoy message from plain values (a config file's dicts, lists and scalars) as
protobuf's json_format.ParseDict does, several times faster, for the forms a config is
written in.

json_format stays the judge. `fill` returns False as soon as it meets something json_format
would have to interpret, would refuse, or might read otherwise, and the loader then parses
the whole resource with json_format on a fresh message. It declines: null, bytes (base64),
32-bit floats, NaN and infinities, numbers or booleans written as text, enums written as
numbers, a value of the wrong kind, map keys that are not strings, a oneof set twice, a
field set under both its names (json_format takes that; the loader reports it), and an
unknown field. Messages of google.protobuf (a Duration written "5s", a Struct) are handed
to json_format itself; an Any's payload is filled like any message.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import cache
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from controlplane import resources

TYPE_KEY = "@type"
_ANY = "google.protobuf.Any"
_PROTOBUF_FILES = "google/protobuf/"
# json_format's own bound on nested messages (ParseDict's max_recursion_depth).
_MAX_DEPTH = 100
_INTEGERS = frozenset(
    {
        FieldDescriptor.CPPTYPE_INT32,
        FieldDescriptor.CPPTYPE_INT64,
        FieldDescriptor.CPPTYPE_UINT32,
        FieldDescriptor.CPPTYPE_UINT64,
    }
)


# What json_format raises when it refuses a value: its ParseError, and Python's own errors
# it lets out (protobuf refusing a value, OverflowError for an enum written .inf, upb's
# SystemError for a name holding an unpaired surrogate, as a JSON file's "\\ud800" can).
JSON_FORMAT_REFUSALS = (
    json_format.ParseError,
    ValueError,
    TypeError,
    AttributeError,
    OverflowError,
    SystemError,
)


class _Declined(Exception):
    """What json_format must read itself."""


def fill(message: Message, value: Any) -> bool:
    """Set `message`'s fields from `value` (a dict) as json_format.ParseDict would; False,
    with `message` left partly set, where json_format must read the value instead."""
    try:
        _fill(message, value, 1)
    except (_Declined, resources.UnknownTypeError, *JSON_FORMAT_REFUSALS):
        return False
    return True


def _fill(message: Message, value: Any, depth: int) -> None:
    if type(value) is not dict or depth > _MAX_DEPTH:
        raise _Declined
    fields = fields_by_key(message.DESCRIPTOR)
    names: set[str] = set()
    oneofs: set[str] = set()
    for key, item in value.items():
        field = fields.get(key)
        if field is None or item is None or field.name in names:
            raise _Declined
        names.add(field.name)
        oneof = field.containing_oneof
        if oneof is not None:
            if oneof.name in oneofs:
                raise _Declined
            oneofs.add(oneof.name)
        _set(message, field, item, depth)


def _set(message: Message, field: FieldDescriptor, item: Any, depth: int) -> None:
    message_type = field.message_type
    if message_type is not None and message_type.GetOptions().map_entry:
        _fill_map(getattr(message, field.name), message_type, item, depth)
    elif field.is_repeated:
        if type(item) is not list:
            raise _Declined
        container = getattr(message, field.name)
        if message_type is None:
            container.extend([_scalar(field, element) for element in item])
        else:
            for element in item:
                _fill_message(container.add(), element, depth)
    elif message_type is not None:
        sub = getattr(message, field.name)
        sub.SetInParent()
        _fill_message(sub, item, depth)
    else:
        setattr(message, field.name, _scalar(field, item))


def _fill_map(container: Any, entry: Descriptor, item: Any, depth: int) -> None:
    if type(item) is not dict or entry.fields_by_name["key"].type != FieldDescriptor.TYPE_STRING:
        raise _Declined
    value_field = entry.fields_by_name["value"]
    for key, element in item.items():
        if element is None:
            raise _Declined
        if value_field.message_type is None:
            container[key] = _scalar(value_field, element)
        else:
            _fill_message(container[key], element, depth)


def _fill_message(message: Message, item: Any, depth: int) -> None:
    """A message in a field of a message at `depth`, as json_format's ConvertMessage reads
    it. The messages json_format reads in their own way it reads here too, its depth bound
    carried over."""
    descriptor = message.DESCRIPTOR
    if descriptor.full_name == _ANY:
        _fill_any(message, item, depth)
    elif descriptor.file.name.startswith(_PROTOBUF_FILES):
        if item is None:
            raise _Declined
        json_format.ParseDict(item, message, max_recursion_depth=_MAX_DEPTH - depth)
    else:
        _fill(message, item, depth + 1)


def _fill_any(packed: Any, item: Any, depth: int) -> None:
    if type(item) is not dict:
        raise _Declined
    if not item:
        return  # json_format leaves an empty Any
    type_url = item.get(TYPE_KEY)
    if type(type_url) is not str:
        raise _Declined
    inner = resources.message_class_for(type_url)()
    if inner.DESCRIPTOR.file.name.startswith(_PROTOBUF_FILES):
        # {"@type": ..., "value": ...}: json_format's own form for these payloads
        json_format.ParseDict(item, packed, max_recursion_depth=_MAX_DEPTH - depth)
        return
    _fill(inner, {k: v for k, v in item.items() if k != TYPE_KEY}, depth + 1)
    packed.value = inner.SerializeToString()
    packed.type_url = type_url


def _scalar(field: FieldDescriptor, value: Any) -> Any:
    kind = field.cpp_type
    if kind == FieldDescriptor.CPPTYPE_STRING:
        if field.type == FieldDescriptor.TYPE_BYTES or type(value) is not str:
            raise _Declined
        return value
    if kind in _INTEGERS:
        if type(value) is not int:
            raise _Declined
        return value
    if kind == FieldDescriptor.CPPTYPE_BOOL:
        if type(value) is not bool:
            raise _Declined
        return value
    if kind == FieldDescriptor.CPPTYPE_DOUBLE:
        if type(value) is int or (type(value) is float and math.isfinite(value)):
            return float(value)
        raise _Declined
    if kind == FieldDescriptor.CPPTYPE_ENUM and type(value) is str:
        named = field.enum_type.values_by_name.get(value)
        if named is not None:
            return named.number
    raise _Declined  # an enum by number or unknown name, a 32-bit float


@cache
def fields_by_key(descriptor: Descriptor) -> Mapping[str, FieldDescriptor]:
    """Fields by both names json_format accepts, proto name and JSON (camelCase) name;
    where one field's JSON name is another's proto name, json_format's choice: the JSON name."""
    return {**descriptor.fields_by_name, **{f.json_name: f for f in descriptor.fields}}
