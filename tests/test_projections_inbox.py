"""The inbox read model: what each event does to the rows, and the queries over them.

Events are appended straight to the store (the domain's commands are tested elsewhere); the
projection runs in-process until it has reached the newest event.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import uuid
from collections.abc import Sequence
from typing import Any

import msgspec
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from conversations.events import (
    CODEC,
    Attachment,
    ContactsMerged,
    ConversationClosed,
    ConversationDeleted,
    ConversationOpened,
    ConversationReopened,
    ConversationRestored,
    ConversationSnoozed,
    ConversationUnsnoozed,
    MessageEdited,
    MessageReceived,
    MessageSent,
    MessagesRead,
    contact_stream,
    conversation_stream,
)
from eventstore import START, Checkpoint, EventStore, RecordedEvent, open_pool, uuid7
from projections import (
    PROJECTIONS,
    Conversation,
    InboxQueries,
    InvalidQuery,
    ReadModelMissing,
    StatusCounts,
    build_into,
    catch_up,
    compare_read_models,
)
from projections.inbox import _Memory
from projections.runner import Applier, log_head
from projections.synthetic import append_all, copy_into_log, traffic

INBOX = PROJECTIONS["inbox"]
T0 = dt.datetime(2026, 3, 1, 9, 0, tzinfo=dt.UTC)


def at(minutes: float) -> dt.datetime:
    return T0 + dt.timedelta(minutes=minutes)


async def emit(store: EventStore, stream: str, *payloads: msgspec.Struct) -> None:
    await store.append(stream, [CODEC.new_event(p) for p in payloads])


async def project(pool: AsyncConnectionPool[Any]) -> None:
    outcomes = await catch_up(pool, [INBOX], timeout=30)
    assert outcomes == {"inbox": "caught-up"}


class Chat:
    """One conversation's stream, with helpers that remember its messages."""

    def __init__(self, store: EventStore, connection: str = "fb", contact: uuid.UUID | None = None):
        self.store = store
        self.id = uuid7()
        self.stream = conversation_stream(self.id)
        self.connection = connection
        self.contact = contact or uuid7()

    async def open(self, when: dt.datetime, psid: str = "p1") -> None:
        opened = ConversationOpened(self.id, self.connection, "messenger", psid, self.contact, when)
        await emit(self.store, self.stream, opened)

    async def customer(self, text: str | None, when: dt.datetime, **kw: Any) -> uuid.UUID:
        mid = uuid7()
        message = MessageReceived(self.id, mid, "messenger", f"m-{mid}", text, when, when, **kw)
        await emit(self.store, self.stream, message)
        return mid

    async def agent(self, text: str, when: dt.datetime) -> uuid.UUID:
        mid = uuid7()
        await emit(self.store, self.stream, MessageSent(self.id, mid, text, when, "ann"))
        return mid

    async def then(self, *payloads: msgspec.Struct) -> None:
        await emit(self.store, self.stream, *payloads)


async def test_the_row_follows_every_event(
    pool: AsyncConnectionPool[Any], store: EventStore
) -> None:
    q = InboxQueries(pool)
    chat = Chat(store)
    await chat.open(at(0))
    m1 = await chat.customer("Hello,\n  is my   order shipped?", at(1))
    await chat.customer(None, at(2), attachments=(Attachment("image", url="https://x/1.jpg"),))
    await project(pool)
    row = await q.conversation(chat.id)
    assert row is not None
    assert (row.connection, row.channel, row.psid, row.contact_id) == (
        "fb",
        "messenger",
        "p1",
        chat.contact,
    )
    assert (row.status, row.message_count, row.unread_count) == ("open", 2, 2)
    assert row.last_message_preview == "[image]"
    assert (row.last_message_direction, row.last_message_at) == ("in", at(2))
    assert row.opened_at == at(0) and row.last_activity_at == at(2)

    m3 = await chat.agent("It is on its way", at(3))
    await chat.then(MessagesRead(chat.id, "ann", m1, at(4)))
    await project(pool)
    row = await q.conversation(chat.id)
    assert row is not None
    assert (row.message_count, row.unread_count) == (3, 1)  # the image came after m1
    assert (row.last_message_direction, row.last_message_preview) == ("out", "It is on its way")

    m4 = await chat.customer("thanks", at(5))
    await chat.then(MessagesRead(chat.id, "ann", m3, at(6)))  # m4 arrived after the read mark
    await project(pool)
    row = await q.conversation(chat.id)
    assert row is not None and row.unread_count == 1
    await chat.then(MessagesRead(chat.id, "ann", m4, at(7)))
    await chat.then(MessageEdited(chat.id, m4, "pm4", "thanks a lot", at(8)))
    await project(pool)
    row = await q.conversation(chat.id)
    assert row is not None
    assert (row.unread_count, row.last_message_preview) == (0, "thanks a lot")
    newest = (await q.messages(chat.id, limit=1)).items[0]
    assert (newest.message_id, newest.text, newest.edited_at) == (m4, "thanks a lot", at(8))

    # Snoozed until a time: hidden from open until then, open afterwards.
    await chat.then(ConversationSnoozed(chat.id, "ann", at(9), until=at(60)))
    await project(pool)
    before, after = at(30), at(61)
    assert [c.conversation_id for c in (await q.inbox("fb", "snoozed", now=before)).items] == [
        chat.id
    ]
    assert (await q.inbox("fb", "open", now=before)).items == []
    late = (await q.inbox("fb", "open", now=after)).items
    assert [(c.conversation_id, c.status) for c in late] == [(chat.id, "open")]
    assert (await q.inbox("fb", "snoozed", now=after)).items == []
    assert (await q.counts("fb", now=before))[0].snoozed == 1
    assert (await q.counts("fb", now=after))[0].open == 1

    # Until the next customer message (the domain unsnoozes with that message).
    await chat.then(ConversationUnsnoozed(chat.id, "ann", at(10)))
    await chat.then(ConversationSnoozed(chat.id, "ann", at(11), until=None))
    await project(pool)
    assert [c.status for c in (await q.inbox("fb", "snoozed", now=after)).items] == ["snoozed"]
    await chat.then(ConversationUnsnoozed(chat.id, "customer", at(12)))
    await project(pool)
    row = await q.conversation(chat.id)
    assert row is not None and (row.status, row.snoozed_until) == ("open", None)

    await chat.then(ConversationClosed(chat.id, "ann", at(13)))
    await project(pool)
    closed = (await q.inbox("fb", "closed")).items
    assert [(c.conversation_id, c.closed_at) for c in closed] == [(chat.id, at(13))]
    assert (await q.counts("fb"))[0] == (await q.counts())[0]
    assert (await q.counts("fb"))[0].closed == 1

    await chat.then(ConversationReopened(chat.id, "ann", at(14)))
    await project(pool)
    row = await q.conversation(chat.id)
    assert row is not None and (row.status, row.closed_at) == ("open", None)

    # Soft delete hides it from every list and count; restore brings it back.
    await chat.then(
        ConversationClosed(chat.id, "ann", at(15), "deleted"),
        ConversationDeleted(chat.id, "ann", at(15)),
    )
    await project(pool)
    assert (await q.inbox("fb", "all")).items == []
    assert (await q.contact_conversations(chat.contact)).items == []
    counts = await q.counts("fb")
    assert (counts[0].open, counts[0].snoozed, counts[0].closed) == (0, 0, 0)
    row = await q.conversation(chat.id)
    assert row is not None and row.deleted_at == at(15)
    await chat.then(ConversationRestored(chat.id, "ann", at(16)))
    await project(pool)
    assert [c.status for c in (await q.inbox("fb", "all")).items] == ["closed"]
    assert (await q.messages(chat.id)).items[-1].message_id == m1


async def test_inbox_pages_cover_every_row_once_newest_first(
    pool: AsyncConnectionPool[Any], store: EventStore
) -> None:
    await append_all(store, list(traffic(2500, seed=11, connections=3)))
    await project(pool)
    q = InboxQueries(pool)
    now = dt.datetime(2024, 1, 2, tzinfo=dt.UTC)  # after some snoozes of the traffic ended
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT connection,"
            " CASE WHEN status = 'snoozed' AND snoozed_until <= %s THEN 'open' ELSE status END,"
            " count(*) FROM rm_inbox.conversations WHERE deleted_at IS NULL GROUP BY 1, 2",
            (now,),
        )
        expected_counts = {(r[0], r[1]): r[2] for r in await cur.fetchall()}
    for counts in await q.counts(now=now):
        for status in ("open", "snoozed", "closed"):
            assert getattr(counts, status) == expected_counts.get((counts.connection, status), 0)
    for connection in ("conn-0", "conn-1", "conn-2"):
        for status in ("open", "snoozed", "closed", "all"):
            seen: list[Conversation] = []
            cursor = None
            while True:
                page = await q.inbox(connection, status, limit=7, cursor=cursor, now=now)
                seen.extend(page.items)
                cursor = page.next_cursor
                if cursor is None:
                    break
                assert len(page.items) == 7
            keys = [(c.last_activity_at, c.conversation_id) for c in seen]
            assert keys == sorted(keys, reverse=True) and len(set(keys)) == len(keys)
            wanted = ("open", "snoozed", "closed") if status == "all" else (status,)
            total = sum(expected_counts.get((connection, s), 0) for s in wanted)
            assert len(seen) == total
            assert all(c.status in wanted and c.deleted_at is None for c in seen)


async def test_contact_lists_follow_merges(
    pool: AsyncConnectionPool[Any], store: EventStore
) -> None:
    q = InboxQueries(pool)
    k1, k2, k3 = uuid7(), uuid7(), uuid7()
    a, b, c = Chat(store, contact=k1), Chat(store, contact=k2), Chat(store, contact=k3)
    for minute, chat in enumerate((a, b, c)):
        await chat.open(at(minute), psid=f"p{minute}")
        await chat.customer("hi", at(10 + minute))
    await emit(store, contact_stream(k1), ContactsMerged(k2, k1, at(20), (b.id,)))
    # A conversation opened for the merged contact after the merge lands with the survivor.
    d = Chat(store, contact=k2)
    await d.open(at(21), psid="p9")
    await project(pool)

    def ids(page: Sequence[Conversation]) -> list[uuid.UUID]:
        return [row.conversation_id for row in page]

    assert ids((await q.contact_conversations(k1)).items) == [d.id, b.id, a.id]
    assert ids((await q.contact_conversations(k2)).items) == [d.id, b.id, a.id]
    row = await q.conversation(b.id)
    assert row is not None and row.contact_id == k1

    await emit(store, contact_stream(k3), ContactsMerged(k1, k3, at(30), (a.id, b.id, d.id)))
    await project(pool)
    for contact in (k1, k2, k3):
        page = await q.contact_conversations(contact, limit=3)
        rest = await q.contact_conversations(contact, limit=3, cursor=page.next_cursor)
        assert ids(page.items + rest.items) == [d.id, c.id, b.id, a.id]
        assert rest.next_cursor is None


async def test_messages_newest_first_with_cursor(
    pool: AsyncConnectionPool[Any], store: EventStore
) -> None:
    chat = Chat(store)
    await chat.open(at(0))
    sent = [await chat.customer(f"message {i}", at(i)) for i in range(25)]
    await project(pool)
    q = InboxQueries(pool)
    pages = []
    cursor = None
    while True:
        page = await q.messages(chat.id, limit=10, cursor=cursor)
        pages.append([m.message_id for m in page.items])
        cursor = page.next_cursor
        if cursor is None:
            break
    assert [len(p) for p in pages] == [10, 10, 5]
    assert [m for p in pages for m in p] == sent[::-1]
    assert (await q.messages(uuid7())).items == []


async def test_bad_arguments_and_missing_model(
    pool: AsyncConnectionPool[Any], store: EventStore
) -> None:
    q = InboxQueries(pool)
    with pytest.raises(ReadModelMissing, match="convstore project"):
        await q.inbox("fb")
    await project(pool)
    for bad in ("", "nonsense", "WyJtIiwiMTMiXQ"):  # the last is a messages cursor
        with pytest.raises(InvalidQuery):
            await q.inbox("fb", cursor=bad)
    with pytest.raises(InvalidQuery):
        await q.messages(uuid7(), cursor="WyJjIiwieCIsInkiXQ")
    for limit in (0, 501, True):
        with pytest.raises(InvalidQuery):
            await q.inbox("fb", limit=limit)
    with pytest.raises(InvalidQuery):
        await q.inbox("fb", "pending")
    assert await q.counts("nobody") == [StatusCounts("nobody")]


def _reference(events: Sequence[RecordedEvent]) -> dict[uuid.UUID, dict[str, Any]]:
    """The inbox columns, computed the plain way: one event at a time, no batches, no SQL."""
    rows: dict[uuid.UUID, dict[str, Any]] = {}
    inbound_at: dict[uuid.UUID, int] = {}  # message -> customer messages up to it
    for event in events:
        data = event.data
        if isinstance(data, ConversationOpened):
            rows[data.conversation_id] = {
                "status": "open",
                "message_count": 0,
                "inbound": 0,
                "unread_count": 0,
                "deleted": False,
                "last": None,
            }
            continue
        row = rows.get(getattr(data, "conversation_id", None))  # type: ignore[arg-type]
        if row is None:
            continue
        if isinstance(data, MessageReceived | MessageSent):
            row["message_count"] += 1
            if isinstance(data, MessageReceived):
                row["inbound"] += 1
                row["unread_count"] += 1
            inbound_at[data.message_id] = row["inbound"]
            row["last"] = data.message_id
        elif isinstance(data, MessagesRead):
            row["unread_count"] = row["inbound"] - inbound_at[data.up_to_message_id]
        elif isinstance(data, ConversationClosed):
            row["status"] = "closed"
        elif isinstance(data, ConversationReopened | ConversationUnsnoozed):
            row["status"] = "open"
        elif isinstance(data, ConversationSnoozed):
            row["status"] = "snoozed"
        elif isinstance(data, ConversationDeleted):
            row["deleted"] = True
        elif isinstance(data, ConversationRestored):
            row["deleted"] = False
    return rows


async def test_rows_match_a_plain_reference_fold(
    pool: AsyncConnectionPool[Any], store: EventStore
) -> None:
    await append_all(store, list(traffic(4000, seed=5, active=50)))
    await project(pool)
    events: list[RecordedEvent] = []
    reader = EventStore(pool, CODEC)
    checkpoint = START
    while batch := await reader.read_all(checkpoint, 5000):
        events.extend(batch)
        checkpoint = batch[-1].checkpoint
    expected = _reference(events)
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT conversation_id, status, message_count, unread_count,"
            " deleted_at IS NOT NULL, last_message_id FROM rm_inbox.conversations"
        )
        actual = {
            r[0]: {
                "status": r[1],
                "message_count": r[2],
                "unread_count": r[3],
                "deleted": r[4],
                "last": r[5],
            }
            for r in await cur.fetchall()
        }
    for row in expected.values():
        del row["inbound"]
    assert actual == expected


async def test_temporary_tables_build_the_same_model(
    pool: AsyncConnectionPool[Any], store: EventStore
) -> None:
    await append_all(store, list(traffic(1500, seed=3)))
    await project(pool)
    async with pool.connection() as conn:
        await build_into(pool, INBOX, "pg_temp", conn=conn, batch_size=97)
        assert set((await compare_read_models(conn, INBOX, "rm_inbox", "pg_temp")).values()) == {
            (0, 0)
        }
        # The same queries read it, on the connection that owns the temporary tables.
        temp = InboxQueries(pool, schema="pg_temp")
        live = InboxQueries(pool)
        assert await temp.counts(conn=conn) == await live.counts()
        assert (await temp.inbox("conn-1", "all", conn=conn)) == await live.inbox("conn-1", "all")


@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    seed=st.integers(0, 2**32),
    events=st.integers(20, 500),
    active=st.integers(1, 40),
    batches=st.tuples(st.integers(1, 300), st.integers(1, 300)),
)
def test_batch_boundaries_never_change_the_model(
    database_url: str, seed: int, events: int, active: int, batches: tuple[int, int]
) -> None:
    """Whatever the log holds and however it is cut into batches, the tables are the same."""

    async def example() -> None:
        pool = await open_pool(database_url, max_size=4)
        try:
            await append_all(EventStore(pool), list(traffic(events, seed=seed, active=active)))
            async with pool.connection() as conn:
                head = await log_head(conn)
            for schema, size in zip(("model_a", "model_b"), batches, strict=True):
                async with asyncio.timeout(60):
                    await build_into(pool, INBOX, schema, batch_size=size, replace=True, until=head)
            async with pool.connection() as conn:
                differences = await compare_read_models(conn, INBOX, "model_a", "model_b")
            assert set(differences.values()) == {(0, 0)}, differences
        finally:
            await pool.close()

    asyncio.run(example())


class _Rollback(Exception):
    """Raised to roll back the caller's transaction around a batch."""


async def test_what_appliers_remember_follows_what_is_committed(
    pool: AsyncConnectionPool[Any], store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Appliers keep rows between batches; taking turns on one schema, having batches rolled
    back by their caller after the batch's own commit (a savepoint), and forgetting rows all
    the time, they still build the model a single build from scratch builds."""
    monkeypatch.setattr(_Memory, "LIMIT", 5)
    await append_all(store, list(traffic(3000, seed=11, active=30)))
    async with pool.connection() as conn:
        head = await log_head(conn)
        await conn.execute("DROP SCHEMA IF EXISTS turns CASCADE")
        first, second = Applier(pool, INBOX, "turns"), Applier(pool, INBOX, "turns")
        await first.create(conn)
        turn = 0
        rolled_back = 0
        try:
            while True:
                turn += 1
                applier = second if turn % 3 == 0 else first
                if turn % 5 == 0:
                    with contextlib.suppress(_Rollback):
                        async with conn.transaction():
                            if (await applier.apply_batch(conn, 60, until=head)).events:
                                rolled_back += 1
                            raise _Rollback
                    continue
                result = await applier.apply_batch(conn, 40 + turn % 17, until=head)
                if result.caught_up:
                    break
        finally:
            await first.close()
            await second.close()
        assert rolled_back > 5
        await build_into(pool, INBOX, "scratch", until=head, replace=True)
        differences = await compare_read_models(conn, INBOX, "turns", "scratch")
        assert set(differences.values()) == {(0, 0)}, differences
        await conn.execute("DROP SCHEMA turns CASCADE")
        await conn.execute("DROP SCHEMA scratch CASCADE")


async def _build_with(
    pool: AsyncConnectionPool[Any], schema: str, batch: int, head: Any, *, prefetch: bool
) -> Applier:
    applier = Applier(pool, INBOX, schema, prefetch=prefetch)
    async with pool.connection() as conn:
        await conn.execute(
            sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
        )
        await applier.create(conn)
        try:
            while not (await applier.apply_batch(conn, batch, until=head)).caught_up:
                pass
        finally:
            await applier.close()
    return applier


async def test_folding_the_next_batch_while_one_is_written_builds_the_same_model(
    pool: AsyncConnectionPool[Any], store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An applier folds batch N+1 (reading the rows its memory lacks on another connection)
    while batch N is written. With a memory that forgets rows all the time, and traffic that
    merges contacts (a merge moves rows the memory does not hold), what it reads before N
    commits must still give the model that an applier folding one batch at a time builds."""
    monkeypatch.setattr(_Memory, "LIMIT", 5)
    await append_all(store, list(traffic(4000, seed=5, active=40)))
    async with pool.connection() as conn:
        head = await log_head(conn)
        merges = await (
            await conn.execute("SELECT count(*) FROM events WHERE type = 'ContactsMerged'")
        ).fetchone()
    assert merges is not None and merges[0] >= 3
    ahead = await _build_with(pool, "ahead", 37, head, prefetch=True)
    plain = await _build_with(pool, "plain", 37, head, prefetch=False)
    # Most batches were folded ahead (not the first, nor one after a short read-ahead).
    assert ahead.folded_ahead > 50
    assert plain.folded_ahead == 0
    async with pool.connection() as conn:
        differences = await compare_read_models(conn, INBOX, "ahead", "plain")
        assert set(differences.values()) == {(0, 0)}, differences
        await conn.execute("DROP SCHEMA ahead CASCADE")
        await conn.execute("DROP SCHEMA plain CASCADE")


async def test_tables_made_anew_are_still_read_through_their_indexes(database_url: str) -> None:
    """A projector's statements are prepared, and PostgreSQL keeps a generic plan made while a
    table was empty (here: the schema made anew on connections that ran them before, as a
    rebuild or a bench round does) until the table is analysed. The batches must look rows up
    through the indexes anyway, not scan the growing tables once per batch."""
    setup = await open_pool(database_url, max_size=1)
    try:
        async with setup.connection() as conn:
            await copy_into_log(conn, list(traffic(20_000, seed=3)))
            head = await log_head(conn)
    finally:
        await setup.close()
    pool = await open_pool(database_url, min_size=2, max_size=2)
    applier = Applier(pool, INBOX, "grown")
    try:
        async with pool.connection() as conn:
            for _ in range(2):
                await conn.execute("DROP SCHEMA IF EXISTS grown CASCADE")
                await applier.create(conn)
                for table in ("conversations", "messages"):
                    # An ANALYZE would replace the plans, and hide the scans this test looks for.
                    await conn.execute(
                        sql.SQL("ALTER TABLE {} SET (autovacuum_enabled = false)").format(
                            sql.Identifier("grown", table)
                        )
                    )
                batches = 0
                while not (await applier.apply_batch(conn, 200, until=head)).caught_up:
                    batches += 1
        await applier.close()  # its read-ahead may hold the other connection
        async with pool.connection() as one, pool.connection() as other:
            backends = [one.info.backend_pid, other.info.backend_pid]
    finally:
        await applier.close()
        await pool.close()
    assert batches >= 90
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        # A backend reports its table statistics at exit, before it leaves pg_stat_activity.
        async with asyncio.timeout(30):
            while (
                await (
                    await conn.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (backends,)
                    )
                ).fetchone()
            ) != (0,):
                await asyncio.sleep(0.05)
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        scans = {
            row[0]: (row[1], row[2])
            for row in await (
                await conn.execute(
                    "SELECT relname, seq_scan, idx_scan FROM pg_stat_user_tables"
                    " WHERE schemaname = 'grown' AND relname IN ('conversations', 'messages')"
                )
            ).fetchall()
        }
    assert scans["conversations"][1] > batches and scans["messages"][1] > batches // 10, scans
    assert scans["conversations"][0] < 10 and scans["messages"][0] < 10, scans


async def test_a_batch_folded_before_a_merge_commits_still_follows_the_merge(
    pool: AsyncConnectionPool[Any], store: EventStore
) -> None:
    """Folded ahead, a batch reads the rows its memory lacks before the batch before it has
    committed. When that batch merged contact A into B, what it reads is resolved through
    the merge: a conversation of A that the merge did not name, a contact merged into A
    before, and A itself."""
    a, b, x = uuid7(), uuid7(), uuid7()
    old = Chat(store, contact=a)
    await old.open(at(0))
    await old.customer("hello", at(1))
    await emit(store, contact_stream(a), ContactsMerged(x, a, at(2)))
    await project(pool)
    async with pool.connection() as conn:
        row = await (
            await conn.execute("SELECT transaction_id, position FROM rm_inbox.checkpoint")
        ).fetchone()
    assert row is not None
    await emit(store, contact_stream(b), ContactsMerged(a, b, at(3)))
    await old.customer("again", at(4))
    for_x, for_a = Chat(store, contact=x), Chat(store, contact=a)
    await for_x.open(at(5))
    await for_a.open(at(6))
    events = await EventStore(pool, CODEC).read_all(Checkpoint(row[0], row[1]), 100)
    assert [type(e.data) for e in events[:2]] == [ContactsMerged, MessageReceived]
    memory = INBOX.new_memory()
    async with pool.connection() as writer, pool.connection() as reader:
        async with writer.transaction():
            merge = await INBOX.prepare(writer, "rm_inbox", events[:1], memory)
            assert INBOX.remember(memory, merge)
            # The next batch, read and folded on another connection before the merge commits.
            after = await INBOX.prepare(reader, "rm_inbox", events[1:], memory)
            await INBOX.write(writer, "rm_inbox", merge, memory)
        async with writer.transaction():
            INBOX.remember(memory, after)
            await INBOX.write(writer, "rm_inbox", after, memory)
    q = InboxQueries(pool)
    for chat in (old, for_x, for_a):
        conversation = await q.conversation(chat.id)
        assert conversation is not None and conversation.contact_id == b, chat


async def test_a_message_delivered_late_neither_sinks_the_conversation_nor_repeats_it(
    pool: AsyncConnectionPool[Any], store: EventStore
) -> None:
    """Found by review: a late message (a provider's redelivery hours on) set the row's time
    back to its own, so the conversation sank and a pager met it twice. A second review: the
    preview must still follow the last message to arrive (providers' clocks and ours differ,
    and Telegram's has whole seconds)."""
    x, y = Chat(store), Chat(store)
    await x.open(at(0))
    await x.customer("newest", at(50))
    await y.open(at(0), psid="p2")
    await y.customer("middle", at(30))
    await project(pool)
    q = InboxQueries(pool)
    first = await q.inbox("fb", "open", limit=1)
    assert [c.conversation_id for c in first.items] == [x.id]
    await x.customer("sent long ago", at(1))  # delivered now, stamped at minute 1
    await project(pool)
    rest = await q.inbox("fb", "open", limit=10, cursor=first.next_cursor)
    assert [c.conversation_id for c in rest.items] == [y.id]
    row = await q.conversation(x.id)
    assert row is not None
    # The order stays; the late message, the last to arrive, is the preview.
    assert (row.last_activity_at, row.last_message_preview) == (at(50), "sent long ago")
    assert (row.message_count, row.unread_count) == (2, 2)
