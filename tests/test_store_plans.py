"""The global log's hot queries use their index, with no sort, on a table of 100k events."""

from __future__ import annotations

import json
from typing import Any

from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from eventstore import Checkpoint, EventStore
from eventstore.store import _HEAD, _LogFilter


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found = [plan]
    for child in plan.get("Plans", []):
        found.extend(_nodes(child))
    return found


async def test_read_all_and_head_scan_the_global_order_index(
    pool: AsyncConnectionPool[Any], store: EventStore
) -> None:
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO events (event_id, stream_id, stream_version, category, type, data)"
            " SELECT gen_random_uuid(), 'bulk-' || (n / 10), n % 10 + 1, 'bulk', 'Bulk',"
            " jsonb_build_object('n', n, 'pad', repeat('x', 200))"
            " FROM generate_series(0, 99999) AS n"
        )
        await conn.execute("ANALYZE events")
        checks: list[tuple[sql.Composable, dict[str, Any]]] = [
            store._read_all_query(after, 1000, _LogFilter(None, None, None, None, None, False))
            for after in (Checkpoint(0, 0), Checkpoint(2**40, 5))
        ]
        checks.append((sql.SQL(_HEAD), {}))
        for query, params in checks:
            cur = await conn.execute(sql.SQL("EXPLAIN (FORMAT JSON) ") + query, params)
            row = await cur.fetchone()
            assert row is not None
            plan = json.loads(row[0])[0]["Plan"]
            nodes = _nodes(plan)
            types = [n["Node Type"] for n in nodes]
            assert "Sort" not in types and "Seq Scan" not in types, types
            assert any(n.get("Index Name") == "events_global_order_idx" for n in nodes), types
