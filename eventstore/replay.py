"""Replaying history: any slice of the global log, in its one stable order, in constant memory.

``replay`` pages through :meth:`EventStore.read_all` (so the order, the fence and the filters are
the store's own), holding one page at a time. ``replay_sync`` wraps it for notebooks and scripts:
it runs the async reader on a thread of its own (so it also works where an event loop is already
running, as in Jupyter) and hands pages over through a queue two pages deep.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import psycopg

from .codec import EventCodec
from .database import open_pool
from .errors import translate_errors
from .records import Checkpoint, RecordedEvent
from .store import EventStore

__all__ = ["RawCodec", "ReplayFilter", "checkpoint_of_position", "replay", "replay_sync"]

# Served by the BRIN index on position (sql/0007): positions grow with the table, and this is
# the only lookup by position alone, so a btree on it was not worth its cost to every append.
_CHECKPOINT_OF_POSITION = "SELECT transaction_id::text::bigint FROM events WHERE position = %s"


class RawCodec(EventCodec):
    """Leaves stored data as ``msgspec.Raw`` JSON: exports re-emit it without decoding."""

    def decode(self, type_name: str, data: bytes) -> Any:
        """The stored JSON, untouched."""
        return msgspec.Raw(data)


class ReplayFilter(msgspec.Struct, frozen=True):
    """Which slice of the log to replay; every field narrows it, ``None`` means no limit."""

    after: Checkpoint | None = None
    after_position: int | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    streams: tuple[str, ...] | None = None
    categories: tuple[str, ...] | None = None
    types: tuple[str, ...] | None = None


async def checkpoint_of_position(store: EventStore, position: int) -> Checkpoint:
    """The checkpoint of the event at ``position`` (replay continues after it)."""
    with translate_errors():
        async with store.pool.connection() as conn:
            row = await (await conn.execute(_CHECKPOINT_OF_POSITION, (position,))).fetchone()
    if row is None:
        raise ValueError(f"no event at position {position}")
    return Checkpoint(row[0], position)


async def replay(
    store: EventStore,
    where: ReplayFilter | None = None,
    *,
    page_size: int = 1000,
) -> AsyncIterator[RecordedEvent]:
    """Every event of the slice, in the global log's order, one page in memory at a time."""
    where = where or ReplayFilter()
    if where.after is not None and where.after_position is not None:
        raise ValueError("give either after (a checkpoint) or after_position, not both")
    after = where.after
    if where.after_position is not None:
        after = await checkpoint_of_position(store, where.after_position)
    while True:
        page = await store.read_all(
            after,
            page_size,
            categories=where.categories,
            types=where.types,
            streams=where.streams,
            since=where.since,
            until=where.until,
        )
        for event in page:
            yield event
        if len(page) < page_size:
            return
        after = page[-1].checkpoint


_DONE = object()


def replay_sync(
    database_url: str,
    where: ReplayFilter | None = None,
    *,
    codec: EventCodec | None = None,
    page_size: int = 1000,
) -> Iterator[RecordedEvent]:
    """:func:`replay` as a plain iterator, for notebooks and scripts."""
    pages: queue.Queue[Any] = queue.Queue(maxsize=2)
    stop = threading.Event()

    async def produce() -> None:
        pool = await open_pool(database_url, min_size=1, max_size=1)
        try:
            store = EventStore(pool, codec)
            page: list[RecordedEvent] = []
            async for event in replay(store, where, page_size=page_size):
                page.append(event)
                if len(page) >= page_size:
                    await asyncio.to_thread(pages.put, page)
                    page = []
                if stop.is_set():
                    return
            if page:
                await asyncio.to_thread(pages.put, page)
        finally:
            await pool.close()

    def run() -> None:
        try:
            asyncio.run(produce())
        except (Exception, psycopg.Error) as exc:  # handed to the consumer, raised there
            pages.put(exc)
            return
        pages.put(_DONE)

    thread = threading.Thread(target=run, name="convstore-replay", daemon=True)
    thread.start()
    try:
        while True:
            item = pages.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield from item
    finally:
        stop.set()
        # Unblock a producer waiting on a full queue, then let it finish.
        while thread.is_alive():
            try:
                pages.get(timeout=0.05)
            except queue.Empty:
                pass
