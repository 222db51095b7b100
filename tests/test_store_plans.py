"""The global log's queries use their index, with no sort, on a table of 100k events; the exact
append reads a stream's state through the partial index of inactive streams."""

from __future__ import annotations

import json
from typing import Any

from psycopg import AsyncConnection, sql
from psycopg_pool import AsyncConnectionPool

from bench.explain import _ordered_values
from eventstore import Checkpoint, EventStore, NewEvent
from eventstore.ids import uuid7
from eventstore.replay import _CHECKPOINT_OF_POSITION, checkpoint_of_position
from eventstore.store import _HEAD, _LogFilter


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found = [plan]
    for child in plan.get("Plans", []):
        found.extend(_nodes(child))
    return found


async def _fill(conn: AsyncConnection[Any]) -> None:
    """100k events in 2000 transactions, analysed.

    Appends commit one by one, so nearly every event has a transaction id of its own, which a
    scan of the primary key cannot skip through (PostgreSQL 18 skip-scans an index whose
    leading column has few values).
    """
    await conn.execute(
        "DO $$ BEGIN FOR t IN 0..1999 LOOP"
        " INSERT INTO events (event_id, stream_id, stream_version, category, type, data)"
        " SELECT gen_random_uuid(), 'bulk-' || t || '-' || (n / 10), n % 10 + 1, 'bulk',"
        " 'Bulk', jsonb_build_object('n', n, 'pad', repeat('x', 200))"
        " FROM generate_series(0, 49) AS n; COMMIT; END LOOP; END $$"
    )
    await conn.execute("VACUUM ANALYZE events")


async def _plan(
    conn: AsyncConnection[Any], query: sql.Composable, params: Any
) -> list[dict[str, Any]]:
    """The nodes of the plan PostgreSQL chooses for ``query``."""
    cur = await conn.execute(sql.SQL("EXPLAIN (FORMAT JSON) ") + query, params)
    row = await cur.fetchone()
    assert row is not None
    return _nodes(json.loads(row[0])[0]["Plan"])


async def test_read_all_and_head_scan_the_global_order_index(
    pool: AsyncConnectionPool[Any], store: EventStore
) -> None:
    async with pool.connection() as conn:
        await _fill(conn)
        checks: list[tuple[sql.Composable, dict[str, Any]]] = [
            store._read_all_query(after, 1000, _LogFilter(None, None, None, None, None, False))
            for after in (Checkpoint(0, 0), Checkpoint(2**40, 5))
        ]
        checks.append((sql.SQL(_HEAD), {}))
        for query, params in checks:
            nodes = await _plan(conn, query, params)
            types = [n["Node Type"] for n in nodes]
            assert "Sort" not in types and "Seq Scan" not in types, types
            assert any(n.get("Index Name") == "events_pkey" for n in nodes), types


async def test_a_position_is_found_through_its_brin_index(
    pool: AsyncConnectionPool[Any], store: EventStore
) -> None:
    # The primary key is the global order, so a lookup by position alone has only the BRIN
    # index: without it this would scan the whole table or the whole primary key.
    async with pool.connection() as conn:
        await _fill(conn)
        row = await (
            await conn.execute(
                "SELECT position, transaction_id::text::bigint FROM events"
                " ORDER BY position OFFSET 77777 LIMIT 1"
            )
        ).fetchone()
        assert row is not None
        position, transaction_id = row
        nodes = await _plan(conn, sql.SQL(_CHECKPOINT_OF_POSITION), (position,))
        types = [n["Node Type"] for n in nodes]
        assert "Seq Scan" not in types, types
        assert any(n.get("Index Name") == "events_position_brin" for n in nodes), types
    assert await checkpoint_of_position(store, position) == Checkpoint(transaction_id, position)


async def test_an_exact_append_reads_the_state_through_the_inactive_streams_index(
    pool: AsyncConnectionPool[Any], store: EventStore
) -> None:
    # The exact append's hot probe: on a streams table of 20k rows, some of them inactive, its
    # custom and its generic plan both ask streams_inactive_idx, never the primary key (whose
    # lookup descends the whole text index and fetches the row).
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO streams (stream_id, category, state)"
            " SELECT 'conv-' || n, 'conv', CASE WHEN n % 50 = 0 THEN 'archived' ELSE 'active' END"
            " FROM generate_series(1, 20000) AS n"
        )
        await conn.execute(
            "INSERT INTO events (event_id, stream_id, stream_version, category, type, data)"
            " SELECT gen_random_uuid(), 'conv-' || n, 1, 'conv', 'Opened', '{}'"
            " FROM generate_series(1, 20000) AS n"
        )
        await conn.execute("ANALYZE streams")
        await conn.execute("ANALYZE events")
        event = NewEvent(uuid7(), "Noted", b'{"n": 1}')
        # Expected version 7 does not hold, so preparing the statement inserts nothing.
        query, params = store._append_query("conv-123", [event], 7)
        plans = [await _plan(conn, sql.SQL(query), params)]
        await conn.execute(query, params, prepare=True)
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        try:
            name = await (
                await conn.execute(
                    "SELECT name FROM pg_prepared_statements ORDER BY prepare_time DESC LIMIT 1"
                )
            ).fetchone()
            assert name is not None
            values = _ordered_values(query, params)
            execute = sql.SQL("EXECUTE {}({})").format(
                sql.Identifier(name[0]), sql.SQL(", ").join(map(sql.Literal, values))
            )
            plans.append(await _plan(conn, execute, None))
        finally:
            await conn.execute("RESET plan_cache_mode")
    for nodes in plans:
        indexes = [n.get("Index Name") for n in nodes if "Index Name" in n]
        assert "streams_inactive_idx" in indexes, indexes
        assert "streams_pkey" not in indexes, indexes
        assert "Seq Scan" not in [n["Node Type"] for n in nodes]
    assert await store.stream_version("conv-123") == 1
