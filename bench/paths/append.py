"""Append paths: one event per transaction at 1, 8 and 32 connections, and 100 per transaction.

The store side is :meth:`EventStore.append` with an exact expected version (``NO_STREAM`` for a
stream's first event), each worker writing conversations of :data:`STREAM_LENGTH` events one
after another, on its own pool connection. The reference is what a careful hand-written writer
would do with psycopg on a plain table of the same columns with a bigint identity primary key
and a unique index on the event id: make a uuid7, encode the same payload and metadata with
msgspec, and INSERT the row (``RETURNING position``, as the store returns positions), in
autocommit, one transaction per event; or ``executemany`` of 100 rows in one transaction.

``append_c8_keyed`` (full runs only, no target) measures the same append at 8 connections
against the same INSERT into a table that also has the ``events`` table's keys, so that the
cost of the append's own checks shows apart from the cost of the keys the design requires.
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

__all__ = ["REF_APPEND_DDL", "REF_KEYED_DDL", "STREAM_LENGTH"]

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

#: A second reference table for the append at 8 connections: the first one's columns (``LIKE``,
#: so the two cannot drift apart) with the ``events`` table's keys instead of its own: the
#: global order as primary key, the unique event id, the unique (stream, version) and the
#: BRIN index on position (sql/0007). What the store's append costs above an INSERT into it is
#: the append's own work (the version and state checks, a new stream's row), apart from what
#: the design's keys cost every row.
REF_KEYED_DDL: LiteralString = """
CREATE TABLE IF NOT EXISTS bench_ref_append_keyed (
    LIKE bench_ref_append INCLUDING DEFAULTS INCLUDING IDENTITY,
    CONSTRAINT bench_ref_append_keyed_pkey PRIMARY KEY (transaction_id, position),
    CONSTRAINT bench_ref_append_keyed_event_id_key UNIQUE (event_id),
    CONSTRAINT bench_ref_append_keyed_stream_version_key UNIQUE (stream_id, stream_version)
)
"""

_REF_KEYED_BRIN: LiteralString = """
CREATE INDEX IF NOT EXISTS bench_ref_append_keyed_position_brin
    ON bench_ref_append_keyed USING brin (position)
    WITH (pages_per_range = 8, autosummarize = on)
"""

_REF_KEYED_INSERT_RETURNING: LiteralString = """
INSERT INTO bench_ref_append_keyed
    (event_id, stream_id, stream_version, category, type, data, metadata)
VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s::jsonb)
RETURNING position
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


async def setup_keyed_reference_table(ctx: BenchContext) -> None:
    """Create the reference table with the ``events`` table's keys (once per run)."""
    await ctx.execute(REF_APPEND_DDL)  # the table whose columns it copies
    await ctx.execute(REF_KEYED_DDL)
    await ctx.execute(_REF_KEYED_BRIN)


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

    def __init__(
        self,
        workload: Workload,
        offset: int,
        per_append: int,
        per_stream: int,
        *,
        keyed: bool = False,
    ) -> None:
        self.workload = workload
        self.insert_one = _REF_KEYED_INSERT_RETURNING if keyed else _REF_INSERT_RETURNING
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
            await (await conn.execute(self.insert_one, self._row())).fetchone()
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


def reference_insert(
    concurrency: int, per_append: int, per_stream: int, *, keyed: bool = False
) -> Measure:
    """A measure of plain psycopg INSERTs into the reference table at ``concurrency``
    (with ``keyed``, one event per transaction into the table with the events table's keys)."""
    if keyed and per_append != 1:
        raise ValueError("the keyed reference inserts one event per transaction")

    async def measure(ctx: BenchContext, seconds: float) -> Measurement:
        pool = await ctx.pool(concurrency + 1)
        workload = ctx.workload

        def make(worker: int) -> Operation:
            return _ReferenceWriter(workload, worker * 97, per_append, per_stream, keyed=keyed)

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
        name="append_c8_keyed",
        description=(
            "EventStore.append as append_c8, against a plain INSERT into a table with the"
            " events table's keys: what the append's own checks cost, apart from its keys"
        ),
        run=store_append(8, 1, STREAM_LENGTH),
        reference=reference_insert(8, 1, STREAM_LENGTH, keyed=True),
        reference_description=(
            "plain INSERT ... RETURNING of one row per transaction, 8 connections, table with"
            " PK (transaction_id, position), unique event_id, unique (stream_id,"
            " stream_version) and a BRIN index on position"
        ),
        setup=setup_keyed_reference_table,
        full_only=True,
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
