"""Measurements of the projector and the inbox queries, for ``bench/`` to run.

- :func:`measure_catch_up`: a projector catching up over N events (synthetic traffic, bulk
  loaded), with the raw log read rate (:meth:`EventStore.read_all` over the same events, same
  batch size) measured in the same run as the reference.
- :func:`measure_inbox_query`: p50/p99 of inbox page queries (first pages and cursor pages,
  every status) over a read model of N conversations, filled by :func:`fill_inbox` in SQL.

Both take a database URL and create what they need in it: give them a scratch database.
``python -m projections.bench --events 1000000 --conversations 1000000`` runs both.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from typing import Any

import msgspec
import psycopg
from psycopg import sql

from conversations.events import CODEC
from eventstore import START, EventStore, migrate, open_pool

from .base import Projection
from .queries import InboxQueries
from .rebuild import build_into
from .registry import PROJECTIONS
from .runner import Applier
from .synthetic import copy_into_log, traffic

__all__ = [
    "CatchUpResult",
    "QueryLatency",
    "fill_inbox",
    "measure_catch_up",
    "measure_inbox_query",
]


class CatchUpResult(msgspec.Struct, frozen=True):
    """Events per second of a projector catching up, against the raw log read rate."""

    events: int
    batch_size: int
    raw_read_per_s: float
    catch_up_per_s: float

    @property
    def ratio(self) -> float:
        """Catch-up rate over raw read rate (1.0: projecting costs nothing over reading)."""
        return self.catch_up_per_s / self.raw_read_per_s if self.raw_read_per_s else 0.0


class QueryLatency(msgspec.Struct, frozen=True):
    """Latency of inbox page queries, in milliseconds."""

    conversations: int
    queries: int
    p50_ms: float
    p99_ms: float
    max_ms: float


async def measure_catch_up(
    url: str,
    events: int = 1_000_000,
    *,
    batch_size: int = 1000,
    seed: int = 0,
    projection: Projection | None = None,
) -> CatchUpResult:
    """Load ``events`` synthetic events (unless the log already holds that many), read them
    all once as the reference, then build the projection from scratch; both timed."""
    projection = projection or PROJECTIONS["inbox"]
    migrate(url)
    pool = await open_pool(url, max_size=4)
    try:
        async with pool.connection() as conn:
            row = await (await conn.execute("SELECT count(*) FROM events")).fetchone()
            stored = int(row[0]) if row else 0
            if stored < events:
                await copy_into_log(conn, list(traffic(events - stored, seed=seed)))
                await conn.execute("VACUUM ANALYZE events")
        reader = EventStore(pool, CODEC)
        started = time.perf_counter()
        read = 0
        checkpoint = START
        async with pool.connection() as conn:
            while batch := await reader.read_all(checkpoint, batch_size, connection=conn):
                read += len(batch)
                checkpoint = batch[-1].checkpoint
        raw = read / (time.perf_counter() - started)
        started = time.perf_counter()
        await build_into(pool, projection, "bench_catch_up", batch_size=batch_size, replace=True)
        elapsed = time.perf_counter() - started
        async with pool.connection() as conn:
            await conn.execute("DROP SCHEMA bench_catch_up CASCADE")
        return CatchUpResult(read, batch_size, raw, read / elapsed)
    finally:
        await pool.close()


async def fill_inbox(
    conn: psycopg.AsyncConnection[Any],
    schema: str,
    *,
    conversations: int,
    connections: int = 20,
    contacts: int | None = None,
    messages: int | None = None,
    merges: int | None = None,
) -> None:
    """Fill an (empty, created) inbox schema with synthetic rows straight in SQL.

    ``conversations`` rows over ``connections`` connections (30% open, 10% snoozed, a third
    of those run out, 60% closed, 2% deleted), owned by ``contacts`` contacts (default: one
    per three conversations) except 5% that belong to 50 heavy contacts; ``messages`` message
    rows (default: as many as conversations) spread over the first conversations, one in a
    hundred of them long; ``merges`` merged contacts, each into a heavy one. Deterministic:
    ids are derived from row numbers. Columns are named: a column added later needs a default
    (or a value here).
    """
    contacts = contacts or max(1, conversations // 3)
    messages = conversations if messages is None else messages
    merges = max(1, conversations // 10) if merges is None else merges
    t = {name: sql.Identifier(schema, name) for name in PROJECTIONS["inbox"].tables}
    params = {
        "n": conversations,
        "connections": connections,
        "contacts": contacts,
        "messages": messages,
        "merges": merges,
    }
    await conn.execute(
        sql.SQL(
            """
            INSERT INTO {conversations} (
                conversation_id, connection, channel, psid, contact_id, status, opened_at,
                closed_at, snoozed_until, deleted_at, last_message_at, last_message_id,
                last_message_preview, last_message_direction, last_activity_at, message_count,
                inbound_count, unread_count)
            SELECT md5('conversation' || i)::uuid, 'conn-' || (i %% %(connections)s),
                   'messenger', 'psid-' || i,
                   md5('contact' || CASE WHEN s.r < 5 THEN i %% 50
                                         ELSE i %% %(contacts)s END)::uuid,
                   s.status, opened,
                   CASE WHEN s.status = 'closed' THEN opened + interval '1 hour' END,
                   CASE WHEN s.status = 'snoozed' AND s.r %% 3 = 0
                        THEN timestamptz '2000-01-01' + i * interval '1 second'
                        WHEN s.status = 'snoozed' THEN timestamptz '2999-01-01' END,
                   CASE WHEN s.r %% 50 = 7 THEN opened + interval '2 hours' END,
                   last, md5('message' || i)::uuid, 'hello number ' || i, 'in', last,
                   1 + i %% 7, 1 + i %% 5, i %% 3
            FROM generate_series(1, %(n)s) AS i,
                 LATERAL (SELECT abs(hashint8(i)) %% 100 AS r) AS h,
                 LATERAL (SELECT CASE WHEN h.r < 30 THEN 'open'
                                      WHEN h.r < 40 THEN 'snoozed'
                                      ELSE 'closed' END AS status, h.r,
                                 timestamptz '2024-01-01' + i * interval '1 second' AS opened,
                                 timestamptz '2024-01-01' + i * interval '1 second'
                                     + (i::bigint * 7919 %% 86400) * interval '1 second'
                                     AS last) AS s
            """
        ).format(**t),
        params,
    )
    # Messages: 1 in 100 conversations gets many, the others one each, up to ``messages``.
    await conn.execute(
        sql.SQL(
            """
            INSERT INTO {messages} (
                conversation_id, stream_version, message_id, direction, inbound_number, text,
                attachments, sent_at, author, provider_message_id, edited_at)
            SELECT md5('conversation' || c)::uuid, v, md5('message' || c || '-' || v)::uuid,
                   CASE WHEN v %% 2 = 0 THEN 'out' ELSE 'in' END, (v + 1) / 2,
                   'message ' || v, NULL,
                   timestamptz '2024-01-01' + (c + v) * interval '1 second',
                   CASE WHEN v %% 2 = 0 THEN 'ann' END, 'p' || c || '-' || v, NULL
            FROM (SELECT i AS c, CASE WHEN i %% 100 = 1 THEN 200 ELSE 1 END AS k
                  FROM generate_series(1, %(n)s) AS i) AS per,
                 generate_series(1, per.k) AS v
            LIMIT %(messages)s
            """
        ).format(**t),
        params,
    )
    await conn.execute(
        sql.SQL(
            """
            INSERT INTO {contact_merges} (from_contact_id, into_contact_id, merged_at)
            SELECT md5('merged' || i)::uuid, md5('contact' || (i %% 50))::uuid,
                   timestamptz '2024-06-01'
            FROM generate_series(1, %(merges)s) AS i
            """
        ).format(**t),
        params,
    )
    await conn.execute(
        sql.SQL(
            "INSERT INTO {counts} (connection, status, conversations)"
            " SELECT connection, status, count(*) FROM {conversations}"
            " WHERE deleted_at IS NULL GROUP BY 1, 2"
        ).format(**t)
    )
    for table in t.values():
        await conn.execute(sql.SQL("VACUUM ANALYZE {}").format(table))


async def measure_inbox_query(
    url: str,
    conversations: int = 1_000_000,
    *,
    queries: int = 2000,
    page: int = 50,
    schema: str = "bench_inbox",
    seed: int = 0,
) -> QueryLatency:
    """p50/p99 of inbox pages over ``conversations`` rows (filled once, then reused).

    Each query picks a connection and a status (open, which merges two index ranges, most
    often) and either the first page or the page after a cursor met earlier.
    """
    migrate(url)
    pool = await open_pool(url, max_size=2)
    try:
        async with pool.connection() as conn:
            applier = Applier(pool, PROJECTIONS["inbox"], schema)
            state = await applier.state(conn)
            have = None
            if state is not None:
                row = await (
                    await conn.execute(
                        sql.SQL("SELECT count(*) FROM {}").format(
                            sql.Identifier(schema, "conversations")
                        )
                    )
                ).fetchone()
                have = int(row[0]) if row else 0
            if have != conversations:
                await conn.execute(
                    sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
                )
                await applier.create(conn)
                await fill_inbox(conn, schema, conversations=conversations)
        q = InboxQueries(pool, schema=schema)
        rng = random.Random(seed)
        cursors: list[tuple[str, str, str]] = []
        timings: list[float] = []
        for n in range(queries + 50):
            if cursors and rng.random() < 0.5:
                connection, status, cursor = rng.choice(cursors)
            else:
                connection = f"conn-{rng.randrange(20)}"
                status = rng.choice(("open", "open", "open", "snoozed", "closed", "all"))
                cursor = None
            started = time.perf_counter()
            result = await q.inbox(connection, status, limit=page, cursor=cursor)
            elapsed = time.perf_counter() - started
            if n >= 50:  # the first ones warm caches and prepare statements
                timings.append(elapsed * 1000)
            if result.next_cursor is not None and len(cursors) < 500:
                cursors.append((connection, status, result.next_cursor))
        timings.sort()
        return QueryLatency(
            conversations=conversations,
            queries=len(timings),
            p50_ms=statistics.median(timings),
            p99_ms=timings[int(len(timings) * 0.99) - 1],
            max_ms=timings[-1],
        )
    finally:
        await pool.close()


def main() -> None:
    """``python -m projections.bench``: run both measurements against ``--database-url``."""
    parser = argparse.ArgumentParser(prog="python -m projections.bench")
    parser.add_argument("--database-url", required=True, help="a scratch database")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--conversations", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=1000)
    args = parser.parse_args()
    catch = asyncio.run(
        measure_catch_up(args.database_url, args.events, batch_size=args.batch_size)
    )
    print(
        f"catch-up over {catch.events} events (batch {catch.batch_size}):"
        f" {catch.catch_up_per_s:,.0f} events/s; raw log read {catch.raw_read_per_s:,.0f}"
        f" events/s; ratio {catch.ratio:.2f}"
    )
    latency = asyncio.run(measure_inbox_query(args.database_url, args.conversations))
    print(
        f"inbox page at {latency.conversations} conversations ({latency.queries} queries):"
        f" p50 {latency.p50_ms:.2f} ms, p99 {latency.p99_ms:.2f} ms, max {latency.max_ms:.2f} ms"
    )


if __name__ == "__main__":
    main()
