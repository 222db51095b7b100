"""Time travel: the inbox as of a past moment equals the live model as it was at that moment."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from psycopg_pool import AsyncConnectionPool

from conversations.connections import add_connection
from conversations.events import CODEC
from conversations.service import ConversationService, InboundMessage
from eventstore import EventStore
from projections import PROJECTIONS, InboxQueries, catch_up
from projections.timetravel import inbox_as_of

ROOT = Path(__file__).resolve().parent.parent
BASE = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)


async def _live(pool: AsyncConnectionPool[Any], status: str, now: dt.datetime) -> list[Any]:
    queries = InboxQueries(pool)
    rows: list[Any] = []
    cursor = None
    while True:
        page = await queries.inbox("fb", status, limit=3, cursor=cursor, now=now)
        rows.extend(page.items)
        if page.next_cursor is None:
            return rows
        cursor = page.next_cursor


async def test_inbox_as_of_earlier_moment_equals_the_copy_taken_then(
    pool: AsyncConnectionPool[Any], database_url: str
) -> None:
    service = ConversationService(EventStore(pool, CODEC))
    await add_connection(pool, "fb", channel="messenger", external_id="page-1")
    first = []
    for n in range(8):
        first.append(
            await service.receive_inbound(
                "fb", f"c{n}", InboundMessage(f"m{n}", BASE + dt.timedelta(minutes=n), f"hi {n}")
            )
        )
    await service.snooze(
        first[0].conversation_id, by="a", until=dt.datetime(2099, 1, 1, tzinfo=dt.UTC)
    )
    await service.close(first[1].conversation_id, by="a")
    await catch_up(pool, list(PROJECTIONS.values()))
    await asyncio.sleep(0.05)
    moment = dt.datetime.now(dt.UTC)
    copies = {s: await _live(pool, s, moment) for s in ("open", "snoozed", "closed", "all")}
    assert len(copies["all"]) == 8 and len(copies["closed"]) == 1 and len(copies["snoozed"]) == 1
    await asyncio.sleep(0.05)

    # History moves on: closes, replies, new customers, a delete.
    for n in range(2, 5):
        await service.close(first[n].conversation_id, by="a")
    # An update tag: these customers wrote more than Messenger's 24-hour window ago.
    await service.reply(
        first[5].conversation_id, by="a", text="ok", idempotency_key="k", tag="ACCOUNT_UPDATE"
    )
    await service.delete(first[6].conversation_id, by="a")
    for n in range(8, 11):
        await service.receive_inbound("fb", f"c{n}", InboundMessage(f"m{n}", BASE, f"hi {n}"))
    await catch_up(pool, list(PROJECTIONS.values()))

    for status, copy in copies.items():
        assert await inbox_as_of(pool, "fb", as_of=moment, status=status) == copy, status
    now = dt.datetime.now(dt.UTC)
    for status in ("open", "snoozed", "closed", "all"):
        live = await _live(pool, status, now)
        assert await inbox_as_of(pool, "fb", as_of=now, status=status) == live, status
    assert await inbox_as_of(pool, "fb", as_of=BASE.replace(year=2000)) == []
    # temporary tables never leak into the pool's sessions
    async with pool.connection() as conn:
        row = await (
            await conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname LIKE 'pg_temp%'")
        ).fetchone()
    assert row is not None and row[0] == 0

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "handlers.cli", "inbox", "--connection", "fb", *args],
            env={**os.environ, "DATABASE_URL": database_url},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )

    done = await asyncio.to_thread(cli, "--as-of", moment.isoformat(), "--status", "all", "--json")
    assert done.returncode == 0, done.stderr
    ids = [row["conversation_id"] for row in json.loads(done.stdout)]
    assert ids == [str(c.conversation_id) for c in copies["all"]]
    table = await asyncio.to_thread(cli, "--status", "open,snoozed")
    assert table.returncode == 0, table.stderr
    assert "conversations" in table.stdout.splitlines()[0]
