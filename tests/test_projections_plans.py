"""The inbox and both recency queries are index range scans: no sort step, no sequential scan.

Checked with EXPLAIN of the exact statements :class:`InboxQueries` runs, on a read model of
120k conversations and 120k messages (filled in SQL, then analysed).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from conftest import create_database, drop_database

from eventstore import open_pool
from projections import PROJECTIONS, Applier, InboxQueries
from projections.bench import fill_inbox

ROWS = 120_000


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from nodes(child)


def check(plan: list[dict[str, Any]], index: str) -> None:
    """No sort and no sequential scan anywhere; the table is read through ``index``."""
    every = list(nodes(plan[0]["Plan"]))
    types = {node["Node Type"] for node in every}
    assert not types & {"Sort", "Incremental Sort", "Seq Scan", "Bitmap Heap Scan"}, types
    used = {node.get("Index Name") for node in every}
    assert index in used, used


@pytest.fixture(scope="module")
def plan_database(server_url: str, template_name: str) -> Iterator[str]:
    """One database for the module: filling 120k rows takes seconds, reading plans does not."""
    name = f"convstore_plans_{os.getpid()}"
    url = create_database(server_url, name, template=template_name)

    async def fill() -> None:
        pool = await open_pool(url, max_size=2)
        try:
            async with pool.connection() as conn:
                await Applier(pool, PROJECTIONS["inbox"], "rm_inbox").create(conn)
                await fill_inbox(conn, "rm_inbox", conversations=ROWS, messages=ROWS)
                row = await (
                    await conn.execute(
                        "SELECT (SELECT count(*) FROM rm_inbox.conversations),"
                        " (SELECT count(*) FROM rm_inbox.messages)"
                    )
                ).fetchone()
            assert row is not None and min(row) >= 100_000
        finally:
            await pool.close()

    asyncio.run(fill())
    yield url
    drop_database(server_url, name)


@pytest.fixture
async def filled(plan_database: str) -> AsyncIterator[InboxQueries]:
    pool = await open_pool(plan_database, max_size=2)
    try:
        yield InboxQueries(pool)
    finally:
        await pool.close()


async def test_inbox_pages_read_the_inbox_index_in_order(filled: InboxQueries) -> None:
    q = filled
    for status in ("open", "snoozed", "closed", "all", ["open", "closed"]):
        first = await q.inbox("conn-3", status, limit=50)
        assert first.next_cursor is not None
        check(await q.explain("inbox", "conn-3", status, limit=50), "conversations_inbox_idx")
        check(
            await q.explain("inbox", "conn-3", status, limit=50, cursor=first.next_cursor),
            "conversations_inbox_idx",
        )


async def test_a_contacts_conversations_read_the_contact_index(filled: InboxQueries) -> None:
    # A contact with many conversations. (For one with a handful, PostgreSQL may rather fetch
    # them all and sort those few rows, which is cheaper.)
    q = filled
    async with q.pool.connection() as conn:
        row = await (
            await conn.execute(
                "SELECT contact_id FROM rm_inbox.conversations GROUP BY 1"
                " ORDER BY count(*) DESC LIMIT 1"
            )
        ).fetchone()
    assert row is not None
    first = await q.contact_conversations(row[0], limit=2)
    assert first.next_cursor is not None
    for cursor in (None, first.next_cursor):
        plan = await q.explain("contact_conversations", row[0], limit=2, cursor=cursor)
        check(plan, "conversations_contact_idx")


async def test_a_conversations_messages_read_the_message_key(filled: InboxQueries) -> None:
    q = filled
    long_one = uuid.UUID(
        bytes=bytes.fromhex(__import__("hashlib").md5(b"conversation1").hexdigest())
    )
    first = await q.messages(long_one, limit=50)
    assert len(first.items) == 50 and first.next_cursor is not None
    for cursor in (None, first.next_cursor):
        check(await q.explain("messages", long_one, limit=50, cursor=cursor), "messages_pkey")
