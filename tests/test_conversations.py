"""Conversation identity and commands (invariants 1-6), on a real PostgreSQL with real races."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from psycopg import errors as psycopg_errors
from psycopg_pool import AsyncConnectionPool

from conversations.batching import (
    RECEIVE_TO_OPEN,
    RECEIVE_TO_OPEN_MANY,
    InboundRow,
    OpenHint,
    receive_many,
)
from conversations.connections import ConnectionCache, add_connection, parse_reopen_policy
from conversations.errors import ConnectionNotFound, InvalidCommand, InvalidTransition
from conversations.events import CODEC, ConversationClosed, MessageReceived
from conversations.service import (
    _MATCH_PROBES,
    ConversationService,
    InboundMessage,
    InboundResult,
)
from eventstore import (
    EventStore,
    RecordedEvent,
    StreamDeleted,
    StreamState,
    WrongExpectedVersion,
    uuid7,
)
from tests.conftest import wait_for_fence


@pytest.fixture
async def service(pool: AsyncConnectionPool[Any]) -> AsyncIterator[ConversationService]:
    store = EventStore(pool, CODEC)
    for name, channel, policy in (
        ("fb", "messenger", "new"),
        ("fb-last", "messenger", "reopen-last"),
        ("fb-within", "instagram", "reopen-within=1h"),
        ("web", "widget", "new"),
    ):
        await add_connection(
            pool, name, channel=channel, external_id=f"ext-{name}", reopen_policy=policy
        )
    yield ConversationService(store)
    await store.close()


BASE = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)


def msg(mid: str, *, at: dt.datetime | None = None, text: str | None = None) -> InboundMessage:
    return InboundMessage(provider_message_id=mid, sent_at=at or BASE, text=text or f"text {mid}")


async def stream(service: ConversationService, conversation_id: uuid.UUID) -> list[RecordedEvent]:
    return await service.store.read_stream(f"conversation-{conversation_id}")


async def open_counts(service: ConversationService) -> dict[tuple[str, str], int]:
    async with service.pool.connection() as conn:
        rows = await (
            await conn.execute(
                "SELECT connection, psid, count(*) FILTER (WHERE status <> 'closed')"
                " FROM conversations GROUP BY 1, 2"
            )
        ).fetchall()
    return {(r[0], r[1]): r[2] for r in rows}


def open_hint(result: InboundResult, version: int) -> OpenHint:
    """The hint a service keeps after ``result`` left its Messenger conversation open at
    ``version``."""
    assert result.contact_id is not None
    return OpenHint(
        "messenger",
        result.conversation_id,
        f"conversation-{result.conversation_id}",
        result.contact_id,
        version,
    )


async def all_received(service: ConversationService) -> list[RecordedEvent]:
    await wait_for_fence(service.pool)
    events: list[RecordedEvent] = []
    after = None
    while True:
        page = await service.store.read_all(after, 1000, types=["MessageReceived"])
        if not page:
            return events
        events.extend(page)
        after = page[-1].checkpoint


async def test_concurrent_first_messages_make_one_conversation_per_key(
    service: ConversationService,
) -> None:
    deliveries = [(f"psid-{p}", f"m-{p}-{m}") for p in range(20) for m in range(10)]
    redelivered = random.Random(7).sample(deliveries, 50)
    calls = deliveries + redelivered
    random.Random(11).shuffle(calls)
    results = await asyncio.gather(
        *(service.receive_inbound("fb", psid, msg(mid)) for psid, mid in calls)
    )
    assert len(results) == 250  # gather raises on the first error: no caller saw one
    assert sum(not r.duplicate for r in results) == 200
    by_key: dict[str, set[uuid.UUID]] = {}
    for (psid, _), result in zip(calls, results, strict=True):
        by_key.setdefault(psid, set()).add(result.conversation_id)
    assert all(len(ids) == 1 for ids in by_key.values()), by_key
    assert len(by_key) == 20
    for psid, (conversation_id,) in by_key.items():
        events = await stream(service, conversation_id)
        received = [e.data.provider_message_id for e in events if e.type == "MessageReceived"]
        expected = sorted(f"m-{psid.removeprefix('psid-')}-{m}" for m in range(10))
        assert sorted(received) == expected
        assert [e.type for e in events].count("ConversationOpened") == 1
    assert set((await open_counts(service)).values()) == {1}
    assert len(await all_received(service)) == 200


async def test_redelivery_after_restart_is_stored_once(
    service: ConversationService, pool: AsyncConnectionPool[Any]
) -> None:
    first = await service.receive_inbound("fb", "alice", msg("mid-1"))
    restarted = ConversationService(EventStore(pool, CODEC))
    again = await restarted.receive_inbound("fb", "alice", msg("mid-1"))
    assert again.duplicate and again.message_id == first.message_id
    assert again.conversation_id == first.conversation_id
    assert len(await all_received(service)) == 1


async def test_close_then_message_opens_new_conversation_by_default(
    service: ConversationService,
) -> None:
    first = await service.receive_inbound("fb", "bob", msg("1"))
    await service.close(first.conversation_id, by="agent-1", reason="solved")
    second = await service.receive_inbound("fb", "bob", msg("2", at=BASE + dt.timedelta(hours=1)))
    assert second.opened and second.conversation_id != first.conversation_id
    old = await stream(service, first.conversation_id)
    assert [e.type for e in old] == ["ConversationOpened", "MessageReceived", "ConversationClosed"]
    assert (await service.conversation(first.conversation_id)).status == "closed"
    assert (await service.conversation(second.conversation_id)).status == "open"
    # the closed conversation keeps its history; both belong to the same contact
    assert first.contact_id == second.contact_id


async def test_reopen_last_policy_reopens_the_same_conversation(
    service: ConversationService,
) -> None:
    first = await service.receive_inbound("fb-last", "carol", msg("1"))
    await service.close(first.conversation_id, by="agent-1")
    later = BASE + dt.timedelta(days=30)
    second = await service.receive_inbound("fb-last", "carol", msg("2", at=later))
    assert second.reopened and second.conversation_id == first.conversation_id
    types = [e.type for e in await stream(service, first.conversation_id)]
    assert types[-3:] == ["ConversationClosed", "ConversationReopened", "MessageReceived"]
    assert (await service.conversation(first.conversation_id)).status == "open"


async def test_reopen_within_window_inside_and_outside(service: ConversationService) -> None:
    first = await service.receive_inbound("fb-within", "dave", msg("1"))
    closed = await service.close(first.conversation_id, by="agent-1")
    closed_at = (await service.conversation(first.conversation_id)).closed_at
    assert closed_at is not None and closed.version == 3
    inside = await service.receive_inbound(
        "fb-within", "dave", msg("2", at=closed_at + dt.timedelta(minutes=59))
    )
    assert inside.reopened and inside.conversation_id == first.conversation_id
    await service.close(first.conversation_id, by="agent-1")
    closed_at = (await service.conversation(first.conversation_id)).closed_at
    assert closed_at is not None
    outside = await service.receive_inbound(
        "fb-within", "dave", msg("3", at=closed_at + dt.timedelta(hours=1, seconds=1))
    )
    assert outside.opened and outside.conversation_id != first.conversation_id


async def test_close_racing_fifty_messages_loses_none(service: ConversationService) -> None:
    first = await service.receive_inbound("fb", "erin", msg("seed"))
    mids = [f"race-{i}" for i in range(50)]

    async def deliver(mid: str) -> Any:
        await asyncio.sleep(random.uniform(0, 0.02))
        return await service.receive_inbound("fb", "erin", msg(mid, at=BASE))

    async def close() -> Any:
        await asyncio.sleep(0.01)
        return await service.close(first.conversation_id, by="agent-1")

    results = await asyncio.gather(close(), *(deliver(m) for m in mids))
    landed = results[1:]
    old = await stream(service, first.conversation_id)
    close_index = [e.type for e in old].index("ConversationClosed")
    assert close_index == len(old) - 1, "nothing may follow the close in the same stream"
    in_old = {e.data.provider_message_id for e in old if isinstance(e.data, MessageReceived)}
    later_ids = {r.conversation_id for r in landed if r.conversation_id != first.conversation_id}
    assert len(later_ids) <= 1
    in_new: set[str] = set()
    for cid in later_ids:
        in_new |= {
            e.data.provider_message_id
            for e in await stream(service, cid)
            if isinstance(e.data, MessageReceived)
        }
    assert in_old & in_new == set()
    assert (in_old | in_new) == {"seed", *mids}
    assert set((await open_counts(service)).values()) <= {0, 1}


async def test_guest_history_follows_identification_and_merge(
    service: ConversationService,
) -> None:
    # An existing registered client, first seen as a guest who identified with a client id.
    client = await service.guest_sign_up("web", username="ann")
    await service.receive_inbound("web", client.guest_id, msg("c-1"))
    assert await service.identify(client.contact_id, client_id="client-42") == client.contact_id

    guest = await service.guest_sign_up("web")
    first = await service.receive_inbound("web", guest.guest_id, msg("g-1"))
    await service.receive_inbound("web", guest.guest_id, msg("g-2"))
    assert first.contact_id == guest.contact_id
    survivor = await service.identify(guest.contact_id, client_id="client-42")
    assert survivor == client.contact_id
    owned = await service.contact_conversations(client.contact_id)
    assert first.conversation_id in {c.conversation_id for c in owned}
    # later messages of the guest key go to the surviving contact
    after = await service.receive_inbound("web", guest.guest_id, msg("g-3"))
    assert after.contact_id == client.contact_id
    texts = [
        e.data.text
        for e in await stream(service, first.conversation_id)
        if isinstance(e.data, MessageReceived)
    ]
    assert texts == ["text g-1", "text g-2", "text g-3"]


async def test_identify_without_match_registers_and_matches_in_order(
    service: ConversationService,
) -> None:
    a = await service.guest_sign_up("web")
    assert await service.identify(a.contact_id, email="A@example.com") == a.contact_id
    b = await service.guest_sign_up("web")
    # email matches case-insensitively; client id would win over email if it matched anyone
    assert await service.identify(b.contact_id, client_id="nobody", email="a@example.com") == (
        a.contact_id
    )


async def test_each_identify_probe_can_use_its_partial_index(
    service: ConversationService,
) -> None:
    # With sequential scans priced out, a probe takes its index if and only if PostgreSQL can
    # prove the index's predicate (merged_into IS NULL, and the column IS NOT NULL) from the
    # probe's own conditions.
    indexes = {
        "client_id": "contacts_client_id_key",
        "username": "contacts_username_idx",
        "email": "contacts_email_idx",
        "phone": "contacts_phone_idx",
    }
    assert [field for field, _ in _MATCH_PROBES] == list(indexes)
    async with service.pool.connection() as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")
        for field, query in _MATCH_PROBES:
            cur = await conn.execute("EXPLAIN " + query, ("someone", uuid7()))
            plan = "\n".join(row[0] for row in await cur.fetchall())
            assert indexes[field] in plan, plan
    # Contacts made from first messages have none of the three: the indexes stay empty, their
    # metapage alone (an entry would have added a leaf page).
    for n in range(3):
        await service.receive_inbound("fb", f"nameless-{n}", msg(f"n-{n}"))
    async with service.pool.connection() as conn:
        for index in ("contacts_username_idx", "contacts_email_idx", "contacts_phone_idx"):
            cur = await conn.execute(
                "SELECT pg_relation_size(%s::regclass), current_setting('block_size')::int",
                (index,),
            )
            size, block = await cur.fetchone() or (None, None)
            assert size == block, index


async def test_merging_two_contacts_keeps_every_message(service: ConversationService) -> None:
    x = await service.receive_inbound("fb", "x-psid", msg("x1"))
    y = await service.receive_inbound("fb", "y-psid", msg("y1"))
    await service.close(y.conversation_id, by="agent")
    y2 = await service.receive_inbound("fb", "y-psid", msg("y2", at=BASE + dt.timedelta(hours=1)))
    assert x.contact_id and y.contact_id
    await service.merge_contacts(y.contact_id, x.contact_id)
    owned = {c.conversation_id for c in await service.contact_conversations(x.contact_id)}
    assert owned == {x.conversation_id, y.conversation_id, y2.conversation_id}
    assert await service.contact_conversations(y.contact_id) == []
    assert len(await all_received(service)) == 3
    with pytest.raises(InvalidTransition):
        await service.merge_contacts(y.contact_id, x.contact_id)


async def test_snooze_until_time_and_until_next_reply(service: ConversationService) -> None:
    c = await service.receive_inbound("fb", "frank", msg("1"))
    until = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
    await service.snooze(c.conversation_id, by="agent", until=until)
    state = await service.conversation(c.conversation_id)
    assert state.status == "snoozed" and state.snoozed_until == until
    # a timed snooze holds through a customer message
    await service.receive_inbound("fb", "frank", msg("2"))
    assert (await service.conversation(c.conversation_id)).status == "snoozed"
    await service.unsnooze(c.conversation_id, by="agent")
    await service.snooze(c.conversation_id, by="agent")  # until the next customer message
    assert (await service.conversation(c.conversation_id)).snooze_until_reply
    same = await service.receive_inbound("fb", "frank", msg("3"))
    assert same.conversation_id == c.conversation_id
    assert (await service.conversation(c.conversation_id)).status == "open"
    types = [e.type for e in await stream(service, c.conversation_id)]
    assert types[-2:] == ["ConversationUnsnoozed", "MessageReceived"]
    with pytest.raises(InvalidCommand):
        await service.snooze(c.conversation_id, by="agent", until=dt.datetime(2020, 1, 1))


async def test_soft_delete_hides_and_restore_shows(service: ConversationService) -> None:
    c = await service.receive_inbound("fb", "gina", msg("1"))
    await service.delete(c.conversation_id, by="agent")
    state = await service.conversation(c.conversation_id)
    assert state.deleted and state.status == "closed"
    # the key is released: the next message opens a new conversation, even under reopen-last
    n = await service.receive_inbound("fb", "gina", msg("2", at=BASE + dt.timedelta(minutes=1)))
    assert n.opened and n.conversation_id != c.conversation_id
    await service.restore(c.conversation_id, by="agent")
    assert not (await service.conversation(c.conversation_id)).deleted
    types = [e.type for e in await stream(service, c.conversation_id)]
    assert types == [
        "ConversationOpened",
        "MessageReceived",
        "ConversationClosed",
        "ConversationDeleted",
        "ConversationRestored",
    ]
    # reopening it would make two open conversations for one key: refused
    with pytest.raises(InvalidTransition):
        await service.reopen(c.conversation_id, by="agent")


async def test_stale_expected_version_is_a_conflict_with_the_actual_version(
    service: ConversationService,
) -> None:
    c = await service.receive_inbound("fb", "hank", msg("1"))
    with pytest.raises(WrongExpectedVersion) as info:
        await service.close(c.conversation_id, by="agent", expected_version=1)
    assert info.value.actual == 2 and info.value.expected == 1
    done = await service.close(c.conversation_id, by="agent", expected_version=2)
    assert done.version == 3
    with pytest.raises(InvalidTransition) as closed:
        await service.close(c.conversation_id, by="agent")
    assert closed.value.version == 3


async def test_agent_reply_and_read(service: ConversationService) -> None:
    # A recent message: Messenger takes replies within 24 hours of the customer's last one.
    c = await service.receive_inbound("fb", "ivy", msg("1", at=dt.datetime.now(dt.UTC)))
    r1 = await service.reply(c.conversation_id, by="agent", text="hello", idempotency_key="k1")
    r2 = await service.reply(c.conversation_id, by="agent", text="hello", idempotency_key="k1")
    assert r2.duplicate and r1.event_ids == r2.event_ids
    await service.mark_read(c.conversation_id, by="agent", up_to_message_id=c.message_id)
    types = [e.type for e in await stream(service, c.conversation_id)]
    assert types == ["ConversationOpened", "MessageReceived", "MessageSent", "MessagesRead"]
    with pytest.raises(InvalidCommand):
        await service.mark_read(c.conversation_id, by="agent", up_to_message_id=uuid.uuid4())


async def test_bad_input_is_refused_and_stores_nothing(service: ConversationService) -> None:
    for bad in (
        InboundMessage(provider_message_id="", sent_at=BASE, text="x"),
        InboundMessage(provider_message_id="m", sent_at=BASE, text="nul \x00 here"),
        InboundMessage(provider_message_id="m", sent_at=BASE.replace(tzinfo=None), text="x"),
        InboundMessage(provider_message_id="m", sent_at=BASE),
    ):
        with pytest.raises(InvalidCommand):
            await service.receive_inbound("fb", "jack", bad)
    with pytest.raises(InvalidCommand):
        await service.receive_inbound("fb", "", msg("1"))
    assert await service.store.read_all() == []


async def test_events_decode_to_the_domain_union(service: ConversationService) -> None:
    c = await service.receive_inbound("fb", "kim", msg("1"))
    await service.close(c.conversation_id, by="agent", reason="done")
    events = await stream(service, c.conversation_id)
    assert isinstance(events[-1].data, ConversationClosed)
    assert events[-1].data.reason == "done"


async def test_concurrent_deliveries_share_statements_and_an_error_stays_with_its_delivery(
    service: ConversationService,
) -> None:
    keys = [f"batch-{n}" for n in range(30)]
    opened = await asyncio.gather(*(service.receive_inbound("fb", k, msg(f"{k}-0")) for k in keys))
    statements, deliveries = service.batcher.statements, service.batcher.deliveries

    # Thirty messages to open conversations and one the database refuses (a \u0000 in its
    # metadata), all at once: they share statements, the refused one fails alone.
    async def bad() -> None:
        with pytest.raises(InvalidCommand) as refused:
            await service.receive_inbound("fb", "batch-5", msg("bad"), metadata={"note": "\x00"})
        assert refused.value.field == "message"

    results = await asyncio.gather(
        *(service.receive_inbound("fb", k, msg(f"{k}-1")) for k in keys), bad()
    )
    assert service.batcher.deliveries - deliveries >= 31
    assert service.batcher.statements - statements < 31 // 2  # batched, not one each
    for first, second in zip(opened, results[:30], strict=True):
        assert second is not None and not second.duplicate
        assert second.conversation_id == first.conversation_id
    for key, first in zip(keys, opened, strict=True):
        received = [
            e.data.provider_message_id
            for e in await stream(service, first.conversation_id)
            if isinstance(e.data, MessageReceived)
        ]
        assert received == [f"{key}-0", f"{key}-1"]


async def test_a_batch_whose_reading_fails_after_its_insert_tells_the_stored_ones_so(
    service: ConversationService,
) -> None:
    keys = [f"part-{n}" for n in range(5)]
    opened = [await service.receive_inbound("fb", k, msg(f"{k}-0")) for k in [*keys, "hold"]]
    service.batcher.max_in_flight = 1  # the first runs alone, the rest wait as one batch
    statements, deliveries = service.batcher.statements, service.batcher.deliveries

    async def bad() -> None:
        # The key's second delivery in the batch, so it goes in the reading statement after
        # the insert, and the database refuses it there (a \u0000 in its metadata).
        with pytest.raises(InvalidCommand):
            await service.receive_inbound("fb", keys[0], msg("bad"), metadata={"note": "\x00"})

    results = await asyncio.gather(
        service.receive_inbound("fb", "hold", msg("hold-1")),
        *(service.receive_inbound("fb", k, msg(f"{k}-1")) for k in keys),
        bad(),
    )
    # One statement held the slot and one carried the batch of six (the refused delivery then
    # ran alone, past the batcher).
    assert service.batcher.statements - statements == 2
    assert service.batcher.deliveries - deliveries == 1 + 6
    # The insert stored the five hinted messages before the reading statement failed: their
    # callers hear they were stored, not "duplicate" from a retry.
    for first, result in zip(opened[:5], results[1:6], strict=True):
        assert result is not None and not result.duplicate
        assert result.conversation_id == first.conversation_id
    received = await all_received(service)
    assert sorted(e.data.provider_message_id for e in received) == sorted(
        f"{k}-{n}" for k in [*keys, "hold"] for n in range(2)
    )


async def test_a_message_delivered_twice_in_one_batch_is_stored_once(
    service: ConversationService,
) -> None:
    first = await service.receive_inbound("fb", "twice", msg("t-0"))
    results = await asyncio.gather(
        *(service.receive_inbound("fb", "twice", msg(f"t-{n // 2 + 1}")) for n in range(20))
    )
    assert sum(not r.duplicate for r in results) == 10
    assert {r.conversation_id for r in results} == {first.conversation_id}
    received = [
        e.data.provider_message_id
        for e in await stream(service, first.conversation_id)
        if isinstance(e.data, MessageReceived)
    ]
    assert sorted(received) == sorted(f"t-{n}" for n in range(11))


async def test_one_batch_appends_several_messages_of_one_conversation_in_batch_order(
    service: ConversationService,
) -> None:
    first = await service.receive_inbound("fb", "busy", msg("b-0"))
    ids = [uuid7() for _ in range(4)]
    rows = [
        InboundRow("fb", "busy", event_id, '{"text": "x"}', None, "{}")
        for event_id in [ids[0], ids[1], ids[0], ids[2], ids[3]]  # ids[0] delivered twice
    ]
    results = await receive_many(service.pool, rows)
    # Every distinct message goes in at once (no retry on the general path); the second
    # delivery of ids[0] does not.
    assert [r is not None and r.appended for r in results] == [True, True, False, True, True]
    async with service.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT event_id, stream_version FROM events WHERE stream_id = %s"
            " ORDER BY stream_version",
            (f"conversation-{first.conversation_id}",),
        )
        stored = await cur.fetchall()
    assert [version for _, version in stored] == [1, 2, 3, 4, 5, 6]
    assert [event_id for event_id, _ in stored[2:]] == ids


async def test_a_key_hinted_open_appends_with_one_insert_or_falls_back(
    service: ConversationService,
) -> None:
    first = await service.receive_inbound("fb", "hinted", msg("h-0"))
    hint = open_hint(first, 2)
    stream_id = hint.stream_id

    def row(event_id: uuid.UUID, hint: OpenHint) -> InboundRow:
        # The payload as the service sends it with a hint: conversation and provider filled in.
        payload = MessageReceived(
            hint.conversation_id, event_id, "messenger", str(event_id), "x", BASE, BASE
        )
        data = CODEC.new_event(payload).data.decode()
        return InboundRow("fb", "hinted", event_id, data, None, "{}", hint)

    async def direct(event_id: uuid.UUID, hint: OpenHint) -> list[tuple[Any, ...]]:
        """RECEIVE_TO_OPEN alone: the versions it appended (none, or one)."""
        params = {
            "event_id": event_id,
            "stream_id": hint.stream_id,
            "version": hint.version,
            "conversation_id": hint.conversation_id,
            "contact_id": hint.contact_id,
            "data": row(event_id, hint).data,
            "metadata": "{}",
        }
        async with service.pool.connection() as conn:
            return await (await conn.execute(RECEIVE_TO_OPEN, params)).fetchall()

    # A true hint: one insert at the next version, stored as RECEIVE_ONE stores the message.
    first_id = uuid7()
    assert await direct(first_id, hint) == [(3,)]
    stored = (await stream(service, first.conversation_id))[-1]
    assert stored.event_id == first_id and stored.stream_version == 3
    assert stored.data.conversation_id == first.conversation_id
    assert stored.data.provider == "messenger"
    # Anything the hint no longer tells right appends nothing, and the database says so: a
    # version taken since (unique violation), a version the stream never reached, a contact
    # the conversation no longer has.
    with pytest.raises(psycopg_errors.UniqueViolation) as taken:
        await direct(uuid7(), hint)
    assert taken.value.diag.constraint_name == "events_stream_version_key"
    assert await direct(uuid7(), hint._replace(version=9)) == []
    assert await direct(uuid7(), hint._replace(contact_id=uuid7())) == []
    assert await service.store.stream_version(stream_id) == 3
    # Through receive_many, a stale version falls back to RECEIVE_ONE, which appends after the
    # version it reads; the hinted step says what the hint knew and the version before.
    (late,) = await receive_many(service.pool, [row(uuid7(), hint)])
    assert late is not None and late.appended is True and late.version == 3
    assert late.reopen_policy == "new"  # read by RECEIVE_ONE
    (hinted,) = await receive_many(service.pool, [row(uuid7(), hint._replace(version=4))])
    assert hinted is not None and hinted.appended is True and hinted.version == 4
    assert hinted.conversation_id == first.conversation_id
    assert hinted.contact_id == first.contact_id and hinted.stream_id == stream_id
    assert hinted.channel == "messenger" and hinted.reopen_policy is None  # not read
    assert await service.store.stream_version(stream_id) == 5
    # A redelivery fails on the event id, and the fallback reports where the message is.
    with pytest.raises(psycopg_errors.UniqueViolation) as again:
        await direct(first_id, hint._replace(version=5))
    assert again.value.diag.constraint_name == "events_event_id_key"
    (duplicate,) = await receive_many(service.pool, [row(first_id, hint._replace(version=5))])
    assert duplicate is not None and duplicate.appended is False
    assert duplicate.stored_in == stream_id
    # Closed, or snoozed until the customer's reply: nothing, then RECEIVE_ONE's reading.
    await service.close(first.conversation_id, by="ann")
    closing = hint._replace(version=6)
    assert await direct(uuid7(), closing) == []
    (closed,) = await receive_many(service.pool, [row(uuid7(), closing)])
    assert closed is not None and closed.appended is False and closed.status == "closed"
    assert closed.reopen_policy == "new"  # the connection's policy
    # Through the service, whose hint is stale now: it opens the next conversation.
    second = await service.receive_inbound("fb", "hinted", msg("h-1"))
    assert second.opened and second.conversation_id != first.conversation_id
    await service.snooze(second.conversation_id, by="ann", until=None)
    snoozed = open_hint(second, 3)
    assert await direct(uuid7(), snoozed) == []
    # The reply unsnoozes as it would unhinted; then the service's hint is good again.
    third = await service.receive_inbound("fb", "hinted", msg("h-2"))
    assert third.conversation_id == second.conversation_id and not third.opened
    assert (await service.conversation(second.conversation_id)).status == "open"
    assert [e.type for e in await stream(service, second.conversation_id)][-2:] == [
        "ConversationUnsnoozed",
        "MessageReceived",
    ]
    for n in range(3, 6):
        more = await service.receive_inbound("fb", "hinted", msg(f"h-{n}"))
        assert more.conversation_id == second.conversation_id and not more.duplicate
    assert (await stream(service, second.conversation_id))[-1].stream_version == 8
    # The service's hint follows the stream, so its next delivery needs only the insert.
    assert service._open_keys["fb", "hinted"] == snoozed._replace(version=8)
    # Stored nothing twice: every message id is in the log once.
    received = await all_received(service)
    assert len({e.event_id for e in received}) == len(received) == 9


async def test_a_batch_appends_its_hinted_deliveries_with_one_insert_or_falls_back(
    service: ConversationService,
) -> None:
    keys = ["b-true", "b-stale", "b-contact", "b-closed", "b-other"]
    firsts = {k: await service.receive_inbound("fb", k, msg(f"{k}-0")) for k in keys}
    await service.close(firsts["b-closed"].conversation_id, by="ann")

    def hint_of(key: str, **changes: Any) -> OpenHint:
        return open_hint(firsts[key], 2)._replace(**changes)

    def row(key: str, hint: OpenHint, event_id: uuid.UUID | None = None) -> InboundRow:
        event_id = event_id or uuid7()
        payload = MessageReceived(
            hint.conversation_id, event_id, "messenger", str(event_id), key, BASE, BASE
        )
        data = CODEC.new_event(payload).data.decode()
        return InboundRow("fb", key, event_id, data, None, "{}", hint)

    rows = [
        row("b-true", hint_of("b-true")),
        row("b-stale", hint_of("b-stale", version=9)),  # a version the stream never reached
        row("b-true", hint_of("b-true")),  # the key's second delivery: read, after the first
        row("b-contact", hint_of("b-contact", contact_id=uuid7())),
        row("b-closed", hint_of("b-closed", version=3)),
    ]
    steps = await receive_many(service.pool, rows)
    assert all(step is not None for step in steps)
    true_1, stale, true_2, contact, closed = (step for step in steps if step is not None)
    # The insert appended the true hint's delivery; its step says only what the hint knew.
    assert true_1.appended and true_1.version == 2 and true_1.reopen_policy is None
    # The others were read and decided in batch order: the key's second delivery after the
    # first, the stale and wrong-contact ones at their streams' next versions, the closed
    # conversation's not at all.
    assert true_2.appended and true_2.version == 3 and true_2.reopen_policy == "new"
    assert stale.appended and stale.version == 2 and stale.reopen_policy == "new"
    assert contact.appended and contact.version == 2
    assert not closed.appended and closed.status == "closed"
    versions = {
        k: [e.stream_version for e in await stream(service, firsts[k].conversation_id)]
        for k in keys
    }
    assert versions == {
        "b-true": [1, 2, 3, 4],
        "b-stale": [1, 2, 3],
        "b-contact": [1, 2, 3],
        "b-closed": [1, 2, 3],
        "b-other": [1, 2],
    }
    true_events = await stream(service, firsts["b-true"].conversation_id)
    assert [e.event_id for e in true_events[2:]] == [rows[0].event_id, rows[2].event_id]
    # A redelivery among hinted deliveries fails the insert on the event id: every delivery
    # is then read, the stored one reported where it is, the others appended.
    again = [
        row("b-other", hint_of("b-other")),
        row("b-true", hint_of("b-true", version=4), event_id=rows[0].event_id),
    ]
    other, duplicate = await receive_many(service.pool, again)
    assert other is not None and other.appended and other.version == 2
    assert other.reopen_policy == "new"  # read, not hinted: the insert had failed
    assert duplicate is not None and not duplicate.appended
    assert duplicate.stored_in == f"conversation-{firsts['b-true'].conversation_id}"
    # A version taken since skips its row only: the other hinted delivery goes in with the
    # insert, and the stale one is read and appended after it.
    taken = [
        row("b-other", hint_of("b-other", version=3)),
        row("b-true", hint_of("b-true", version=2)),
    ]
    hinted, stale_again = await receive_many(service.pool, taken)
    assert hinted is not None and hinted.appended and hinted.reopen_policy is None
    assert stale_again is not None and stale_again.appended and stale_again.version == 4
    assert stale_again.reopen_policy == "new"
    received = await all_received(service)
    assert len(received) == len({e.event_id for e in received}) == len(keys) + 7


async def test_two_services_batching_hinted_deliveries_while_conversations_close(
    service: ConversationService,
) -> None:
    # Two services on one store, each with few statement slots, so concurrent deliveries go in
    # batches whose hints the other service and the closes make stale; some messages are
    # delivered twice, to either service.
    other = ConversationService(service.store)
    for each in (service, other):
        each.batcher.max_in_flight = 2
    keys = [f"mix-{n}" for n in range(8)]
    for key in keys:  # both services learn the keys' conversations, so both hold hints
        await service.receive_inbound("fb", key, msg(f"{key}-first"))
        await other.receive_inbound("fb", key, msg(f"{key}-second"))
    rng = random.Random(7)
    sent = [f"{key}-{n}" for key in keys for n in range(12)]
    deliveries = [(mid, rng.choice((service, other))) for mid in sent]
    deliveries += [(mid, rng.choice((service, other))) for mid in rng.sample(sent, 20)]
    rng.shuffle(deliveries)

    async def deliver(mid: str, receiver: ConversationService) -> None:
        await asyncio.sleep(rng.uniform(0, 0.03))
        await receiver.receive_inbound("fb", mid.rsplit("-", 1)[0], msg(mid))

    async def close_current(key: str) -> None:
        await asyncio.sleep(rng.uniform(0, 0.03))
        async with service.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT conversation_id FROM stream_reservations WHERE psid = %s", (key,)
            )
            row = await cur.fetchone()
        assert row is not None
        with contextlib.suppress(InvalidTransition):
            await service.close(row[0], by="ann")

    await asyncio.gather(
        *(deliver(mid, receiver) for mid, receiver in deliveries),
        *(close_current(key) for key in keys[::2]),
    )
    # Every message is stored once; in each stream versions run without a gap and nothing
    # follows a close; each key has at most one conversation open.
    received = await all_received(service)
    stored = [e.data.provider_message_id for e in received if isinstance(e.data, MessageReceived)]
    expected = sent + [f"{key}-{which}" for key in keys for which in ("first", "second")]
    assert sorted(stored) == sorted(expected)
    for stream_id in {e.stream_id for e in received}:
        events = await service.store.read_stream(stream_id)
        assert [e.stream_version for e in events] == list(range(1, len(events) + 1))
        types = [e.type for e in events]
        if "ConversationClosed" in types:
            assert types.index("ConversationClosed") == len(types) - 1, types
    assert set((await open_counts(service)).values()) <= {0, 1}
    assert service.batcher.deliveries > service.batcher.statements  # batches did form
    await other.store.close()


async def test_the_hinted_insert_finds_its_rows_by_their_keys_in_the_generic_plan(
    service: ConversationService,
) -> None:
    # Keys with a conversation each, and statistics that say so: the contact's index then
    # looks as selective as the primary key, and "=" on the contact let the planner take it
    # (a contact with many conversations would have them all read).
    for n in range(300):
        await service.receive_inbound("fb", f"one-{n}", msg(f"o-{n}"))
    async with service.pool.connection() as conn:
        await conn.execute("ANALYZE conversations")

    async def generic_plan(statement: str, params: str, arguments: str) -> str:
        """The generic plan of ``statement``; ``params`` names its parameters in order, each
        with its type (``name type, ...``), and ``arguments`` gives their values."""
        names, types = zip(*(p.split() for p in params.split(", ")), strict=True)
        for n, name in enumerate(names, 1):
            statement = re.sub(rf"%\({name}\)[sb]", f"${n}", statement)
        assert "%(" not in statement, statement
        async with service.pool.connection() as conn, conn.transaction():
            await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            await conn.execute(f"PREPARE probe ({', '.join(types)}) AS {statement}")
            cur = await conn.execute(f"EXPLAIN EXECUTE probe ({arguments})")
            shown = "\n".join(row[0] for row in await cur.fetchall())
            await conn.execute("DEALLOCATE probe")
        return shown

    plan = await generic_plan(
        RECEIVE_TO_OPEN,
        "event_id uuid, stream_id text, version bigint, conversation_id uuid, contact_id uuid,"
        " data text, metadata text",
        "gen_random_uuid(), 'conversation-x', 1, gen_random_uuid(), gen_random_uuid(), '{}', '{}'",
    )
    # And the batch's form, over arrays.
    many_plan = await generic_plan(
        RECEIVE_TO_OPEN_MANY,
        "event_ids uuid[], stream_ids text[], versions bigint[], conversation_ids uuid[],"
        " contact_ids uuid[], data text[], metadata text[]",
        "ARRAY[gen_random_uuid()], ARRAY['conversation-x'], ARRAY[1::bigint],"
        " ARRAY[gen_random_uuid()], ARRAY[gen_random_uuid()], ARRAY['{}'], ARRAY['{}']",
    )
    for shown in (plan, many_plan):
        assert "Seq Scan" not in shown, shown
        for index in ("events_stream_version_key", "conversations_pkey", "streams_inactive_idx"):
            assert index in shown, shown
        for index in ("conversations_contact_idx", "streams_pkey"):
            assert index not in shown, shown


async def test_a_service_with_a_stale_hint_stores_each_message_once_where_it_belongs(
    service: ConversationService,
) -> None:
    # Two services take turns on one key: each one's hint goes stale whenever the other
    # appends, and the other closes the conversation in between.
    other = ConversationService(service.store)
    results = []
    for n in range(12):
        receiver = (service, other)[n % 2]
        results.append(await receiver.receive_inbound("fb", "shared", msg(f"s-{n}")))
        if n == 6:
            await other.close(results[-1].conversation_id, by="ann")
    before, after = results[:7], results[7:]
    assert len({r.conversation_id for r in before}) == 1
    assert len({r.conversation_id for r in after}) == 1
    assert before[0].conversation_id != after[0].conversation_id and after[0].opened
    # Redelivered to the service that did not store them: duplicates, in their conversations.
    for n, result in enumerate(results):
        again = await (other, service)[n % 2].receive_inbound("fb", "shared", msg(f"s-{n}"))
        assert again.duplicate and again.conversation_id == result.conversation_id
    for conversation in (before[0], after[0]):
        events = await stream(service, conversation.conversation_id)
        assert [e.stream_version for e in events] == list(range(1, len(events) + 1))
    assert [e.type for e in await stream(service, before[0].conversation_id)][-1] == (
        "ConversationClosed"
    )
    received = await all_received(service)
    assert len(received) == len({e.event_id for e in received}) == 12


async def test_a_first_message_opens_its_conversation_with_the_statement_that_reads_the_key(
    service: ConversationService,
) -> None:
    pool = service.pool
    await service.receive_inbound("fb", "warm-up", msg("w-0"))  # learns the channel of fb
    await service.store.close()  # its wake-up sent, so the count below is the delivery's alone
    pool.pop_stats()
    first = await service.receive_inbound("fb", "newcomer", msg("n-0"))
    # One pool connection, so one statement: the reading and the opening went together.
    assert pool.pop_stats().get("requests_num") == 1
    assert first.opened and first.contact_id is not None
    opened, received = await stream(service, first.conversation_id)
    assert opened.type == "ConversationOpened" and opened.stream_version == 1
    assert opened.data.channel == "messenger" and opened.data.contact_id == first.contact_id
    assert received.event_id == first.message_id and received.stream_version == 2
    assert received.data.conversation_id == first.conversation_id
    assert received.data.provider == "messenger" and received.data.text == "text n-0"
    contact_events = await service.store.read_stream(f"contact-{first.contact_id}")
    assert [e.type for e in contact_events] == ["ContactCreated"]
    assert opened.position < received.position and contact_events[0].position < opened.position
    # Services that never saw the key: a redelivery stays one message, a second message goes
    # to the same conversation, and two first messages of a new key racing make one.
    others = [ConversationService(service.store) for _ in range(2)]
    for other in others:
        await other.receive_inbound("fb", "warm-up", msg("w-1"))
    again = await others[0].receive_inbound("fb", "newcomer", msg("n-0"))
    assert again.duplicate and again.conversation_id == first.conversation_id
    second = await others[1].receive_inbound("fb", "newcomer", msg("n-1"))
    assert second.conversation_id == first.conversation_id and not second.opened
    racing = await asyncio.gather(
        *(other.receive_inbound("fb", "racer", msg(f"r-{n}")) for n in range(2) for other in others)
    )
    assert len({r.conversation_id for r in racing}) == 1
    assert sum(r.opened for r in racing) == 1
    # A guest who signed up has a contact and no conversation: the first message opens one
    # for that contact (after the reading says so).
    guest = await service.guest_sign_up("web", username="gus")
    await service.receive_inbound("web", "warm-up", msg("w-2"))
    first_words = await service.receive_inbound("web", guest.guest_id, msg("g-0"))
    assert first_words.opened and first_words.contact_id == guest.contact_id
    assert (await open_counts(service))[("web", guest.guest_id)] == 1


async def test_connection_cache_keeps_found_connections_for_its_ttl_and_never_a_miss(
    pool: AsyncConnectionPool[Any],
) -> None:
    cache = ConnectionCache(pool, ttl=0.2)
    assert await cache.find("messenger", "page-9") is None
    await add_connection(pool, "late", channel="messenger", external_id="page-9", app_secret="a")
    found = await cache.find("messenger", "page-9")  # the miss was not kept: it routes at once
    assert found is not None and found.name == "late"
    async with pool.connection() as conn:
        await conn.execute("UPDATE connections SET app_secret = 'b' WHERE name = 'late'")
    assert (await cache.get("late")).app_secret == "a"  # kept for the ttl
    await asyncio.sleep(0.25)
    assert (await cache.get("late")).app_secret == "b"
    assert (await cache.find("messenger", "page-9")) == await cache.get("late")
    # Many ids at once: the kept ones from the cache, the rest in one query, misses left out.
    await add_connection(pool, "other", channel="messenger", external_id="page-8", app_secret="c")
    await add_connection(pool, "ig", channel="instagram", external_id="page-7", app_secret="d")
    many = await cache.find_many("messenger", ["page-9", "page-8", "page-7", "page-404"])
    assert {k: c.name for k, c in many.items()} == {"page-9": "late", "page-8": "other"}
    async with pool.connection() as conn:
        await conn.execute("UPDATE connections SET app_secret = 'e' WHERE name = 'other'")
    assert (await cache.find_many("messenger", ["page-8"]))["page-8"].app_secret == "c"


async def test_a_caller_cancelled_while_its_batch_waits_leaves_the_others_alone(
    service: ConversationService,
) -> None:
    keys = [f"cancel-{n}" for n in range(8)]
    opened = await asyncio.gather(*(service.receive_inbound("fb", k, msg(f"{k}-0")) for k in keys))
    service.batcher.max_in_flight = 1  # the first runs alone, the rest wait as one batch
    tasks = [asyncio.create_task(service.receive_inbound("fb", k, msg(f"{k}-1"))) for k in keys]
    await asyncio.sleep(0)
    tasks[3].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[3], asyncio.CancelledError)
    for n, (first, result) in enumerate(zip(opened, results, strict=True)):
        if n != 3:
            assert not isinstance(result, BaseException)
            assert result.conversation_id == first.conversation_id and not result.duplicate
    # The cancelled caller's message went with its batch (as a request cut off after it was
    # sent may be stored); a redelivery finds it stored once.
    again = await service.receive_inbound("fb", keys[3], msg(f"{keys[3]}-1"))
    received = [
        e.data.provider_message_id
        for e in await stream(service, opened[3].conversation_id)
        if isinstance(e.data, MessageReceived)
    ]
    assert received.count(f"{keys[3]}-1") == 1
    assert again.conversation_id == opened[3].conversation_id


# ------------------------------------------------------- found by review, with repro scripts


async def test_identifications_sharing_an_email_at_once_end_in_one_contact(
    service: ConversationService,
) -> None:
    """Each saw no match when both read first; now the later one matches the earlier."""
    for n in range(10):
        a = await service.guest_sign_up("web")
        b = await service.guest_sign_up("web")
        email = f"same-{n}@example.com"
        results = await asyncio.gather(
            service.identify(a.contact_id, email=email),
            service.identify(b.contact_id, email=email.upper()),
        )
        assert results[0] == results[1]
        async with service.pool.connection() as conn:
            live = await (
                await conn.execute(
                    "SELECT count(*) FROM contacts WHERE lower(email) = %s AND merged_into IS NULL",
                    (email,),
                )
            ).fetchone()
        assert live == (1,)


async def test_identify_follows_a_match_merged_while_it_ran(
    service: ConversationService,
) -> None:
    """The match merged into a third contact meanwhile: identify joins that one."""
    for n in range(10):
        b = await service.guest_sign_up("web")
        await service.identify(b.contact_id, email=f"b-{n}@example.com")
        c = await service.guest_sign_up("web")
        await service.identify(c.contact_id, client_id=f"c-{n}")
        a = await service.guest_sign_up("web")
        joined, _ = await asyncio.gather(
            service.identify(a.contact_id, email=f"b-{n}@example.com"),
            service.merge_contacts(b.contact_id, c.contact_id),
        )
        assert joined in (b.contact_id, c.contact_id)
        # Whichever ran first, a's conversations and key end with the survivor, c.
        assert await service.contact_of("web", a.guest_id) == c.contact_id


async def test_identifiers_of_a_merged_contact_still_match(service: ConversationService) -> None:
    b = await service.guest_sign_up("web")
    assert await service.identify(b.contact_id, email="b@example.com") == b.contact_id
    # g1 says who it is twice over; the email matches b, so g1 joins b...
    g1 = await service.guest_sign_up("web")
    assert await service.identify(g1.contact_id, client_id="client-42", email="b@example.com") == (
        b.contact_id
    )
    # ...and b now answers to the client id g1 gave.
    g2 = await service.guest_sign_up("web")
    assert await service.identify(g2.contact_id, client_id="client-42") == b.contact_id
    # An identifier another contact already answers to is not handed on: the email stays n's.
    m = await service.guest_sign_up("web")
    await service.identify(m.contact_id, client_id="client-m")
    n = await service.guest_sign_up("web")
    await service.identify(n.contact_id, email="n@example.com")
    g3 = await service.guest_sign_up("web")
    joined = await service.identify(g3.contact_id, client_id="client-m", email="n@example.com")
    assert joined == m.contact_id
    g4 = await service.guest_sign_up("web")
    assert await service.identify(g4.contact_id, email="n@example.com") == n.contact_id


async def test_a_merge_into_a_guest_leaves_identifiers_free(service: ConversationService) -> None:
    """A plain merge hands nothing on: a guest that never identified gets no client id that
    identify could then neither match nor take."""
    r = await service.guest_sign_up("web")
    await service.identify(r.contact_id, client_id="client-r")
    g = await service.guest_sign_up("web")
    await service.merge_contacts(r.contact_id, g.contact_id)
    late = await service.guest_sign_up("web")
    assert await service.identify(late.contact_id, client_id="client-r") == late.contact_id


async def test_identifying_again_while_another_identifies_alike_takes_turns(
    service: ConversationService,
) -> None:
    """No deadlock (each retried attempt is counted): the identifier's lock comes first."""
    a = await service.guest_sign_up("web")
    await service.identify(a.contact_id, email="again@example.com")
    for _ in range(10):
        b = await service.guest_sign_up("web")
        results = await asyncio.gather(
            service.identify(a.contact_id, email="again@example.com"),
            service.identify(b.contact_id, email="again@example.com"),
        )
        assert results == [a.contact_id, a.contact_id]
    assert service.stats.conflicts_retried == 0


async def test_a_close_reason_may_be_empty(service: ConversationService) -> None:
    for n, reason in enumerate(("", "   ", "\n")):
        c = await service.receive_inbound("fb", f"blank-{n}", msg(f"b-{n}"))
        closed = await service.close(c.conversation_id, by="agent", reason=reason)
        assert not closed.duplicate


async def test_a_retried_reply_with_its_if_match_version_is_a_duplicate(
    service: ConversationService,
) -> None:
    """The reply's own event moved the version; the retry is the same reply, not a conflict."""
    c = await service.receive_inbound("fb", "quinn", msg("1", at=dt.datetime.now(dt.UTC)))
    first = await service.reply(
        c.conversation_id, by="agent", text="hi", idempotency_key="k", expected_version=2
    )
    retry = await service.reply(
        c.conversation_id, by="agent", text="hi", idempotency_key="k", expected_version=2
    )
    assert retry.duplicate and retry.event_ids == first.event_ids
    with pytest.raises(WrongExpectedVersion):  # another reply on the stale version conflicts
        await service.reply(
            c.conversation_id, by="agent", text="hi", idempotency_key="k2", expected_version=2
        )


async def test_inbound_metadata_may_use_any_key(service: ConversationService) -> None:
    metadata = {"event_id": "mine", "payload": 1, "self": 2, "metadata": 3}
    for psid in ("new-key", "new-key"):  # a first message, then one to the open conversation
        result = await service.receive_inbound("fb", psid, msg(f"m-{uuid7()}"), metadata=metadata)
        [received] = [
            e
            for e in await stream(service, result.conversation_id)
            if e.event_id == result.message_id
        ]
        assert {k: received.metadata[k] for k in metadata} == metadata


async def test_more_bad_input_is_refused_and_changes_nothing(
    service: ConversationService,
) -> None:
    c = await service.receive_inbound("fb", "rae", msg("1"))
    before = await service.store.read_all()
    # A time past the year 9999 in UTC: PostgreSQL would store it, Python could not read it.
    late = dt.datetime(9999, 12, 31, 23, 59, tzinfo=dt.timezone(-dt.timedelta(hours=23)))
    with pytest.raises(InvalidCommand):
        await service.snooze(c.conversation_id, by="agent", until=late)
    with pytest.raises(InvalidCommand):
        await service.receive_inbound("fb", "rae", msg("2", at=late))
    for text in ("", "   ", "\n\t"):  # nothing to show, and no attachment
        empty = InboundMessage(provider_message_id="3", sent_at=BASE, text=text)
        with pytest.raises(InvalidCommand):
            await service.receive_inbound("fb", "rae", empty)
    for bad in ("x\ud800", "nul\x00"):  # not UTF-8, or not storable in text
        with pytest.raises(InvalidCommand):
            await service.receive_inbound("fb", "rae", msg("4", text=bad))
        with pytest.raises(InvalidCommand):
            await service.receive_inbound("fb", bad, msg("5"))
        with pytest.raises(InvalidCommand):
            await service.close(c.conversation_id, by="agent", reason=bad)
        with pytest.raises(InvalidCommand):
            await service.reply(c.conversation_id, by="agent", text="hi", idempotency_key=bad)
        with pytest.raises(InvalidCommand):
            await service.guest_sign_up("web", email=bad)
    with pytest.raises(InvalidCommand):
        await service.close(c.conversation_id, by="agent", reason="x" * 20_001)
    for name in ("we\x00b", "web\n", "nope/"):
        with pytest.raises(ConnectionNotFound):
            await service.guest_sign_up(name)
        with pytest.raises(ConnectionNotFound):
            await service.contact_of(name, "p")
    assert await service.store.read_all() == before
    for policy in ("reopen-within=1000000000d", "reopen-within=99999999999999999999s"):
        with pytest.raises(InvalidCommand):
            parse_reopen_policy(policy)
    with pytest.raises(InvalidCommand):
        await add_connection(service.pool, "trailing\n", channel="widget", external_id="x")
    with pytest.raises(InvalidCommand):
        await add_connection(service.pool, "sur", channel="widget", external_id="x\ud800")


async def test_identify_joining_a_guest_through_a_merge_leaves_its_ids_free(
    service: ConversationService,
) -> None:
    """The match merged into a guest that never registered while identify ran: identify joins
    that guest, but gives it no identifier the probes could not find it by."""
    for n in range(15):
        r = await service.guest_sign_up("web")
        await service.identify(r.contact_id, client_id=f"x-{n}")
        g = await service.guest_sign_up("web")
        b = await service.guest_sign_up("web")
        await asyncio.gather(
            service.identify(b.contact_id, client_id=f"x-{n}"),
            service.merge_contacts(r.contact_id, g.contact_id),
        )
        later = await service.guest_sign_up("web")
        await service.identify(later.contact_id, client_id=f"x-{n}")  # matched, or registers


@pytest.mark.parametrize("state", [StreamState.ARCHIVED, StreamState.DELETED])
async def test_a_delivery_never_appends_to_an_inactive_stream(
    service: ConversationService, state: StreamState
) -> None:
    # The service's hint for the key is fresh (the second delivery took the hinted insert), so
    # only the stream's state, read through streams_inactive_idx, stands between the third
    # delivery and the archived or deleted stream.
    first = await service.receive_inbound("fb", "gone", msg("g-1"))
    await service.receive_inbound("fb", "gone", msg("g-2"))
    stream_id = f"conversation-{first.conversation_id}"
    await service.store.set_stream_state(stream_id, state)
    before = [e.event_id for e in await stream(service, first.conversation_id)]
    with pytest.raises(StreamDeleted) as info:
        await service.receive_inbound("fb", "gone", msg("g-3"))
    assert info.value.stream_id == stream_id and info.value.state == state
    assert [e.event_id for e in await stream(service, first.conversation_id)] == before
