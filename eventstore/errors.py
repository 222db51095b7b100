"""The project's one exception root and its typed errors.

Every error raised on purpose by convstore derives from :class:`ConvstoreError` and carries the
facts a caller needs as attributes. Errors from psycopg are translated by SQLSTATE and constraint
name (never by message text) in :func:`translate_errors`, chained with ``from``.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator, Sequence
from typing import NoReturn

import psycopg
from psycopg import errors as pg_errors

__all__ = [
    "ConstraintViolation",
    "ConvstoreError",
    "DatabaseUnavailable",
    "DuplicateEvent",
    "InvalidAppend",
    "MigrationFailed",
    "SchemaMismatch",
    "StreamDeleted",
    "UnknownEventType",
    "WrongExpectedVersion",
    "translate_errors",
]


class ConvstoreError(Exception):
    """Root of every error convstore raises on purpose."""


class MigrationFailed(ConvstoreError):
    """A migration's SQL failed: it was rolled back whole; the ones before it stay applied."""

    def __init__(
        self, label: str, applied: tuple[str, ...], sqlstate: str | None, reason: str
    ) -> None:
        before = f"applied before it: {', '.join(applied)}" if applied else "none applied before it"
        super().__init__(
            f"migration {label} failed and was rolled back (SQLSTATE {sqlstate}: {reason});"
            f" {before}"
        )
        self.label = label
        self.applied = applied
        self.sqlstate = sqlstate


class SchemaMismatch(ConvstoreError):
    """The database schema is behind, ahead of, or drifted from the migrations in ``sql/``."""

    def __init__(self, line: str, *, kind: str) -> None:
        super().__init__(line)
        self.line = line
        #: one of ``behind``, ``drift``, ``ahead``
        self.kind = kind


class DatabaseUnavailable(ConvstoreError):
    """PostgreSQL could not be reached or dropped the connection; the operation may be retried."""


class WrongExpectedVersion(ConvstoreError):
    """An append's expected version did not match the stream's actual version."""

    def __init__(self, stream_id: str, expected: object, actual: int) -> None:
        super().__init__(
            f"stream {stream_id!r}: expected version {expected!r}, actual version {actual}"
        )
        self.stream_id = stream_id
        self.expected = expected
        #: the stream's current version; 0 when the stream does not exist
        self.actual = actual


class DuplicateEvent(ConvstoreError):
    """An event id is already stored with other content, in another stream, or at another place."""

    def __init__(self, stream_id: str, event_ids: Sequence[uuid.UUID], reason: str) -> None:
        ids = ", ".join(str(e) for e in event_ids)
        super().__init__(f"stream {stream_id!r}: event ids already stored ({ids}): {reason}")
        self.stream_id = stream_id
        self.event_ids = tuple(event_ids)
        self.reason = reason


class StreamDeleted(ConvstoreError):
    """The stream was soft-deleted or archived and takes no more events."""

    def __init__(self, stream_id: str, state: str) -> None:
        super().__init__(f"stream {stream_id!r} is {state} and takes no more events")
        self.stream_id = stream_id
        self.state = state


class InvalidAppend(ConvstoreError, ValueError):
    """The append request itself is malformed (no events, repeated ids, bad stream name...)."""


class UnknownEventType(ConvstoreError, LookupError):
    """A payload's type is not registered with the codec."""

    def __init__(self, type_name: str) -> None:
        super().__init__(f"event type {type_name!r} is not registered")
        self.type_name = type_name


class ConstraintViolation(ConvstoreError):
    """A database constraint we did not map to a more specific error rejected a write."""

    def __init__(self, constraint: str | None, sqlstate: str | None) -> None:
        super().__init__(f"constraint {constraint or '?'} rejected the write (SQLSTATE {sqlstate})")
        self.constraint = constraint
        self.sqlstate = sqlstate


_UNAVAILABLE_CLASSES = ("08", "57")  # connection exceptions, operator intervention (shutdown)


def first_line(exc: BaseException) -> str:
    """The first line of an error's message, for people (never parsed); its class if empty."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def raise_translated(exc: psycopg.Error) -> NoReturn:
    """Raise the convstore error for a psycopg error, chained to it."""
    sqlstate = exc.sqlstate
    if isinstance(exc, psycopg.OperationalError) and (
        sqlstate is None or sqlstate[:2] in _UNAVAILABLE_CLASSES
    ):
        # libpq's first line says why (refused, unknown database, authentication); shown to
        # operators, never parsed. HTTP clients get a fixed message (handlers/errors.py).
        raise DatabaseUnavailable(f"PostgreSQL is unavailable: {first_line(exc)}") from exc
    if isinstance(exc, pg_errors.IntegrityError):
        raise ConstraintViolation(exc.diag.constraint_name, sqlstate) from exc
    raise exc


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """Translate psycopg errors raised in the block into convstore errors."""
    try:
        yield
    except (psycopg.OperationalError, pg_errors.IntegrityError) as exc:
        raise_translated(exc)
