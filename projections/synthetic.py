"""Synthetic conversation traffic, for the projector's tests and benchmarks.

:func:`traffic` plays a deterministic (seeded) inbox: conversations open on a few connections,
customers write, agents reply, read, edit, snooze, close, reopen, delete, restore, and contacts
merge, interleaved the way concurrent conversations interleave in the log. Every event is
valid for the domain (a read names a message of its conversation, an unsnooze follows a snooze).
:func:`append_all` appends it through the :class:`EventStore` (per-stream order kept under
concurrency); :func:`copy_into_log` bulk-loads it for benchmarks of a million events.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, Literal, NamedTuple

import msgspec
import psycopg

from conversations.events import (
    CODEC,
    Attachment,
    ContactCreated,
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
from eventstore import EventStore, category_of, uuid7

__all__ = ["Append", "append_all", "copy_into_log", "traffic"]

Channel = Literal["messenger", "instagram", "telegram", "widget"]

_EPOCH = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
_CHANNELS: tuple[Channel, ...] = ("messenger", "instagram", "telegram", "widget")
_WORDS = ("hello", "order", "refund", "thanks", "where", "is", "my", "parcel", "ok", "please")


class Append(NamedTuple):
    """One append: a stream and the events to add to it, in order."""

    stream_id: str
    events: list[msgspec.Struct]


class _Conv:
    __slots__ = ("contact", "deleted", "id", "inbound", "messages", "status")

    def __init__(self, cid: uuid.UUID, contact: uuid.UUID) -> None:
        self.id = cid
        self.contact = contact
        self.status = "open"
        self.deleted = False
        self.messages: list[uuid.UUID] = []
        self.inbound: list[tuple[uuid.UUID, str]] = []


def traffic(
    events: int,
    *,
    conversations: int | None = None,
    connections: int = 4,
    seed: int = 0,
    merges: bool = True,
    active: int = 200,
) -> Iterator[Append]:
    """About ``events`` events (a whole append more at most), in log order.

    ``conversations`` caps how many open (default: one per ten events); ``active`` is how many
    are in progress at once (the interleaving width).
    """
    rng = random.Random(seed)
    limit = conversations if conversations is not None else max(1, events // 10)
    names = [f"conn-{i}" for i in range(connections)]
    clock = _EPOCH
    opened = 0
    produced = 0
    live: list[_Conv] = []
    contacts: list[uuid.UUID] = []

    def tick() -> dt.datetime:
        nonlocal clock
        clock += dt.timedelta(milliseconds=rng.randint(1, 2000))
        return clock

    def text() -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 12)))

    def inbound(conv: _Conv) -> MessageReceived:
        mid = uuid7()
        pid = f"m{rng.getrandbits(48):x}"
        conv.messages.append(mid)
        conv.inbound.append((mid, pid))
        attachments: tuple[Attachment, ...] = ()
        body: str | None = text()
        if rng.random() < 0.05:
            attachments = (Attachment("image", url=f"https://cdn.example/{pid}.jpg"),)
            body = None if rng.random() < 0.5 else body
        when = tick()
        return MessageReceived(conv.id, mid, "messenger", pid, body, when, when, attachments)

    while produced < events:
        if opened < limit and (len(live) < active or not live):
            # A new customer writes: contact, conversation, first message.
            cid = uuid7()
            contact = uuid7()
            connection = rng.choice(names)
            psid = f"psid-{rng.getrandbits(40):x}"
            when = tick()
            contacts.append(contact)
            yield Append(contact_stream(contact), [ContactCreated(contact, connection, psid, when)])
            conv = _Conv(cid, contact)
            channel: Channel = _CHANNELS[names.index(connection) % len(_CHANNELS)]
            first = ConversationOpened(cid, connection, channel, psid, contact, when)
            yield Append(conversation_stream(cid), [first, inbound(conv)])
            live.append(conv)
            opened += 1
            produced += 3
            continue
        if not live:
            break
        conv = rng.choice(live)
        stream = conversation_stream(conv.id)
        roll = rng.random()
        batch: list[msgspec.Struct]
        if merges and roll < 0.001 and len(contacts) > 2:
            source, into = rng.sample(contacts, 2)
            contacts.remove(source)
            moved = tuple(c.id for c in live if c.contact == source)
            for c in live:
                if c.contact == source:
                    c.contact = into
            produced += 1
            yield Append(contact_stream(into), [ContactsMerged(source, into, tick(), moved)])
            continue
        if conv.deleted:
            batch = [ConversationRestored(conv.id, "agent", tick())]
            conv.deleted = False
        elif roll < 0.45:
            batch = [inbound(conv)]
            if conv.status == "snoozed" and rng.random() < 0.5:
                batch.insert(0, ConversationUnsnoozed(conv.id, "customer", clock))
                conv.status = "open"
        elif roll < 0.70:
            mid = uuid7()
            conv.messages.append(mid)
            batch = [MessageSent(conv.id, mid, text(), tick(), rng.choice(("ann", "bob")))]
        elif roll < 0.80:
            batch = [MessagesRead(conv.id, "ann", rng.choice(conv.messages[-3:]), tick())]
        elif roll < 0.83 and conv.inbound:
            mid, pid = rng.choice(conv.inbound[-3:])
            batch = [MessageEdited(conv.id, mid, pid, text(), tick())]
        elif roll < 0.88:
            if conv.status == "closed":
                batch = [ConversationReopened(conv.id, "agent", tick())]
                conv.status = "open"
            else:
                batch = [ConversationClosed(conv.id, "agent", tick())]
                conv.status = "closed"
        elif roll < 0.93:
            if conv.status == "snoozed":
                batch = [ConversationUnsnoozed(conv.id, "agent", tick())]
                conv.status = "open"
            elif conv.status == "open":
                when = tick()
                until = (
                    None if rng.random() < 0.5 else when + dt.timedelta(hours=rng.randint(1, 48))
                )
                batch = [ConversationSnoozed(conv.id, "agent", when, until)]
                conv.status = "snoozed"
            else:
                batch = [ConversationReopened(conv.id, "agent", tick())]
                conv.status = "open"
        elif roll < 0.94:
            when = tick()
            batch = [ConversationDeleted(conv.id, "agent", when)]
            if conv.status != "closed":
                batch.insert(0, ConversationClosed(conv.id, "agent", when, "deleted"))
                conv.status = "closed"
            conv.deleted = True
        else:
            batch = [inbound(conv)]
        produced += len(batch)
        yield Append(stream, batch)
        if opened < limit and rng.random() < 0.02:
            # Conversations go quiet; a new one takes the place in the interleaving.
            live.remove(conv)


async def append_all(
    store: EventStore,
    appends: Sequence[Append],
    *,
    workers: int = 4,
    per_transaction: int = 1,
) -> int:
    """Append through ``store`` with ``workers`` concurrent writers; return events appended.

    Each stream belongs to one writer, so its events keep their order; streams of different
    writers interleave as concurrent traffic does. ``per_transaction`` appends share one
    transaction (fewer commits, for loading test data fast).
    """
    lanes: list[list[Append]] = [[] for _ in range(max(1, workers))]
    for item in appends:
        lanes[hash(item.stream_id) % len(lanes)].append(item)

    async def lane(items: list[Append]) -> int:
        count = 0
        for start in range(0, len(items), per_transaction):
            chunk = items[start : start + per_transaction]
            async with store.pool.connection() as conn, conn.transaction():
                for item in chunk:
                    events = [CODEC.new_event(e) for e in item.events]
                    await store.append(item.stream_id, events, connection=conn)
                    count += len(events)
            store.wake_subscribers()
        return count

    return sum(await asyncio.gather(*(lane(items) for items in lanes)))


async def copy_into_log(
    conn: psycopg.AsyncConnection[Any], appends: Sequence[Append], *, per_transaction: int = 5000
) -> int:
    """Bulk-load appends into ``events`` and ``streams`` with COPY (benchmarks only: no
    expected-version checks); ``per_transaction`` events per transaction. Returns events."""
    versions: dict[str, int] = {}
    rows: list[tuple[Any, ...]] = []
    total = 0

    async def flush() -> None:
        async with conn.transaction():
            async with conn.cursor().copy(
                "COPY events (event_id, stream_id, stream_version, category, type, data) FROM STDIN"
            ) as copy:
                for row in rows:
                    await copy.write_row(row)
        rows.clear()

    for item in appends:
        for payload in item.events:
            version = versions.get(item.stream_id, 0) + 1
            versions[item.stream_id] = version
            rows.append(
                (
                    uuid7(),
                    item.stream_id,
                    version,
                    category_of(item.stream_id),
                    CODEC.type_name(payload),
                    CODEC.encode(payload).decode(),
                )
            )
            total += 1
        if len(rows) >= per_transaction:
            await flush()
    if rows:
        await flush()
    async with conn.transaction():
        async with conn.cursor().copy("COPY streams (stream_id, category) FROM STDIN") as copy:
            for stream_id in versions:
                await copy.write_row((stream_id, category_of(stream_id)))
    return total
