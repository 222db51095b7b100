"""The inbox as it stood at any moment, built by the daemon's own projection code.

``inbox_as_of`` finds the last checkpoint recorded by that moment, builds the inbox projection
from the start of the log up to it into temporary tables (``pg_temp``: private to one session,
gone with it), and runs the live model's queries against them with the clock set to that
moment (so a snooze that had not yet run out reads as snoozed). Nothing is a second
implementation: the handler and the queries are the ones the daemon and the API use.

"Recorded by T" is the prefix of the log up to the newest checkpoint whose ``recorded_at`` (its
transaction's start) is at or before T. The log is ordered by transaction id, which a
transaction takes at its first write, not at its start. So when a transaction that started
before T first wrote only later (it waited on a lock, say), the prefix up to its events also
holds those of every transaction that wrote before it, including ones that started after T:
the inbox as of T may then show what was recorded until that slow transaction wrote. (A prefix
cut at the first event recorded after T would be exact for committed work, but finding that
event means reading the log from its start: there is no index on ``recorded_at``.)
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from eventstore.errors import translate_errors
from eventstore.records import Checkpoint

from .queries import MAX_PAGE, Conversation, InboxQueries
from .rebuild import build_into
from .registry import get_projection

__all__ = ["checkpoint_at", "inbox_as_of"]


async def checkpoint_at(
    conn: psycopg.AsyncConnection[Any], moment: dt.datetime
) -> Checkpoint | None:
    """The newest checkpoint recorded at or before ``moment`` (``None``: the log was empty)."""
    if moment.tzinfo is None:
        raise ValueError("as-of time must be timezone-aware")
    row = await (
        await conn.execute(
            "SELECT transaction_id::text::bigint, position FROM events"
            " WHERE recorded_at <= %s"
            " ORDER BY events.transaction_id DESC, events.position DESC LIMIT 1",
            (moment,),
        )
    ).fetchone()
    return Checkpoint(row[0], row[1]) if row else None


async def inbox_as_of(
    pool: AsyncConnectionPool[Any],
    connection: str,
    *,
    as_of: dt.datetime | None = None,
    status: str | Sequence[str] = "open",
) -> list[Conversation]:
    """A connection's inbox (every page) as of ``as_of``; the live model when ``None``."""
    if as_of is None:
        return await _all_pages(InboxQueries(pool), connection, status, None, None)
    with translate_errors():
        async with pool.connection() as conn:
            until = await checkpoint_at(conn, as_of)
            if until is None:
                return []
            try:
                await build_into(
                    pool,
                    get_projection("inbox"),
                    "pg_temp",
                    conn=conn,
                    until=until,
                    replace=True,
                )
                queries = InboxQueries(pool, schema="pg_temp")
                return await _all_pages(queries, connection, status, as_of, conn)
            finally:
                # The pool hands this session to others: leave no temporary tables behind.
                await conn.execute("DISCARD TEMP")


async def _all_pages(
    queries: InboxQueries,
    connection: str,
    status: str | Sequence[str],
    now: dt.datetime | None,
    conn: psycopg.AsyncConnection[Any] | None,
) -> list[Conversation]:
    rows: list[Conversation] = []
    cursor: str | None = None
    while True:
        page = await queries.inbox(
            connection, status, limit=MAX_PAGE, cursor=cursor, now=now, conn=conn
        )
        rows.extend(page.items)
        cursor = page.next_cursor
        if cursor is None:
            return rows
