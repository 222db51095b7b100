"""Races on real concurrent connections: optimistic writers, out-of-order commits, readers.

(a) Writers racing on the same streams with exact expected versions lose no event and leave no
    gap. (b) A subscriber following the global log while transactions commit out of order (random
    sleeps, rollbacks) receives every committed event exactly once, in the log's one order.
(c) The naive reader that follows ``position`` alone provably skips an event in that situation,
    which is what (b) would catch if the store read that way.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, cast

import msgspec
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from eventstore import (
    ANY,
    NO_STREAM,
    START,
    STREAM_EXISTS,
    EventStore,
    ExpectedVersion,
    NewEvent,
    RecordedEvent,
    WrongExpectedVersion,
    uuid7,
)
from eventstore.database import RawJsonLoader, connect_kwargs, open_pool

pytestmark = pytest.mark.slow

WAIT = 45.0  # seconds: the most any test here waits for anything


def ev(**data: Any) -> NewEvent:
    return NewEvent(event_id=uuid7(), type="Raced", data=msgspec.json.encode(data))


@contextlib.asynccontextmanager
async def connect(url: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A connection of its own, set up like the store's (autocommit until a transaction)."""
    conn = await psycopg.AsyncConnection.connect(url, **connect_kwargs())
    conn.adapters.register_loader("jsonb", RawJsonLoader)
    try:
        yield conn
    finally:
        await conn.close()


async def settled(store: EventStore) -> None:
    """Wait until the cluster-wide snapshot fence has passed every stored event."""
    async with asyncio.timeout(WAIT):
        while True:
            async with store.pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT pg_snapshot_xmin(pg_current_snapshot())"
                    " > coalesce(max(transaction_id), '0'::xid8) FROM events"
                )
                row = await cur.fetchone()
            if row is not None and row[0]:
                return
            await asyncio.sleep(0.01)


async def read_everything(store: EventStore, page: int = 500) -> list[RecordedEvent]:
    """The whole log from START, page by page, as a fresh reader would see it."""
    await settled(store)
    events: list[RecordedEvent] = []
    checkpoint = START
    while batch := await store.read_all(checkpoint, page):
        events.extend(batch)
        checkpoint = batch[-1].checkpoint
    return events


# ------------------------------------------------------------------------ (a) optimistic writers

WRITERS = 32
STREAMS = 8
APPENDS_PER_WRITER = 8


async def test_racing_writers_with_exact_versions_lose_nothing(database_url: str) -> None:
    pool = await open_pool(database_url, min_size=4, max_size=WRITERS)
    store = EventStore(pool)
    appended: dict[str, list[list[uuid.UUID]]] = {f"race-{s}": [] for s in range(STREAMS)}
    conflicts = 0

    async def writer(number: int) -> None:
        nonlocal conflicts
        rng = random.Random(number)
        stream = f"race-{number % STREAMS}"
        for i in range(APPENDS_PER_WRITER):
            batch = [ev(writer=number, append=i, n=j) for j in range(rng.randint(1, 3))]
            expected = await store.stream_version(stream)
            while True:
                try:
                    result = await store.append(stream, batch, expected)
                except WrongExpectedVersion as conflict:
                    conflicts += 1
                    assert conflict.stream_id == stream
                    assert conflict.expected == expected
                    # The stream only grows, and the conflict says where it is now.
                    assert conflict.actual > expected
                    expected = conflict.actual
                    continue
                assert result.version == expected + len(batch)
                appended[stream].append([e.event_id for e in batch])
                break

    try:
        async with asyncio.timeout(WAIT):
            await asyncio.gather(*(writer(n) for n in range(WRITERS)))
        total = 0
        for stream, batches in appended.items():
            recorded = await store.read_stream(stream)
            count = sum(len(b) for b in batches)
            total += count
            # Contiguous versions 1..N, N being what the writers were told they appended.
            assert [e.stream_version for e in recorded] == list(range(1, count + 1))
            assert await store.stream_version(stream) == count
            # Every batch landed whole, in order, at consecutive versions.
            position_of = {e.event_id: e.stream_version for e in recorded}
            assert len(position_of) == count
            for batch in batches:
                versions = [position_of[i] for i in batch]
                assert versions == list(range(versions[0], versions[0] + len(batch)))
        log = await read_everything(store)
        assert len(log) == total
        assert len({e.event_id for e in log}) == total
        # Four writers per stream cannot all have won every race.
        assert conflicts > 0
    finally:
        await store.close()
        await pool.close()


@pytest.mark.parametrize("expected", [NO_STREAM, 0, ANY, 3], ids=lambda e: f"expected-{e!r}")
async def test_concurrent_retries_of_one_batch_store_it_once(
    database_url: str, expected: ExpectedVersion | int
) -> None:
    """Redeliveries racing each other all get the one original result; nothing is doubled."""
    pool = await open_pool(database_url, min_size=4, max_size=12)
    store = EventStore(pool)
    try:
        if expected == 3:
            await store.append("dup-1", [ev(n=n) for n in range(3)])
        batch = [ev(n=n) for n in range(3)]
        async with asyncio.timeout(WAIT):
            results = await asyncio.gather(
                *(store.append("dup-1", batch, expected) for _ in range(12))
            )
        assert len(set(results)) == 1
        recorded = await store.read_stream("dup-1")
        base = 3 if expected == 3 else 0
        assert [e.event_id for e in recorded[base:]] == [e.event_id for e in batch]
        assert results[0].version == base + 3 == await store.stream_version("dup-1")
        assert len(await read_everything(store)) == base + 3
    finally:
        await store.close()
        await pool.close()


@pytest.mark.parametrize("mode", [ANY, STREAM_EXISTS], ids=lambda m: f"expected-{m!r}")
async def test_any_and_stream_exists_appends_racing_on_one_stream_never_conflict(
    database_url: str, mode: ExpectedVersion
) -> None:
    """Versions come from the (stream, version) unique index: racers that read the same
    version collide on it, and these modes retry until each batch lands whole."""
    pool = await open_pool(database_url, min_size=4, max_size=WRITERS)
    store = EventStore(pool)
    try:
        await store.append("crowd-1", [ev(n=-1)], NO_STREAM)
        batches = [[ev(writer=w, n=n) for n in range(1 + w % 3)] for w in range(WRITERS)]
        async with asyncio.timeout(WAIT):
            await asyncio.gather(*(store.append("crowd-1", b, mode) for b in batches))
        recorded = await store.read_stream("crowd-1")
        count = 1 + sum(len(b) for b in batches)
        assert [e.stream_version for e in recorded] == list(range(1, count + 1))
        version_of = {e.event_id: e.stream_version for e in recorded}
        for batch in batches:
            versions = [version_of[e.event_id] for e in batch]
            assert versions == list(range(versions[0], versions[0] + len(batch)))
    finally:
        await store.close()
        await pool.close()


async def test_an_exact_append_that_loses_a_race_in_a_transaction_is_a_conflict(
    database_url: str,
) -> None:
    """The loser waits for the winner's uncommitted version, then fails on it: its own
    transaction is aborted, and the error says the stream is past the expected version."""
    pool = await open_pool(database_url, min_size=2, max_size=4)
    store = EventStore(pool)
    try:
        await store.append("duel-1", [ev(n=0)], NO_STREAM)
        async with connect(database_url) as winner, connect(database_url) as loser:
            # Transactions by hand: the winner must commit while the loser's append waits.
            await winner.execute("BEGIN")
            await store.append("duel-1", [ev(n="winner")], 1, connection=winner)
            await loser.execute("BEGIN")
            lost = asyncio.create_task(store.append("duel-1", [ev(n="loser")], 1, connection=loser))
            await asyncio.sleep(0.3)
            assert not lost.done()  # it waits for the winner's index entry
            await winner.execute("COMMIT")
            with pytest.raises(WrongExpectedVersion) as conflict:
                await lost
            assert (conflict.value.expected, conflict.value.actual) == (1, 2)
            await loser.execute("ROLLBACK")
        assert [e.data for e in await store.read_stream("duel-1")] == [
            {"n": 0},
            {"n": "winner"},
        ]
    finally:
        await store.close()
        await pool.close()


# ---------------------------------------------------------------------------- (b) no skipping

TX_WRITERS = 16
TX_PER_WRITER = 10
ROLLBACK_RATE = 0.1


class Rollback(Exception):
    """A deliberate rollback of a writer's transaction."""


async def _sleep_in(conn: psycopg.AsyncConnection[Any], rng: random.Random) -> None:
    await conn.execute("SELECT pg_sleep(%s)", (rng.uniform(0.0, 0.03),))


async def test_a_subscriber_receives_every_committed_event_once_in_log_order(
    database_url: str,
) -> None:
    pool = await open_pool(database_url, min_size=2, max_size=8)
    store = EventStore(pool)
    committed: list[uuid.UUID] = []
    rolled_back: list[uuid.UUID] = []
    sentinel = ev(sentinel=True)
    received: list[RecordedEvent] = []

    async def subscriber() -> None:
        # Small pages and a short poll, so it reads many times while writers are in flight.
        sub = cast(
            AsyncGenerator[RecordedEvent, None],
            store.subscribe(batch_size=7, poll_interval=0.02),
        )
        async with contextlib.aclosing(sub):
            async for event in sub:
                received.append(event)
                if event.event_id == sentinel.event_id:
                    return

    async def writer(number: int) -> None:
        rng = random.Random(1000 + number)
        async with connect(database_url) as conn:
            for t in range(TX_PER_WRITER):
                stream = f"tx-{rng.randrange(TX_WRITERS // 2)}"
                first = [ev(writer=number, tx=t, n=j) for j in range(rng.randint(1, 2))]
                second = [ev(writer=number, tx=t, n=9)]
                roll_back = rng.random() < ROLLBACK_RATE
                try:
                    async with conn.transaction():
                        await _sleep_in(conn, rng)
                        await store.append(stream, first, ANY, connection=conn)
                        await _sleep_in(conn, rng)
                        await store.append(stream, second, ANY, connection=conn)
                        await _sleep_in(conn, rng)
                        if roll_back:
                            raise Rollback
                except Rollback:
                    rolled_back.extend(e.event_id for e in first + second)
                else:
                    committed.extend(e.event_id for e in first + second)
                    store.wake_subscribers()

    try:
        async with asyncio.timeout(WAIT):
            following = asyncio.create_task(subscriber())
            await asyncio.gather(*(writer(n) for n in range(TX_WRITERS)))
            await store.append("tx-sentinel", [sentinel], NO_STREAM)
            await following
        assert rolled_back, "the scenario is meant to include rollbacks"
        got = [e.event_id for e in received[:-1]]
        assert received[-1].event_id == sentinel.event_id
        # Exactly once: nothing doubled, nothing missing, nothing rolled back.
        duplicates = [i for i, n in Counter(got).items() if n > 1]
        assert duplicates == []
        assert set(got) == set(committed)
        assert set(got).isdisjoint(rolled_back)
        # The order it received is the log's one order, as a fresh reader reads it.
        again = await read_everything(store, page=50)
        assert again == received
        # The scenario did commit out of position order: some transaction's events are not
        # adjacent in position (another transaction took a position in between).
        positions_by_tx: dict[int, list[int]] = {}
        for event in again:
            positions_by_tx.setdefault(event.checkpoint.transaction_id, []).append(event.position)
        assert any(p[-1] - p[0] + 1 > len(p) for p in positions_by_tx.values())
    finally:
        await store.close()
        await pool.close()


# ---------------------------------------------------------------------------- (c) naive reader


class NaiveReader:
    """Follows ``position`` alone: SELECT ... WHERE position > last ORDER BY position."""

    def __init__(self) -> None:
        self.last = 0
        self.seen: list[uuid.UUID] = []

    async def poll(self, pool: AsyncConnectionPool[Any]) -> None:
        async with pool.connection() as conn:
            cur = await conn.execute(
                "SELECT position, event_id FROM events WHERE position > %s ORDER BY position",
                (self.last,),
            )
            for position, event_id in await cur.fetchall():
                self.seen.append(event_id)
                self.last = position


async def test_a_reader_following_positions_skips_an_out_of_order_commit(
    store: EventStore, pool: AsyncConnectionPool[Any], database_url: str
) -> None:
    naive = NaiveReader()
    fenced: list[RecordedEvent] = []
    slow, fast = ev(writer="A"), ev(writer="B")
    async with asyncio.timeout(WAIT), connect(database_url) as conn:
        async with conn.transaction():
            # Writer A takes the lower position and keeps its transaction open...
            held = await store.append("chat-a", [slow], NO_STREAM, connection=conn)
            # ...while writer B takes a higher position and commits.
            done = await store.append("chat-b", [fast], NO_STREAM)
            assert held.positions[0] < done.positions[0]
            await naive.poll(pool)
            assert naive.seen == [fast.event_id]  # it has read past A's position
            fenced.extend(await store.read_all(START))
            assert fenced == []  # the fence holds B back while A may still commit
        # A commits.
        await naive.poll(pool)
        await settled(store)
        fenced.extend(await store.read_all(START))
    # The naive reader never sees A's committed event; the fenced reader sees both, A first.
    assert slow.event_id not in naive.seen
    assert [e.event_id for e in fenced] == [slow.event_id, fast.event_id]
    assert [e.event_id for e in await store.read_stream("chat-a")] == [slow.event_id]
