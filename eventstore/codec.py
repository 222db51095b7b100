"""Encoding and decoding event payloads: msgspec Structs registered by type name.

Payloads are ``msgspec.Struct(frozen=True, tag=True)`` classes; the tag (the class name unless
set) is the stored type name. The codec is built once with every type and keeps one decoder per
type, so decoding a row is a dictionary lookup and one msgspec call. Schemas evolve by msgspec's
rules (a new field gets a default; a field's type never changes); any other change to a stored
shape gets an upcaster, which turns the stored JSON of an old shape into the current one.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import msgspec

from .errors import UnknownEventType
from .ids import uuid7
from .records import NewEvent

__all__ = ["EventCodec", "Upcaster"]

#: Turns the stored data (a dict) of an old shape into ``(type name, data)`` of the current one.
Upcaster = Callable[[dict[str, Any]], tuple[str, dict[str, Any]]]

_ENCODER = msgspec.json.Encoder()
_GENERIC = msgspec.json.Decoder()


def _type_name(cls: type[msgspec.Struct]) -> str:
    tag = cls.__struct_config__.tag
    if not isinstance(tag, str):
        raise TypeError(f"{cls.__name__} must be a msgspec.Struct with tag=True (a string tag)")
    return tag


class EventCodec:
    """Maps type names to payload classes and back; encodes payloads, decodes stored data.

    ``strict=False`` (the default) decodes an unregistered type to a plain dict instead of
    raising, so generic tools (replay, the contract tests) can read any log.
    """

    def __init__(
        self,
        types: Iterable[type[msgspec.Struct]] = (),
        *,
        upcasters: Mapping[str, Upcaster] | None = None,
        strict: bool = False,
    ) -> None:
        self._types: dict[str, type[msgspec.Struct]] = {}
        # class -> its type name, for the registered classes: naming a payload on every append
        # is then one dict lookup
        self._names: dict[type[msgspec.Struct], str] = {}
        self._decoders: dict[str, msgspec.json.Decoder[Any]] = {}
        self._upcasters = dict(upcasters or {})
        self._direct: dict[str, Callable[[bytes], Any]] = {}
        self._strict = strict
        for cls in types:
            self.register(cls)

    def register(self, cls: type[msgspec.Struct]) -> None:
        """Register a payload class under its tag; a tag may belong to one class only."""
        name = _type_name(cls)
        existing = self._types.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"type name {name!r} is already registered to {existing.__name__}")
        self._types[name] = cls
        self._names[cls] = name
        self._decoders[name] = msgspec.json.Decoder(cls)
        if name not in self._upcasters:
            self._direct[name] = self._decoders[name].decode

    @property
    def direct_decoders(self) -> Mapping[str, Callable[[bytes], Any]]:
        """Type name -> the one msgspec call that decodes it, for the registered types with
        no upcaster: :meth:`decode` gives the same result for them. A reader of many rows
        calls these inline, without a Python call of its own per row."""
        return self._direct

    @property
    def type_names(self) -> frozenset[str]:
        """Every registered type name."""
        return frozenset(self._types)

    def type_name(self, payload: msgspec.Struct) -> str:
        """The registered type name of a payload; raise :class:`UnknownEventType` otherwise."""
        name = self._names.get(type(payload))
        if name is not None:
            return name
        name = _type_name(type(payload))
        if self._types.get(name) is not type(payload):
            raise UnknownEventType(name)
        return name

    def encode(self, payload: msgspec.Struct) -> bytes:
        """The JSON bytes stored for a payload."""
        return _ENCODER.encode(payload)

    def new_event(
        self,
        payload: msgspec.Struct,
        *,
        event_id: uuid.UUID | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> NewEvent:
        """A :class:`NewEvent` for a payload, with a fresh uuid7 unless an id is given."""
        return NewEvent(
            event_id=event_id or uuid7(),
            type=self.type_name(payload),
            data=_ENCODER.encode(payload),
            metadata=dict(metadata or {}),
        )

    def decode(self, type_name: str, data: bytes) -> Any:
        """Decode stored data: upcast an old shape first, then build the registered class."""
        upcaster = self._upcasters.get(type_name)
        if upcaster is not None:
            type_name, fields = upcaster(_GENERIC.decode(data))
            cls = self._types.get(type_name)
            if cls is None:
                raise UnknownEventType(type_name)
            fields = {k: v for k, v in fields.items() if k != cls.__struct_config__.tag_field}
            return msgspec.convert(fields, cls)
        decoder = self._decoders.get(type_name)
        if decoder is None:
            if self._strict:
                raise UnknownEventType(type_name)
            return _GENERIC.decode(data)
        return decoder.decode(data)
