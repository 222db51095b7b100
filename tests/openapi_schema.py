"""The subset of JSON Schema (2020-12) handlers/openapi.py uses: a validator and generators.

Both refuse any keyword outside the subset (:data:`KEYWORDS`), so a document that starts using
one fails loudly instead of being checked or fuzzed wrongly. The validator can treat objects
as closed (``closed=True``): a property the schema does not name is an error, so a response
field the document does not list is caught even where the schema leaves objects open.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Mapping
from typing import Any

from hypothesis import strategies as st

__all__ = [
    "KEYWORDS",
    "NASTY_STRINGS",
    "UnsupportedSchema",
    "any_json",
    "invalid_values",
    "resolve",
    "schema_keywords",
    "valid_values",
    "validate",
]

#: Keywords that only annotate.
ANNOTATIONS = frozenset({"title", "description", "default", "examples"})
#: Keywords the validator and the generators implement.
ASSERTIONS = frozenset(
    {
        "$ref",
        "type",
        "anyOf",
        "enum",
        "const",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "minItems",
        "maxItems",
        "minLength",
        "maxLength",
        "pattern",
        "minimum",
        "maximum",
        "format",
    }
)
KEYWORDS = ANNOTATIONS | ASSERTIONS
FORMATS = frozenset({"uuid", "date-time"})

_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


class UnsupportedSchema(Exception):
    """The schema uses a keyword, type or format outside the subset."""


def resolve(doc: Mapping[str, Any], node: Mapping[str, Any]) -> Any:
    """``node``, or what its local ``$ref`` (``#/a/b``) points at, followed to the end."""
    seen = 0
    while "$ref" in node:
        ref = node["$ref"]
        if not isinstance(ref, str) or not ref.startswith("#/"):
            raise UnsupportedSchema(f"only local references: {ref!r}")
        target: Any = doc
        for part in ref[2:].split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        node = target
        seen += 1
        if seen > 50:
            raise UnsupportedSchema(f"reference loop at {ref!r}")
    return node


def schema_keywords(schema: Any) -> set[str]:
    """Every keyword used in ``schema`` and its subschemas (not following ``$ref``)."""
    found: set[str] = set()
    if not isinstance(schema, dict):
        return found
    found |= set(schema)
    for key in ("anyOf",):
        for sub in schema.get(key, ()):
            found |= schema_keywords(sub)
    for sub in schema.get("properties", {}).values():
        found |= schema_keywords(sub)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            found |= schema_keywords(schema[key])
    return found


def _check_keywords(schema: Mapping[str, Any]) -> None:
    unknown = set(schema) - KEYWORDS
    if unknown:
        raise UnsupportedSchema(f"keywords outside the subset: {sorted(unknown)}")
    if "format" in schema and schema["format"] not in FORMATS:
        raise UnsupportedSchema(f"format {schema['format']!r}")


def _is_type(value: Any, type_: str) -> bool:
    if type_ == "null":
        return value is None
    if type_ == "boolean":
        return isinstance(value, bool)
    if type_ == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer()
        )
    if type_ == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if type_ == "string":
        return isinstance(value, str)
    if type_ == "array":
        return isinstance(value, list)
    if type_ == "object":
        return isinstance(value, dict)
    raise UnsupportedSchema(f"type {type_!r}")


def _same(a: Any, b: Any) -> bool:
    """JSON equality: ``true`` is not ``1``."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return bool(a == b)


def validate(
    doc: Mapping[str, Any],
    schema: Mapping[str, Any],
    value: Any,
    where: str = "$",
    *,
    closed: bool = False,
) -> list[str]:
    """What is wrong with ``value`` under ``schema`` (``[]``: it is valid)."""
    _check_keywords(schema)
    errors: list[str] = []
    if "$ref" in schema:
        errors += validate(doc, resolve(doc, {"$ref": schema["$ref"]}), value, where, closed=closed)
    if "anyOf" in schema:
        branches = [validate(doc, s, value, where, closed=closed) for s in schema["anyOf"]]
        if all(branches):
            errors.append(f"{where}: matches no anyOf branch: {branches}")
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(value, t) for t in types):
            errors.append(f"{where}: {value!r:.80} is not of type {types}")
            return errors
    if "enum" in schema and not any(_same(value, e) for e in schema["enum"]):
        errors.append(f"{where}: {value!r:.80} is not one of {schema['enum']}")
    if "const" in schema and not _same(value, schema["const"]):
        errors.append(f"{where}: {value!r:.80} is not {schema['const']!r}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{where}: shorter than {schema['minLength']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{where}: longer than {schema['maxLength']}")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{where}: {value!r:.80} does not match {schema['pattern']!r}")
        fmt = schema.get("format")
        if fmt == "uuid" and not _UUID.match(value):
            errors.append(f"{where}: {value!r:.80} is not a uuid")
        if fmt == "date-time" and not _DATE_TIME.match(value):
            errors.append(f"{where}: {value!r:.80} is not an RFC 3339 date-time")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{where}: {value} < {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{where}: {value} > {schema['maximum']}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{where}: fewer than {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{where}: more than {schema['maxItems']} items")
        if "items" in schema:
            for i, item in enumerate(value):
                errors += validate(doc, schema["items"], item, f"{where}[{i}]", closed=closed)
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for name in schema.get("required", ()):
            if name not in value:
                errors.append(f"{where}: missing required {name!r}")
        extra_schema = schema.get("additionalProperties")
        for name, item in value.items():
            if name in properties:
                errors += validate(doc, properties[name], item, f"{where}.{name}", closed=closed)
            elif isinstance(extra_schema, dict):
                errors += validate(doc, extra_schema, item, f"{where}.{name}", closed=closed)
            elif extra_schema is False or (closed and extra_schema is None and properties):
                errors.append(f"{where}: {name!r} is not in the schema")
    return errors


# --------------------------------------------------------------------------- generators

#: Strings that have broken parsers before: digits that are not ASCII, numbers too long for
#: int(), NUL, lone quotes, whitespace, path tricks, markup, and the empty string.
NASTY_STRINGS: tuple[str, ...] = (
    "",
    " ",
    "\x00",
    "a\x00b",
    "²",
    "٣",
    "１２",
    "³³",
    "0",
    "-1",
    "+1",
    "1e3",
    "1.5",
    "0x10",
    " 7 ",
    "9" * 19,
    "9" * 5000,
    '"3"',
    'W/"3"',
    '"',
    "null",
    "true",
    "[]",
    "{}",
    "'; DROP TABLE events; --",
    "%00",
    "%",
    "\\",
    "../../etc/passwd",
    "💥" * 8,
    "\u202e\u2066",
    "x" * 501,
    "y" * 20_001,
    "00000000-0000-0000-0000-000000000000",
    "00000000-0000-0000-0000-00000000000g",
    "0123456789abcdef0123456789abcdef",
    "{01234567-89ab-cdef-0123-456789abcdef}",
    "urn:uuid:01234567-89ab-cdef-0123-456789abcdef",
    "ZZZZ",
    "WyJjIl0",
    "Bearer",
)


def _string(schema: Mapping[str, Any]) -> st.SearchStrategy[str]:
    low = schema.get("minLength", 0)
    high = schema.get("maxLength")
    fmt = schema.get("format")
    if fmt == "uuid":
        return st.uuids().map(str)
    if fmt == "date-time":
        return st.datetimes(
            min_value=dt.datetime(1970, 1, 1),
            max_value=dt.datetime(2100, 1, 1),
            timezones=st.just(dt.UTC),
        ).map(dt.datetime.isoformat)
    if "pattern" in schema:
        pattern = st.from_regex(schema["pattern"], fullmatch=True)
        return pattern.filter(lambda s: low <= len(s) <= (high if high is not None else len(s)))
    short = st.text(min_size=low, max_size=min(high if high is not None else 40, max(low, 40)))
    if high is None or high <= 40:
        return short
    return st.one_of(short, st.just("é" * high))


def valid_values(
    doc: Mapping[str, Any],
    schema: Mapping[str, Any],
    hints: Mapping[str, st.SearchStrategy[Any]] | None = None,
) -> st.SearchStrategy[Any]:
    """Values ``schema`` accepts; a property named in ``hints`` draws from its hint too."""
    hints = hints or {}
    _check_keywords(schema)
    if "$ref" in schema:
        return valid_values(doc, resolve(doc, schema), hints)
    if "anyOf" in schema:
        return st.one_of([valid_values(doc, s, hints) for s in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "const" in schema:
        return st.just(schema["const"])
    types = schema.get("type")
    if isinstance(types, list):
        return st.one_of([valid_values(doc, {**schema, "type": t}, hints) for t in types])
    if types == "null":
        return st.none()
    if types == "boolean":
        return st.booleans()
    if types == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum"))
    if types == "number":
        return st.floats(schema.get("minimum"), schema.get("maximum"), allow_nan=False)
    if types == "string":
        return _string(schema)
    if types == "array":
        return st.lists(
            valid_values(doc, schema.get("items", {}), hints),
            min_size=schema.get("minItems", 0),
            max_size=min(schema.get("maxItems", 3), 3),
        )
    if types == "object":
        properties = schema.get("properties", {})
        required = set(schema.get("required", ()))

        def value(name: str) -> st.SearchStrategy[Any]:
            generated = valid_values(doc, properties[name], hints)
            return st.one_of(hints[name], generated) if name in hints else generated

        extra = schema.get("additionalProperties")
        base = st.fixed_dictionaries(
            {name: value(name) for name in properties if name in required},
            optional={name: value(name) for name in properties if name not in required},
        )
        if isinstance(extra, dict):
            more = st.dictionaries(
                st.text(max_size=10), valid_values(doc, extra, hints), max_size=3
            )
            return st.tuples(more, base).map(lambda pair: {**pair[0], **pair[1]})
        return base
    if not schema.keys() - ANNOTATIONS:
        return any_json()
    raise UnsupportedSchema(f"cannot generate {dict(schema)!r:.200}")


def any_json(max_leaves: int = 8) -> st.SearchStrategy[Any]:
    """Any JSON value, with numbers and strings that stress decoders."""
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.sampled_from([2**63, -(2**63) - 1, 2**64, 10**30]),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=20),
        st.sampled_from(NASTY_STRINGS[:30]),
    )
    return st.recursive(
        leaves,
        lambda children: (
            st.lists(children, max_size=3)
            | st.dictionaries(st.text(max_size=10), children, max_size=3)
        ),
        max_leaves=max_leaves,
    )


def invalid_values(
    doc: Mapping[str, Any],
    schema: Mapping[str, Any],
    hints: Mapping[str, st.SearchStrategy[Any]] | None = None,
) -> st.SearchStrategy[Any]:
    """Values that break ``schema`` in one place (or are any JSON at all): a wrong type, a
    missing required field, an unknown field, a huge or nasty string or number."""
    node = resolve(doc, schema)
    strategies: list[st.SearchStrategy[Any]] = [
        any_json(),
        st.sampled_from(NASTY_STRINGS),
        st.sampled_from([2**70, -(2**70), math.pi, [], {}, None, True]),
    ]
    if node.get("type") == "object" and node.get("properties"):
        properties = node["properties"]
        valid = valid_values(doc, node, hints)

        @st.composite
        def without_required(draw: st.DrawFn) -> dict[str, Any]:
            value = dict(draw(valid))
            required = list(node.get("required", ()))
            if required:
                value.pop(draw(st.sampled_from(required)), None)
            return value

        @st.composite
        def with_unknown(draw: st.DrawFn) -> dict[str, Any]:
            value = dict(draw(valid))
            name = draw(st.text(min_size=1, max_size=12).filter(lambda n: n not in properties))
            value[name] = draw(any_json(4))
            return value

        @st.composite
        def one_bad_field(draw: st.DrawFn) -> dict[str, Any]:
            value = dict(draw(valid))
            name = draw(st.sampled_from(sorted(properties)))
            value[name] = draw(
                st.one_of(
                    any_json(4),
                    st.sampled_from(NASTY_STRINGS),
                    st.sampled_from([2**70, -1, 0, 1.5, [], {}, None, False]),
                )
            )
            return value

        strategies += [without_required(), with_unknown(), one_bad_field()]
    return st.one_of(strategies)
