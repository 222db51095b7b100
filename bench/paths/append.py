"""Append paths: one event per transaction at 1, 8 and 32 connections, and 100 per transaction.

The store side is :meth:`EventStore.append` with an exact expected version (``NO_STREAM`` for a
stream's first event), each worker writing conversations of :data:`STREAM_LENGTH` events one
after another, on its own pool connection. The reference is what a careful hand-written writer
would do with psycopg on a plain table of the same columns with a bigint identity primary key
and a unique index on the event id: make a uuid7, encode the same payload and metadata with
msgspec, and INSERT the row (``RETURNING position``, as the store returns positions), in
autocommit, one transaction per event; or ``executemany`` of 100 rows in one transaction.
"""

from __future__ import annotations

from typing import Any, Final, LiteralString

import msgspec
import psycopg

from eventstore import NO_STREAM, EventCodec, EventStore, NewEvent
from eventstore.ids import uuid7

from ..context import BenchContext
from ..registry import BenchPath, Measure, Measurement, register
from ..timing import Operation, timed_workers
from ..workload import CATEGORY, EVENT_TYPE, MessageReceived, Workload

__all__ = ["REF_APPEND_DDL", "STREAM_LENGTH"]

#: Events per conversation stream in the single-event paths; a new stream follows.
STREAM_LENGTH: Final = 10
#: Events per append in the batch path, and batches per stream.
BATCH_SIZE: Final = 100
BATCHES_PER_STREAM: Final = 3

#: The reference table: the events table's columns and types, a bigint identity primary key
#: and a unique index on the id column, and nothing else.
REF_APPEND_DDL: LiteralString = """
CREATE TABLE IF NOT EXISTS bench_ref_append (
    position        bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    transaction_id  xid8        NOT NULL DEFAULT pg_current_xact_id(),
    event_id        uuid        NOT NULL,
    stream_id       text        NOT NULL,
    stream_version  bigint      NOT NULL,
    category        text        NOT NULL,
    type            text        NOT NULL,
    data            jsonb       NOT NULL,
    metadata        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT bench_ref_append_event_id_key UNIQUE (event_id)
)
"""

_REF_INSERT_RETURNING: LiteralString = """
INSERT INTO bench_ref_append (event_id, stream_id, stream_version, category, type, data, metadata)
VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s::jsonb)
RETURNING position
"""

_REF_INSERT: LiteralString = """
INSERT INTO bench_ref_append (event_id, stream_id, stream_version, category, type, data, metadata)
VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s::jsonb)
"""

_ENCODER = msgspec.json.Encoder()


async def setup_reference_table(ctx: BenchContext) -> None:
    """Create the reference table of the append paths (once per run)."""
    await ctx.execute(REF_APPEND_DDL)


class _StoreWriter:
    """One worker appending ``per_append`` events per call through the store."""

    def __init__(
        self, store: EventStore, workload: Workload, offset: int, per_append: int, per_stream: int
    ) -> None:
        self.store = store
        self.workload = workload
        self.i = offset
        self.per_append = per_append
        self.per_stream = per_stream
        self.stream = workload.stream_name()
        self.version = 0

    async def __call__(self, conn: psycopg.AsyncConnection[Any]) -> int:
        events: list[NewEvent] = []
        for _ in range(self.per_append):
            payload, metadata = self.workload.item(self.i)
            self.i += 1
            events.append(self.store.codec.new_event(payload, metadata=metadata))
        expected = NO_STREAM if self.version == 0 else self.version
        await self.store.append(self.stream, events, expected, connection=conn)
        self.version += self.per_append
        if self.version >= self.per_stream:
            self.stream = self.workload.stream_name()
            self.version = 0
        return self.per_append


class _ReferenceWriter:
    """One worker inserting the same rows into the reference table with plain psycopg."""

    def __init__(self, workload: Workload, offset: int, per_append: int, per_stream: int) -> None:
        self.workload = workload
        self.i = offset
        self.per_append = per_append
        self.per_stream = per_stream
        self.stream = workload.stream_name()
        self.version = 0

    def _row(self) -> tuple[Any, ...]:
        payload, metadata = self.workload.item(self.i)
        self.i += 1
        self.version += 1
        return (
            uuid7(),
            self.stream,
            self.version,
            CATEGORY,
            EVENT_TYPE,
            _ENCODER.encode(payload).decode(),
            _ENCODER.encode(metadata).decode(),
        )

    async def __call__(self, conn: psycopg.AsyncConnection[Any]) -> int:
        if self.per_append == 1:
            await (await conn.execute(_REF_INSERT_RETURNING, self._row())).fetchone()
        else:
            rows = [self._row() for _ in range(self.per_append)]
            async with conn.transaction(), conn.cursor() as cur:
                await cur.executemany(_REF_INSERT, rows)
        if self.version >= self.per_stream:
            self.stream = self.workload.stream_name()
            self.version = 0
        return self.per_append


def store_append(concurrency: int, per_append: int, per_stream: int) -> Measure:
    """A measure of ``EventStore.append`` at ``concurrency`` connections."""

    async def measure(ctx: BenchContext, seconds: float) -> Measurement:
        pool = await ctx.pool(concurrency + 1)  # +1: the store's coalesced NOTIFY after commit
        store = EventStore(pool, EventCodec([MessageReceived]))
        workload = ctx.workload

        def make(worker: int) -> Operation:
            return _StoreWriter(store, workload, worker * 97, per_append, per_stream)

        try:
            return await timed_workers(ctx, pool, concurrency, seconds, make)
        finally:
            await store.close()

    return measure


def reference_insert(concurrency: int, per_append: int, per_stream: int) -> Measure:
    """A measure of plain psycopg INSERTs into the reference table at ``concurrency``."""

    async def measure(ctx: BenchContext, seconds: float) -> Measurement:
        pool = await ctx.pool(concurrency + 1)
        workload = ctx.workload

        def make(worker: int) -> Operation:
            return _ReferenceWriter(workload, worker * 97, per_append, per_stream)

        return await timed_workers(ctx, pool, concurrency, seconds, make)

    return measure


for _connections, _target in ((1, None), (8, 0.8), (32, None)):
    register(
        BenchPath(
            name=f"append_c{_connections}",
            description=(
                f"EventStore.append, one event per transaction, {_connections} connection(s),"
                f" exact expected version, streams of {STREAM_LENGTH} events"
            ),
            run=store_append(_connections, 1, STREAM_LENGTH),
            reference=reference_insert(_connections, 1, STREAM_LENGTH),
            reference_description=(
                f"plain INSERT ... RETURNING of one row per transaction, {_connections}"
                " connection(s), table with identity PK + unique event_id"
            ),
            target=_target,
            setup=setup_reference_table,
        )
    )

register(
    BenchPath(
        name="append_batch100",
        description=(
            f"EventStore.append of {BATCH_SIZE} events per transaction, 1 connection,"
            f" {BATCHES_PER_STREAM} batches per stream"
        ),
        run=store_append(1, BATCH_SIZE, BATCH_SIZE * BATCHES_PER_STREAM),
        reference=reference_insert(1, BATCH_SIZE, BATCH_SIZE * BATCHES_PER_STREAM),
        reference_description=f"executemany INSERT of {BATCH_SIZE} rows in one transaction",
        target=0.8,
        setup=setup_reference_table,
    )
)
