"""convstore's generic event store on PostgreSQL.

Streams with optimistic expected versions, idempotent appends by event id, a global log that no
reader can skip (the snapshot-xmin fence), numbered schema migrations and the embedded
PostgreSQL default. It knows nothing of conversations beyond the names of its streams.
"""

from .codec import EventCodec, Upcaster
from .database import open_pool, resolve_database_url
from .errors import (
    ConstraintViolation,
    ConvstoreError,
    DatabaseUnavailable,
    DuplicateEvent,
    InvalidAppend,
    MigrationFailed,
    SchemaMismatch,
    StreamDeleted,
    UnknownEventType,
    WrongExpectedVersion,
)
from .ids import deterministic_id, uuid7
from .migrations import check_schema, migrate, require_current_schema, schema_status
from .records import (
    ANY,
    NO_STREAM,
    START,
    STREAM_EXISTS,
    AppendResult,
    Checkpoint,
    ExpectedVersion,
    NewEvent,
    RecordedEvent,
    StreamState,
    category_of,
)
from .store import NOTIFY_CHANNEL, EventStore

__all__ = [
    "ANY",
    "NOTIFY_CHANNEL",
    "NO_STREAM",
    "START",
    "STREAM_EXISTS",
    "AppendResult",
    "Checkpoint",
    "ConstraintViolation",
    "ConvstoreError",
    "DatabaseUnavailable",
    "DuplicateEvent",
    "EventCodec",
    "EventStore",
    "ExpectedVersion",
    "InvalidAppend",
    "NewEvent",
    "RecordedEvent",
    "MigrationFailed",
    "SchemaMismatch",
    "StreamDeleted",
    "StreamState",
    "UnknownEventType",
    "Upcaster",
    "WrongExpectedVersion",
    "category_of",
    "check_schema",
    "deterministic_id",
    "migrate",
    "open_pool",
    "require_current_schema",
    "resolve_database_url",
    "schema_status",
    "uuid7",
]
