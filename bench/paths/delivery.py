"""Reply delivery: the delivery daemon's throughput against a fake provider that answers at once.

Each round commits a batch of queued agent replies in one transaction (half on Messenger, half
on Telegram conversations; untimed), with a :class:`~handlers.delivery.DeliveryDaemon` already
leading and idle in this process, and times it from that commit until every reply is delivered:
the queue projection picks them up, each reply is decided from its events and the decision
appended with the stream's expected version (``ReplyAttempted`` committed before the call), sent
to the fake provider on loopback (:class:`~handlers.fakeprovider.FakeProvider`: no latency, no
echoes), and its ``ReplyDelivered`` recorded. 32 replies in flight.

The reference is the hand-written outbox a careful developer would write with plain psycopg and
aiohttp at the same concurrency, on a plain table with the same replies: claim a queued row
(``UPDATE ... WHERE id = (SELECT ... FOR UPDATE SKIP LOCKED)``, committed before the call),
POST the same body to the same fake provider, mark the row delivered with the provider's id.
It records no history, takes no decision from one and keeps no read model, which the daemon
does.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from typing import Any, Final, LiteralString

import aiohttp
import msgspec

from conversations.connections import add_connection, get_connection
from conversations.delivery import echo_metadata
from conversations.errors import ConnectionNotFound
from conversations.events import CODEC, MessageSent, conversation_stream
from conversations.service import ConversationService, InboundMessage
from eventstore import ANY, EventStore, uuid7
from handlers.delivery import DeliveryDaemon, DeliverySettings
from handlers.fakeprovider import FakeProvider

from ..context import BenchContext, CostProbe
from ..registry import BenchPath, Measurement, register

__all__ = ["CONCURRENCY"]

CONCURRENCY: Final = 32
_CUSTOMERS: Final = 64  # per channel
_PAGE_TOKEN: Final = "bench-page-token"
_BOT_TOKEN: Final = "1:bench-bot-token"
_STATE: Final = "delivery"

_REF_DDL: LiteralString = """
CREATE TABLE IF NOT EXISTS bench_ref_outbox (
    id                  bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    channel             text        NOT NULL,
    recipient           text        NOT NULL,
    message_id          uuid        NOT NULL,
    text                text        NOT NULL,
    status              text        NOT NULL,
    attempts            integer     NOT NULL DEFAULT 0,
    provider_message_id text
);
CREATE INDEX IF NOT EXISTS bench_ref_outbox_queued_idx ON bench_ref_outbox (id)
    WHERE status = 'queued'
"""

_REF_CLAIM: LiteralString = """
UPDATE bench_ref_outbox SET status = 'sending', attempts = attempts + 1
WHERE id = (SELECT id FROM bench_ref_outbox WHERE status = 'queued'
            ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
RETURNING id, channel, recipient, message_id, text
"""

_REF_DONE: LiteralString = """
UPDATE bench_ref_outbox SET status = 'delivered', provider_message_id = %s WHERE id = %s
"""


class _Target(msgspec.Struct, frozen=True):
    channel: str
    recipient: str
    conversation_id: uuid.UUID


async def _setup(ctx: BenchContext) -> None:
    await ctx.execute(_REF_DDL)
    pool = await ctx.pool(2)
    for name, channel, extra in (
        ("bench-fb", "messenger", {"access_token": _PAGE_TOKEN}),
        ("bench-tg", "telegram", {"bot_token": _BOT_TOKEN}),
    ):
        try:
            await get_connection(pool, name)
        except ConnectionNotFound:
            await add_connection(pool, name, channel=channel, external_id=name, **extra)
    store = EventStore(pool, CODEC)
    service = ConversationService(store)
    now = dt.datetime.now(dt.UTC)
    targets = []
    for n in range(_CUSTOMERS):
        for name, channel, psid in (
            ("bench-fb", "messenger", f"bench-psid-{n}"),
            ("bench-tg", "telegram", str(500_000 + n)),
        ):
            result = await service.receive_inbound(
                name, psid, InboundMessage(f"bench-{psid}", now, "hello")
            )
            targets.append(_Target(channel, psid, result.conversation_id))
    await store.close()
    ctx.state[_STATE] = {"targets": targets, "rate": 400.0}


def _size(ctx: BenchContext, seconds: float) -> int:
    rate: float = ctx.state[_STATE]["rate"]
    return max(100, min(20_000, int(rate * seconds)))


def _fake() -> FakeProvider:
    return FakeProvider(page_tokens={_PAGE_TOKEN: ("bench-fb", "-")}, bot_tokens={_BOT_TOKEN})


async def daemon_delivery(ctx: BenchContext, seconds: float) -> Measurement:
    """Replies delivered per second by a leading, idle daemon, from the commit that queues them."""
    pool = await ctx.pool(CONCURRENCY + 8)
    store = EventStore(pool, CODEC)
    targets: list[_Target] = ctx.state[_STATE]["targets"]
    count = _size(ctx, seconds)
    now = dt.datetime.now(dt.UTC)
    by_stream: dict[str, list[Any]] = {}
    for i in range(count):
        target = targets[i % len(targets)]
        mid = uuid7()
        sent = MessageSent(target.conversation_id, mid, f"reply {i}", now, "bench", "agent")
        by_stream.setdefault(conversation_stream(target.conversation_id), []).append(
            CODEC.new_event(sent, event_id=mid)
        )
    async with _fake() as provider:
        settings = DeliverySettings(
            graph_api_url=provider.graph_url,
            telegram_api_url=provider.telegram_url,
            concurrency=CONCURRENCY,
            poll_interval=0.05,
            batch_size=1000,
        )
        daemon = DeliveryDaemon(pool, settings)
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(stop))
        try:
            async with asyncio.timeout(300):
                while not daemon.is_leader:
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.2)  # caught up with the log (other paths' events)
            probe = CostProbe(ctx)
            async with pool.connection() as conn:
                async with conn.transaction():
                    for stream, events in by_stream.items():
                        await store.append(stream, events, ANY, connection=conn)
                    await probe.start()
                    start = time.perf_counter()
            store.wake_subscribers()
            async with asyncio.timeout(600):
                while daemon.stats.delivered < count:
                    await asyncio.sleep(0.005)
            elapsed = time.perf_counter() - start
            details = await probe.stop(count)
        finally:
            stop.set()
            await task
            await store.close()
        sends = sum(provider.sends().values())
    if sends != count:
        raise RuntimeError(f"{count} replies but the provider counted {sends} sends")
    rate = count / elapsed
    ctx.state[_STATE]["rate"] = rate
    return Measurement(rate, "replies/s", details)


async def reference_outbox(ctx: BenchContext, seconds: float) -> Measurement:
    """Replies delivered per second by a hand-written outbox of plain psycopg and aiohttp."""
    pool = await ctx.pool(CONCURRENCY + 1)
    targets: list[_Target] = ctx.state[_STATE]["targets"]
    count = _size(ctx, seconds)
    rows = [
        (t.channel, t.recipient, uuid7(), f"reply {i}")
        for i, t in ((i, targets[i % len(targets)]) for i in range(count))
    ]
    async with pool.connection() as conn:
        await conn.execute("TRUNCATE bench_ref_outbox")
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO bench_ref_outbox (channel, recipient, message_id, text, status)"
                " VALUES (%s, %s, %s, %s, 'queued')",
                rows,
            )
    delivered = 0
    async with (
        _fake() as provider,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY)) as session,
    ):
        graph = f"{provider.graph_url}/me/messages"
        telegram = f"{provider.telegram_url}/bot{_BOT_TOKEN}/sendMessage"

        async def worker() -> None:
            nonlocal delivered
            async with pool.connection() as conn:
                while True:
                    row = await (await conn.execute(_REF_CLAIM)).fetchone()
                    if row is None:
                        return
                    rid, channel, recipient, message_id, text = row
                    if channel == "messenger":
                        url, headers = graph, {"Authorization": f"Bearer {_PAGE_TOKEN}"}
                        body: dict[str, Any] = {
                            "recipient": {"id": recipient},
                            "messaging_type": "RESPONSE",
                            "message": {"text": text, "metadata": echo_metadata(message_id)},
                        }
                    else:
                        url, headers = telegram, {}
                        body = {"chat_id": int(recipient), "text": text}
                    async with session.post(
                        url,
                        data=msgspec.json.encode(body),
                        headers={**headers, "Content-Type": "application/json"},
                    ) as response:
                        answer = await response.json()
                    provider_id = str(
                        answer.get("message_id") or answer.get("result", {}).get("message_id")
                    )
                    await conn.execute(_REF_DONE, (provider_id, rid))
                    delivered += 1

        probe = CostProbe(ctx)
        await probe.start()
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        elapsed = time.perf_counter() - start
        details = await probe.stop(count)
    if delivered != count:
        raise RuntimeError(f"the reference delivered {delivered} of {count} replies")
    return Measurement(count / elapsed, "replies/s", details)


register(
    BenchPath(
        name="delivery_c32",
        description=(
            "convstore deliver: queued replies (Messenger and Telegram) to a fake provider on"
            " loopback that answers at once, 32 in flight; ReplyAttempted before and"
            " ReplyDelivered after each call (compare-and-set on the stream), queue projection"
        ),
        run=daemon_delivery,
        reference=reference_outbox,
        reference_description=(
            "hand-written outbox: claim a row with FOR UPDATE SKIP LOCKED, POST the same body"
            " to the same fake provider, mark it delivered; 32 workers"
        ),
        setup=_setup,
    )
)
