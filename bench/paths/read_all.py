"""Reading the whole global log with decoding, against a keyset scan of a plain table.

The store side pages through the log with :meth:`EventStore.read_all` (limit 1000, from the
start, continuing from each page's last checkpoint) with an :class:`EventCodec` that decodes
every payload into a msgspec Struct. The reference pages through a copy of the same rows in a
plain table by its primary key (``WHERE position > last ORDER BY position LIMIT 1000``),
fetching jsonb as raw bytes and decoding each payload with msgspec into the same Struct (events
of other types, written by other paths into the same log, into dicts on both sides).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Final, LiteralString

import msgspec

from eventstore import START, EventCodec, EventStore
from eventstore.ids import uuid7

from ..context import BenchContext, CostProbe
from ..registry import BenchPath, Measurement, register
from ..workload import CATEGORY, EVENT_TYPE, MessageReceived

__all__ = ["PAGE", "ensure_log"]

#: Events per page, for the store and for the reference.
PAGE: Final = 1000
#: How long a round reads the log under ``--quick`` (a full run reads all of it each round).
_QUICK_ROUND_SECONDS: Final = 1.0
#: Events per stream (and per transaction) when loading the log.
_LOAD_BATCH: Final = 50
_LOAD_WORKERS: Final = 2
_LOAD_STREAMS_PER_TRANSACTION: Final = 10

_REF_LOG_DDL: LiteralString = """
CREATE TABLE bench_ref_log (
    position        bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    transaction_id  xid8        NOT NULL,
    event_id        uuid        NOT NULL,
    stream_id       text        NOT NULL,
    stream_version  bigint      NOT NULL,
    category        text        NOT NULL,
    type            text        NOT NULL,
    data            jsonb       NOT NULL,
    metadata        jsonb       NOT NULL,
    recorded_at     timestamptz NOT NULL,
    CONSTRAINT bench_ref_log_event_id_key UNIQUE (event_id)
)
"""

_REF_LOG_FILL: LiteralString = """
INSERT INTO bench_ref_log (position, transaction_id, event_id, stream_id, stream_version,
                           category, type, data, metadata, recorded_at)
OVERRIDING SYSTEM VALUE
SELECT position, transaction_id, event_id, stream_id, stream_version,
       category, type, data, metadata, recorded_at
FROM events ORDER BY position
"""

_REF_PAGE: LiteralString = """
SELECT position, event_id, stream_id, stream_version, type, data, metadata, recorded_at
FROM bench_ref_log
WHERE position > %(after)s
ORDER BY position
LIMIT %(limit)s
"""

_COPY_EVENTS: LiteralString = """
COPY events (event_id, stream_id, stream_version, category, type, data, metadata) FROM STDIN
"""

_INSERT_STREAM: LiteralString = """
INSERT INTO streams (stream_id, category) VALUES (%s, %s)
"""

_VISIBLE_BEHIND: LiteralString = """
SELECT count(*) FROM events
WHERE transaction_id >= pg_snapshot_xmin(pg_current_snapshot())
"""

#: The reference decodes like the store's non-strict codec: the registered type into its Struct,
#: any other type (other paths, such as ingest, write into the same log) into a dict.
_DECODERS: dict[str, msgspec.json.Decoder[Any]] = {
    EVENT_TYPE: msgspec.json.Decoder(MessageReceived)
}
_GENERIC = msgspec.json.Decoder()


async def ensure_log(ctx: BenchContext) -> int:
    """Make the log hold at least the run's log size, copy it to the reference; return its size.

    Loads the missing events with COPY (see :func:`_load`), copies every event to
    ``bench_ref_log``, vacuums and analyses both, and waits until the snapshot-xmin fence has
    passed every event.
    """
    target = int(ctx.scale(100_000, 300_000))
    have = int(await ctx.scalar("SELECT count(*) FROM events"))
    if ctx.state.get("log_size") == have and have >= target:
        return have
    if have < target:
        await _load(ctx, target - have)
    await ctx.execute("DROP TABLE IF EXISTS bench_ref_log")
    await ctx.execute(_REF_LOG_DDL)
    await ctx.execute(_REF_LOG_FILL)
    await ctx.execute("VACUUM (ANALYZE) events, streams, bench_ref_log")
    await _wait_for_fence(ctx)
    size = int(await ctx.scalar("SELECT count(*) FROM events"))
    ctx.state["log_size"] = size
    return size


async def _load(ctx: BenchContext, missing: int) -> None:
    """COPY the missing events in: streams of 50 events, 10 streams per transaction.

    Loading is setup, not measured, so it bypasses the store for speed (COPY costs the client a
    few µs an event); the rows are what the store would write (same payload and metadata JSON,
    uuid7 ids, a streams row each), with one transaction id per 500 events.
    """
    pool = await ctx.pool(_LOAD_WORKERS)
    workload = ctx.workload
    encoder = msgspec.json.Encoder()
    remaining = missing
    counter = 0

    async def loader() -> None:
        nonlocal remaining, counter
        async with pool.connection() as conn:
            while remaining > 0:
                streams: list[tuple[str, str]] = []
                async with conn.transaction():
                    async with conn.cursor().copy(_COPY_EVENTS) as copy:
                        for _ in range(_LOAD_STREAMS_PER_TRANSACTION):
                            n = min(_LOAD_BATCH, remaining)
                            if n == 0:
                                break
                            remaining -= n
                            stream = workload.stream_name()
                            streams.append((stream, CATEGORY))
                            for version in range(1, n + 1):
                                payload, metadata = workload.item(counter)
                                counter += 1
                                await copy.write_row(
                                    (
                                        uuid7(),
                                        stream,
                                        version,
                                        CATEGORY,
                                        EVENT_TYPE,
                                        encoder.encode(payload).decode(),
                                        encoder.encode(metadata).decode(),
                                    )
                                )
                    async with conn.cursor() as cur:
                        await cur.executemany(_INSERT_STREAM, streams)

    await asyncio.gather(*(loader() for _ in range(_LOAD_WORKERS)))


async def _wait_for_fence(ctx: BenchContext, timeout: float = 60.0) -> None:
    """Wait until no event is held behind the fence by a running transaction (anyone's)."""
    deadline = time.monotonic() + timeout
    while int(await ctx.scalar(_VISIBLE_BEHIND)) > 0:
        if time.monotonic() > deadline:
            raise RuntimeError(
                "a long-running transaction on the server holds the global-log fence back;"
                " read_all cannot see the whole log"
            )
        await asyncio.sleep(0.1)


def _round_seconds(ctx: BenchContext, seconds: float) -> float:
    """``seconds``, capped under ``--quick``: the log must hold 100k events for the EXPLAIN
    checks, and reading all of them twice a round took 19 of a quick run's 72 s on a slow
    2-core machine, over the minute a quick run is allowed."""
    return min(seconds, _QUICK_ROUND_SECONDS) if ctx.quick else seconds


async def store_read_all(ctx: BenchContext, seconds: float) -> Measurement:
    """Read the whole log through ``EventStore.read_all`` in pages, decoding every event.

    Stops early (the warm-up, and every round of a quick run) once ``seconds`` have passed.
    """
    pool = await ctx.pool(1)
    store = EventStore(pool, EventCodec([MessageReceived]))
    async with pool.connection() as conn:
        pid = conn.info.backend_pid
    probe = CostProbe(ctx, [pid])
    await probe.start()
    start = time.perf_counter()
    count = 0
    after = START
    deadline = start + _round_seconds(ctx, seconds)
    while True:
        page = await store.read_all(after, PAGE)
        count += len(page)
        if len(page) < PAGE:
            _check_count(ctx, count)
            break
        if time.perf_counter() > deadline:
            break
        after = page[-1].checkpoint
    elapsed = time.perf_counter() - start
    details = await probe.stop(count)
    return Measurement(count / elapsed, "events/s", details)


async def reference_read_all(ctx: BenchContext, seconds: float) -> Measurement:
    """Keyset-scan the reference copy in pages, decoding each payload with msgspec.

    Stops early (the warm-up, and every round of a quick run) once ``seconds`` have passed.
    """
    pool = await ctx.pool(1)
    async with pool.connection() as conn:
        pid = conn.info.backend_pid
    probe = CostProbe(ctx, [pid])
    await probe.start()
    start = time.perf_counter()
    count = 0
    after = 0
    deadline = start + _round_seconds(ctx, seconds)
    params: dict[str, Any] = {"after": after, "limit": PAGE}
    while True:
        params["after"] = after
        async with pool.connection() as conn:
            rows = await (await conn.execute(_REF_PAGE, params)).fetchall()
        decoded = [_DECODERS.get(row[4], _GENERIC).decode(row[5]) for row in rows]
        count += len(decoded)
        if len(rows) < PAGE:
            _check_count(ctx, count)
            break
        if time.perf_counter() > deadline:
            break
        after = rows[-1][0]
    elapsed = time.perf_counter() - start
    details = await probe.stop(count)
    return Measurement(count / elapsed, "events/s", details)


async def _setup(ctx: BenchContext) -> None:
    await ensure_log(ctx)


def _check_count(ctx: BenchContext, count: int) -> None:
    expected = ctx.state.get("log_size")
    if expected is not None and count != expected:
        raise RuntimeError(f"read {count} events, but the log holds {expected}")


register(
    BenchPath(
        name="read_all_decode",
        description=(
            f"EventStore.read_all over the whole log in pages of {PAGE}, decoding every payload"
            " into a msgspec Struct (RecordedEvent objects); under --quick, for"
            f" {_QUICK_ROUND_SECONDS:g}s a round"
        ),
        run=store_read_all,
        reference=reference_read_all,
        reference_description=(
            f"keyset scan of a plain copy by primary key in pages of {PAGE},"
            " jsonb as raw bytes, msgspec-decoding the payload"
        ),
        target=0.8,
        setup=_setup,
        fixed_work=True,
    )
)
