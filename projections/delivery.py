"""The delivery daemon's work queue: agent replies not yet delivered or failed, and counters.

A projection like the inbox (same runner, checkpoint in the batch's transaction, rebuildable),
run by ``convstore deliver`` (``handlers/delivery.py``), whose sender reads it to find replies
that are due. It is only a queue, never the authority: the sender decides each attempt from the
reply's own events under its stream's lock, so a queue row that lags behind the log costs a
look, never a second send.

Tables
------
- ``outbox``: one row per reply that is neither delivered, confirmed nor failed.
  ``next_attempt_at`` is when it is due: when it was queued, then the ``retry_at`` of its last
  failed attempt; while an attempt is ``in_flight`` it is the attempt's time, and the sender
  adds its in-doubt delay (the clock and that setting are the sender's; this table depends on
  the events alone, so a rebuild equals the live model).
- ``stats``: running totals for ``/metrics``: replies queued, delivered (first delivery or
  confirmation of a reply still in the outbox), failed; attempts and failed attempts; and the
  delivery latency (queued to delivered) as histogram buckets and a sum in microseconds
  (integers, so the totals do not depend on how the log was cut into batches).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from typing import Any, ClassVar, Final

import psycopg
from psycopg import sql

from conversations.events import (
    CODEC,
    MessageSent,
    ReplyAttempted,
    ReplyAttemptFailed,
    ReplyConfirmed,
    ReplyDelivered,
    ReplyFailed,
)
from eventstore import EventCodec, RecordedEvent

from .base import EventFailed, Projection, UndecodableEvent

__all__ = ["LATENCY_BUCKETS", "DeliveryProjection"]

#: Upper bounds (seconds) of the delivery latency histogram's buckets.
LATENCY_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)

_TABLE_DDL: Final = (
    """
    CREATE TABLE {schema}.outbox (
        message_id      uuid        PRIMARY KEY,
        conversation_id uuid        NOT NULL,
        queued_at       timestamptz NOT NULL,
        attempts        integer     NOT NULL CHECK (attempts >= 0),
        in_flight       boolean     NOT NULL,
        next_attempt_at timestamptz NOT NULL
    )
    """,
    """
    CREATE TABLE {schema}.stats (
        name    text    PRIMARY KEY,
        value   bigint  NOT NULL
    )
    """,
)

_INDEX_DDL: Final = (
    "CREATE INDEX {concurrently} IF NOT EXISTS outbox_due_idx ON {schema}.outbox (next_attempt_at)",
)

_COLUMNS: Final = (
    ("message_id", "uuid"),
    ("conversation_id", "uuid"),
    ("queued_at", "timestamptz"),
    ("attempts", "integer"),
    ("in_flight", "boolean"),
    ("next_attempt_at", "timestamptz"),
)


class _Row:
    __slots__ = ("attempts", "conversation_id", "in_flight", "next_attempt_at", "queued_at")

    def __init__(
        self,
        conversation_id: uuid.UUID,
        queued_at: dt.datetime,
        attempts: int,
        in_flight: bool,
        next_attempt_at: dt.datetime,
    ) -> None:
        self.conversation_id = conversation_id
        self.queued_at = queued_at
        self.attempts = attempts
        self.in_flight = in_flight
        self.next_attempt_at = next_attempt_at


def bucket_name(bound: float) -> str:
    """The ``stats`` row of a latency bucket."""
    return f"latency_le_{bound:g}"


class DeliveryProjection(Projection):
    """Undelivered replies and delivery totals (see the module)."""

    name: ClassVar[str] = "delivery"
    version: ClassVar[int] = 1
    handles: ClassVar[frozenset[str]] = frozenset(
        {
            "MessageSent",
            "ReplyAttempted",
            "ReplyDelivered",
            "ReplyAttemptFailed",
            "ReplyFailed",
            "ReplyConfirmed",
        }
    )
    tables: ClassVar[tuple[str, ...]] = ("outbox", "stats")
    codec: ClassVar[EventCodec] = CODEC

    def table_ddl(self, schema: str) -> Sequence[sql.Composed]:
        """The outbox and the totals."""
        return [sql.SQL(text).format(schema=sql.Identifier(schema)) for text in _TABLE_DDL]

    def index_ddl(self, schema: str, *, concurrently: bool = False) -> Sequence[sql.Composed]:
        """The due-time index the sender's query uses."""
        how = sql.SQL("CONCURRENTLY") if concurrently else sql.SQL("")
        return [
            sql.SQL(text).format(schema=sql.Identifier(schema), concurrently=how)
            for text in _INDEX_DDL
        ]

    async def apply(
        self,
        conn: psycopg.AsyncConnection[Any],
        schema: str,
        events: Sequence[RecordedEvent],
    ) -> None:
        """Fold the batch over the rows it names, then write them and the totals' deltas."""
        outbox = sql.Identifier(schema, "outbox")
        named = {
            event.data.message_id
            for event in events
            if type(event.data) is not MessageSent and type(event.data) is not UndecodableEvent
        }
        rows: dict[uuid.UUID, _Row | None] = {}
        if named:
            cur = await conn.execute(
                sql.SQL(
                    "SELECT message_id, conversation_id, queued_at, attempts, in_flight,"
                    " next_attempt_at FROM {t} WHERE message_id = ANY(%b::uuid[])"
                ).format(t=outbox),
                (list(named),),
            )
            for row in await cur.fetchall():
                rows[row[0]] = _Row(*row[1:])
        changed: set[uuid.UUID] = set()
        stats: dict[str, int] = {}

        def add(name: str, value: int = 1) -> None:
            stats[name] = stats.get(name, 0) + value

        for event in events:
            data = event.data
            kind = type(data)
            if kind is UndecodableEvent:
                raise EventFailed(event, f"cannot decode the event's data: {data.error}")
            if kind is MessageSent:
                if data.source == "agent":
                    rows[data.message_id] = _Row(
                        data.conversation_id, data.sent_at, 0, False, data.sent_at
                    )
                    changed.add(data.message_id)
                    add("queued")
                continue
            row = rows.get(data.message_id)
            if kind is ReplyAttempted:
                add("attempts")
                if row is not None:
                    row.attempts = max(row.attempts, data.attempt)
                    row.in_flight, row.next_attempt_at = True, data.attempted_at
            elif kind is ReplyAttemptFailed:
                add("attempt_failures")
                if row is not None:
                    row.in_flight, row.next_attempt_at = False, data.retry_at
            elif kind is ReplyDelivered or kind is ReplyConfirmed:
                add("confirmed" if kind is ReplyConfirmed else "provider_delivered")
                if row is not None:
                    at = data.delivered_at if kind is ReplyDelivered else data.confirmed_at
                    seconds = max(0.0, (at - row.queued_at).total_seconds())
                    add("delivered")
                    add("latency_sum_us", round(seconds * 1_000_000))
                    for bound in LATENCY_BUCKETS:
                        if seconds <= bound:
                            add(bucket_name(bound))
                    rows[data.message_id] = None
            elif kind is ReplyFailed:
                if row is not None:
                    add("failed")
                    rows[data.message_id] = None
            else:
                raise EventFailed(event, f"unexpected payload {kind.__name__} for {event.type}")
            changed.add(data.message_id)

        gone = [i for i in changed if rows.get(i) is None]
        if gone:
            await conn.execute(
                sql.SQL("DELETE FROM {t} WHERE message_id = ANY(%b::uuid[])").format(t=outbox),
                (gone,),
            )
        present = [(i, r) for i in changed if (r := rows.get(i)) is not None]
        if present:
            columns = sql.SQL(", ").join(sql.Identifier(name) for name, _ in _COLUMNS)
            await conn.execute(
                sql.SQL(
                    "INSERT INTO {t} ({cols}) SELECT * FROM unnest({arrays})"
                    " ON CONFLICT (message_id) DO UPDATE SET {updates}"
                ).format(
                    t=outbox,
                    cols=columns,
                    arrays=sql.SQL(", ").join(
                        sql.SQL("%b::{}[]").format(sql.SQL(typ)) for _, typ in _COLUMNS
                    ),
                    updates=sql.SQL(", ").join(
                        sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(name))
                        for name, _ in _COLUMNS[1:]
                    ),
                ),
                [
                    [i for i, _ in present],
                    [r.conversation_id for _, r in present],
                    [r.queued_at for _, r in present],
                    [r.attempts for _, r in present],
                    [r.in_flight for _, r in present],
                    [r.next_attempt_at for _, r in present],
                ],
            )
        if stats:
            names = sorted(stats)
            await conn.execute(
                sql.SQL(
                    "INSERT INTO {t} AS s (name, value)"
                    " SELECT * FROM unnest(%b::text[], %b::int8[])"
                    " ON CONFLICT (name) DO UPDATE SET value = s.value + EXCLUDED.value"
                ).format(t=sql.Identifier(schema, "stats")),
                (names, [stats[n] for n in names]),
            )
