"""What a projection is: a name, a version, the tables it owns and a handler for event batches.

A projection's tables live in a schema of their own, so the same code can build them anywhere:

- ``rm_<name>`` holds the live read model that queries use;
- ``rm_<name>_next`` holds a rebuild in progress, swapped in by renaming the schemas in one
  transaction (queries keep naming ``rm_<name>``, so they never learn about the swap);
- any other schema, or ``pg_temp`` for temporary tables, for a one-off build such as a
  time-travel query or a rebuild check.

Each schema carries its own ``checkpoint`` row (the projection's version and the last
(transaction id, position) applied), written in the same transaction as the read-model rows, so
a table set and its checkpoint can never disagree, and a swap moves both at once.
"""

from __future__ import annotations

import abc
import os
import re
import socket
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Final

import msgspec
import psycopg
from psycopg import sql

from eventstore import ConvstoreError, EventCodec, RecordedEvent

__all__ = [
    "CHECKPOINT_TABLE",
    "EventFailed",
    "Projection",
    "ProjectionError",
    "ReadModelMissing",
    "TolerantCodec",
    "UndecodableEvent",
    "checkpoint_ddl",
    "live_schema",
    "new_instance_id",
    "next_schema",
    "validate_name",
]

#: The table, inside each read-model schema, that holds the schema's checkpoint row.
CHECKPOINT_TABLE: Final = "checkpoint"

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


class ProjectionError(ConvstoreError):
    """Root of the errors the projection machinery raises on purpose."""


class EventFailed(ProjectionError):
    """An event could not be applied; carries the event so the failure is attributed to it."""

    def __init__(self, event: RecordedEvent, reason: str) -> None:
        super().__init__(
            f"event {event.event_id} ({event.type} in {event.stream_id} at {event.checkpoint}):"
            f" {reason}"
        )
        self.event = event
        self.reason = reason


class ReadModelMissing(ProjectionError):
    """The read model's tables do not exist (yet): the projector has never run here."""

    def __init__(self, name: str, schema: str) -> None:
        super().__init__(
            f"read model {name!r} is not built (no schema {schema!r}): run `convstore project`"
        )
        self.name = name
        self.schema = schema


def validate_name(name: str) -> str:
    """Return ``name`` if it can name a projection (it becomes part of schema names)."""
    if not _NAME.match(name):
        raise ValueError(
            f"projection names are 1-40 characters of a-z, 0-9 and _, starting with a letter:"
            f" {name!r}"
        )
    return name


def live_schema(name: str) -> str:
    """The schema of a projection's live read model: ``rm_<name>``."""
    return f"rm_{validate_name(name)}"


def next_schema(name: str) -> str:
    """The schema a rebuild fills before it is swapped in: ``rm_<name>_next``."""
    return f"rm_{validate_name(name)}_next"


def checkpoint_ddl(schema: str) -> sql.Composed:
    """The checkpoint table of a read-model schema (one row, created with the tables)."""
    return sql.SQL(
        """
        CREATE TABLE {table} (
            projection      text        PRIMARY KEY,
            version         integer     NOT NULL,
            transaction_id  bigint      NOT NULL DEFAULT 0,
            position        bigint      NOT NULL DEFAULT 0,
            events          bigint      NOT NULL DEFAULT 0,
            -- false while a rebuild defers the query indexes to its end
            indexed         boolean     NOT NULL,
            applied_by      text,
            updated_at      timestamptz NOT NULL DEFAULT now()
        )
        """
    ).format(table=sql.Identifier(schema, CHECKPOINT_TABLE))


class UndecodableEvent(msgspec.Struct, frozen=True):
    """Stands in for an event's data when the codec could not decode it.

    The projector reads whole batches; one bad row must not hide which event it was, nor stop
    projections that do not care about its type. The projection that handles the type fails
    on this stand-in, with the event attached.
    """

    type: str
    error: str
    data: bytes


class TolerantCodec(EventCodec):
    """An :class:`EventCodec` that decodes a bad row to :class:`UndecodableEvent`."""

    def __init__(self, inner: EventCodec) -> None:
        super().__init__()
        self._inner = inner

    @property
    def direct_decoders(self) -> Mapping[str, Callable[[bytes], Any]]:
        """The wrapped codec's: a reader whose direct call raises decodes the rows again
        through :meth:`decode`, which stands in for the bad one."""
        return self._inner.direct_decoders

    def decode(self, type_name: str, data: bytes) -> Any:
        """Decode with the wrapped codec; return an :class:`UndecodableEvent` on failure."""
        try:
            return self._inner.decode(type_name, data)
        except Exception as exc:  # an upcaster's bug counts too: it is this row's failure
            return UndecodableEvent(type_name, f"{type(exc).__name__}: {exc}", bytes(data))

    def new_event(self, *args: Any, **kwargs: Any) -> Any:
        """Delegate to the wrapped codec (the projector never appends, but keep it whole)."""
        return self._inner.new_event(*args, **kwargs)


class Projection(abc.ABC):
    """A read model built from the global log.

    Subclasses set :attr:`name`, :attr:`version` (bump it whenever the tables or the meaning of
    their rows change: the live model is then rebuilt), :attr:`handles` and :attr:`tables`, and
    implement :meth:`table_ddl`, :meth:`index_ddl` and :meth:`apply`. Every table reference must
    be composed with ``sql.Identifier(schema, table)`` so the same code builds any schema.
    The applier plans a batch's statements with sequential scans off (a generic plan made on a
    new, empty table would scan it for ever), so every lookup a batch makes needs an index.
    """

    name: ClassVar[str]
    version: ClassVar[int]
    #: Event types this projection applies; other events only move its checkpoint.
    handles: ClassVar[frozenset[str]]
    #: The read-model tables, in the order they are compared and described.
    tables: ClassVar[tuple[str, ...]]
    #: Decodes the events this projection handles.
    codec: ClassVar[EventCodec]

    @abc.abstractmethod
    def table_ddl(self, schema: str) -> Sequence[sql.Composed]:
        """Statements creating the tables, with the unique indexes :meth:`apply` relies on."""

    @abc.abstractmethod
    def index_ddl(self, schema: str, *, concurrently: bool = False) -> Sequence[sql.Composed]:
        """Statements creating the query indexes (deferred to the end of a rebuild), each
        ``CREATE INDEX IF NOT EXISTS``; with ``concurrently``, ``CREATE INDEX CONCURRENTLY``."""

    @abc.abstractmethod
    async def apply(
        self,
        conn: psycopg.AsyncConnection[Any],
        schema: str,
        events: Sequence[RecordedEvent],
    ) -> None:
        """Apply a batch of events (in log order, all of handled types) inside the caller's
        transaction. Raise :class:`EventFailed` for an event that cannot be applied; any other
        exception fails the whole batch, and the runner retries it event by event to find the
        culprit."""

    def new_memory(self) -> Any:
        """A fresh object in which :meth:`apply_with_memory` keeps what it learns of its rows
        between batches (``None``: the projection keeps nothing).

        The :class:`~projections.runner.Applier` hands the same object to the next batch only
        while the schema still holds exactly what it committed (the same checkpoint table at
        the checkpoint its last batch wrote); after any failed batch, a restart, another
        instance's batch or a rebuild's swap it starts again from a fresh one.
        """
        return None

    async def apply_with_memory(
        self,
        conn: psycopg.AsyncConnection[Any],
        schema: str,
        events: Sequence[RecordedEvent],
        memory: Any,
    ) -> None:
        """:meth:`apply`, with the ``memory`` of the batches before (see :meth:`new_memory`);
        it may be updated in place, since it is dropped unless this batch commits."""
        await self.apply(conn, schema, events)

    # A projection with a memory may split a batch in two phases, so that the applier folds
    # the next batch while this one is written (two cores instead of one during a catch-up):
    # :meth:`prepare` reads and folds, :meth:`remember` keeps the batch's rows, :meth:`write`
    # writes. The defaults do everything in :meth:`write`.

    async def prepare(
        self,
        conn: psycopg.AsyncConnection[Any],
        schema: str,
        events: Sequence[RecordedEvent],
        memory: Any,
    ) -> Any:
        """Read what the batch needs (on ``conn``, which may be another connection than the
        one that writes, outside the batch's transaction) and fold the events; return what
        :meth:`write` needs, as values the next batch's fold will not change. It may be called
        before the batch before has committed, but only when :meth:`remember` said so."""
        return events

    def remember(self, memory: Any, prepared: Any) -> bool:
        """Keep the prepared batch's rows in ``memory``. True when the next batch may be
        prepared before this one commits: ``memory`` holds every row this batch writes, and
        whatever else :meth:`prepare` reads from the tables comes out the same before and after
        this batch commits."""
        return False

    async def write(
        self,
        conn: psycopg.AsyncConnection[Any],
        schema: str,
        prepared: Any,
        memory: Any,
    ) -> None:
        """Write a prepared batch in the caller's transaction."""
        await self.apply_with_memory(conn, schema, prepared, memory)

    def __repr__(self) -> str:
        return f"<projection {self.name} v{self.version}>"


def new_instance_id() -> str:
    """A label for this process in status output and ``applied_by``: ``host:pid:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
