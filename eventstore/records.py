"""The store's records: events to append, recorded events, checkpoints and expected versions."""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from typing import Any, Final

import msgspec

__all__ = [
    "ANY",
    "NO_STREAM",
    "START",
    "STREAM_EXISTS",
    "AppendResult",
    "Checkpoint",
    "ExpectedVersion",
    "NewEvent",
    "RecordedEvent",
    "StreamState",
    "category_of",
]


class ExpectedVersion(enum.Enum):
    """The symbolic expected versions; an exact version is a plain ``int`` (0 = empty stream)."""

    ANY = "any"
    NO_STREAM = "no_stream"
    STREAM_EXISTS = "stream_exists"

    def __repr__(self) -> str:
        return self.name


ANY: Final = ExpectedVersion.ANY
NO_STREAM: Final = ExpectedVersion.NO_STREAM
STREAM_EXISTS: Final = ExpectedVersion.STREAM_EXISTS


class StreamState(enum.StrEnum):
    """A stream's lifecycle state; readers may skip streams that are not active."""

    ACTIVE = "active"
    DELETED = "deleted"
    ARCHIVED = "archived"


class NewEvent(msgspec.Struct, frozen=True):
    """An event to append: its id, type name, JSON-encoded data and metadata."""

    event_id: uuid.UUID
    type: str
    data: bytes
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)


class Checkpoint(msgspec.Struct, frozen=True, order=True):
    """A place in the global log: (transaction id, position), the order readers follow.

    Round-trips through ``str``: ``"<transaction_id>:<position>"``.
    """

    transaction_id: int
    position: int

    def __str__(self) -> str:
        return f"{self.transaction_id}:{self.position}"

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        """Parse ``"<transaction_id>:<position>"``; raise ``ValueError`` on anything else."""
        head, sep, tail = text.strip().partition(":")
        if not sep or not head.isdigit() or not tail.isdigit():
            raise ValueError(f"not a checkpoint: {text!r} (expected '<transaction_id>:<position>')")
        return cls(int(head), int(tail))


#: The checkpoint before the first event of the log.
START: Final = Checkpoint(0, 0)


class RecordedEvent(msgspec.Struct, frozen=True, gc=False):
    """An event as stored: where it sits in the log and in its stream, and its decoded data.

    Reading the log builds one of these per event, so it holds only what a row gives:
    ``checkpoint`` is derived from ``transaction_id`` and ``position``, and the metadata stays
    JSON (``metadata_json``) until ``metadata`` is read (profiled: decoding every event's
    metadata and building a Checkpoint each cost more than the rest of the record).
    """

    position: int
    transaction_id: int
    event_id: uuid.UUID
    stream_id: str
    stream_version: int
    type: str
    data: Any
    metadata_json: bytes
    recorded_at: dt.datetime

    @property
    def checkpoint(self) -> Checkpoint:
        """Where this event sits in the global log: (transaction id, position)."""
        return Checkpoint(self.transaction_id, self.position)

    @property
    def metadata(self) -> dict[str, Any]:
        """The event's metadata (decoded on each access)."""
        return _METADATA.decode(self.metadata_json)

    @property
    def category(self) -> str:
        """The stream's category: the part of its name before the first ``-``."""
        return category_of(self.stream_id)


_METADATA = msgspec.json.Decoder(dict[str, Any])


class AppendResult(msgspec.Struct, frozen=True):
    """What an append stored: the stream's new version and each event's global position."""

    stream_id: str
    version: int
    positions: tuple[int, ...]
    checkpoints: tuple[Checkpoint, ...]


def category_of(stream_id: str) -> str:
    """The category of a stream named ``category-id`` (the whole name when it has no ``-``)."""
    return stream_id.partition("-")[0]
