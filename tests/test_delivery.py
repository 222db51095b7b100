"""Reply delivery (issue 11): the daemon against a fake provider on loopback.

The fake provider (:mod:`handlers.fakeprovider`) is a real HTTP server on 127.0.0.1 that
answers like the Graph API Send endpoint and Telegram's ``sendMessage``, follows a script per
recipient (ok, 500, 429, timeout, dropped connection, permanent refusal) and counts what it was
sent. The daemon runs in this process with short delays; assertions are about what ends up in
the log, the read models and the provider's counts, never about how long it took.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from psycopg_pool import AsyncConnectionPool

from conversations.connections import add_connection
from conversations.delivery import (
    Attempt,
    GiveUp,
    Reply,
    ReplyLedger,
    ReplyState,
    RetryPolicy,
    Settled,
    Wait,
    decide,
    echo_metadata,
    reply_in_metadata,
)
from conversations.events import (
    CODEC,
    ReplyAttempted,
    ReplyAttemptFailed,
    ReplyDelivered,
)
from conversations.service import ConversationService, InboundMessage
from eventstore import EventStore, RecordedEvent
from handlers.delivery import DELIVERY, DeliveryDaemon, DeliverySettings
from handlers.fakeprovider import FakeProvider
from handlers.meta import signature_header
from projections import PROJECTIONS, InboxQueries, build_into, catch_up, compare_read_models
from tests.conftest import API_TOKEN

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
PAGE_TOKEN = "EAAG-page-token-never-logged"
IG_TOKEN = "EAAG-ig-token-never-logged"
BOT_TOKEN = "123456:bot-token-never-logged"
APP_SECRET = "app-secret"
INBOX = PROJECTIONS["inbox"]
#: Fast retries for tests: in-doubt after 1 s (the provider timeout is 0.4 s).
POLICY = RetryPolicy(max_attempts=4, base_delay=0.05, max_delay=0.2, in_doubt_after=1.0)
WAIT = 60.0


def settings(
    provider: FakeProvider | None, policy: RetryPolicy = POLICY, *, telegram_url: str = ""
) -> DeliverySettings:
    """Fast settings for tests, against ``provider`` (or only ``telegram_url``)."""
    return DeliverySettings(
        graph_api_url=provider.graph_url if provider else telegram_url,
        telegram_api_url=provider.telegram_url if provider else telegram_url,
        timeout=0.4,
        concurrency=16,
        policy=policy,
        poll_interval=0.05,
        standby_interval=0.2,
    )


async def connections(pool: AsyncConnectionPool[Any], *, meta_token: bool = True) -> None:
    await add_connection(
        pool,
        "fb",
        channel="messenger",
        external_id="page-1",
        app_secret=APP_SECRET,
        access_token=PAGE_TOKEN if meta_token else None,
    )
    await add_connection(
        pool,
        "ig",
        channel="instagram",
        external_id="ig-1",
        app_secret=APP_SECRET,
        access_token=IG_TOKEN,
    )
    await add_connection(pool, "tg", channel="telegram", external_id="bot-1", bot_token=BOT_TOKEN)
    await add_connection(pool, "site", channel="widget", external_id="w-1")


def fake(**kwargs: Any) -> FakeProvider:
    return FakeProvider(
        page_tokens={PAGE_TOKEN: ("page-1", APP_SECRET), IG_TOKEN: ("ig-1", APP_SECRET)},
        bot_tokens={BOT_TOKEN},
        hang=3.0,
        **kwargs,
    )


class World:
    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self.pool = pool
        self.store = EventStore(pool, CODEC)
        self.service = ConversationService(self.store)
        self.ledger = ReplyLedger(self.store, POLICY)

    async def customer(
        self, connection: str, psid: str, *, at: dt.datetime | None = None
    ) -> uuid.UUID:
        when = at or dt.datetime.now(dt.UTC)
        result = await self.service.receive_inbound(
            connection,
            psid,
            InboundMessage(f"in-{connection}-{psid}-{when.timestamp()}", when, "hi"),
        )
        return result.conversation_id

    async def reply(self, conversation_id: uuid.UUID, text: str, **kwargs: Any) -> uuid.UUID:
        result = await self.service.reply(
            conversation_id, by="agent", text=text, idempotency_key=text, **kwargs
        )
        return result.event_ids[0]

    async def events(self, conversation_id: uuid.UUID) -> list[RecordedEvent]:
        return await self.store.read_stream(f"conversation-{conversation_id}")

    async def delivery(self, message_id: uuid.UUID) -> list[Any]:
        async with self.pool.connection() as conn:
            row = await (
                await conn.execute(
                    "SELECT stream_id FROM events WHERE event_id = %s", (message_id,)
                )
            ).fetchone()
        assert row is not None
        return [
            e.data
            for e in await self.store.read_stream(row[0])
            if e.type.startswith("Reply") and e.data.message_id == message_id
        ]

    async def state(self, message_id: uuid.UUID) -> ReplyState:
        reply = await self.ledger.load(message_id)
        assert reply is not None
        return await self.ledger.state(reply)

    async def wait_settled(self, ids: list[uuid.UUID], timeout: float = WAIT) -> None:
        async with asyncio.timeout(timeout):
            while True:
                states = [await self.state(i) for i in ids]
                if all(s.settled for s in states):
                    return
                await asyncio.sleep(0.05)

    async def close(self) -> None:
        await self.store.close()


@pytest.fixture
async def world(pool: AsyncConnectionPool[Any]) -> AsyncIterator[World]:
    w = World(pool)
    try:
        yield w
    finally:
        await w.close()


@contextlib.asynccontextmanager
async def daemon(
    pool: AsyncConnectionPool[Any], config: DeliverySettings
) -> AsyncIterator[DeliveryDaemon]:
    d = DeliveryDaemon(pool, config)
    stop = asyncio.Event()
    task = asyncio.create_task(d.run(stop))
    try:
        yield d
    finally:
        stop.set()
        assert await asyncio.wait_for(task, WAIT) == "stopped"


async def until(check: Callable[[], Awaitable[bool]], timeout: float = WAIT) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


# --------------------------------------------------------------------------- healthy provider


async def test_every_reply_is_delivered_once_on_each_channel(
    pool: AsyncConnectionPool[Any], world: World, http: TestClient[Any, Any]
) -> None:
    await connections(pool)
    guest = await (await http.post("/widget/site/guests", json={})).json()
    guest_auth = {"Authorization": f"Bearer {guest['token']}"}
    sent = await http.post(
        "/widget/site/messages", json={"client_message_id": "c1", "text": "hi"}, headers=guest_auth
    )
    site = uuid.UUID((await sent.json())["conversation_id"])
    conversations = {
        "fb": await world.customer("fb", "psid-1"),
        "ig": await world.customer("ig", "igsid-1"),
        "tg": await world.customer("tg", "4242"),
        "site": site,
    }
    replies = {
        name: [await world.reply(cid, f"{name} reply {n}") for n in range(5)]
        for name, cid in conversations.items()
    }
    # Not visible to the guest before it is delivered.
    history = await (await http.get("/widget/site/messages", headers=guest_auth)).json()
    assert [m["direction"] for m in history["items"]] == ["in"]

    async with fake() as provider, daemon(pool, settings(provider)):
        ids = [i for group in replies.values() for i in group]
        await world.wait_settled(ids)

    sends = provider.sends()
    for message_id in replies["fb"] + replies["ig"]:
        assert sends[echo_metadata(message_id)] == 1
    for n in range(5):
        assert sends[f"tg reply {n}"] == 1
    assert len(provider.requests) == 15  # nothing for the widget, nothing twice
    for name, group in replies.items():
        for message_id in group:
            events = await world.delivery(message_id)
            if name == "site":
                assert [type(e) for e in events] == [ReplyDelivered]
                continue
            assert [type(e) for e in events] == [ReplyAttempted, ReplyDelivered]
            assert events[1].provider_message_id is not None
            if name == "tg":
                assert events[1].provider_message_id.startswith("4242:")

    history = await (await http.get("/widget/site/messages", headers=guest_auth)).json()
    assert [m["text"] for m in history["items"]] == ["hi"] + [f"site reply {n}" for n in range(5)]

    await catch_up(pool, [INBOX, DELIVERY])
    page = await (
        await http.get(f"/api/conversations/{conversations['fb']}/messages", headers=AUTH)
    ).json()
    outbound = [m for m in page["items"] if m["direction"] == "out"]
    assert len(outbound) == 5
    assert {m["delivery_status"] for m in outbound} == {"delivered"}
    assert all(m["provider_message_id"].startswith("m_fake") for m in outbound)
    assert all(m["delivery_attempts"] == 1 and m["delivered_at"] for m in outbound)
    row = await (await http.get(f"/api/conversations/{conversations['fb']}", headers=AUTH)).json()
    assert (row["last_message_status"], row["failed_replies"]) == ("delivered", 0), row
    inbound = [m for m in page["items"] if m["direction"] == "in"]
    assert inbound[0]["delivery_status"] is None

    metrics = await (await http.get("/metrics")).text()
    assert 'convstore_delivery_replies_total{outcome="delivered"} 20.0' in metrics
    assert 'convstore_delivery_replies_total{outcome="queued"} 20.0' in metrics
    assert 'convstore_delivery_attempts_total{result="begun"} 15.0' in metrics
    assert "convstore_delivery_latency_seconds_count 20.0" in metrics
    assert "convstore_delivery_pending 0.0" in metrics


async def test_a_reply_posted_twice_with_one_key_is_queued_and_sent_once(
    pool: AsyncConnectionPool[Any], world: World, http: TestClient[Any, Any]
) -> None:
    await connections(pool)
    cid = await world.customer("fb", "psid-2")
    path = f"/api/conversations/{cid}/messages"
    headers = {**AUTH, "Idempotency-Key": "key-1"}
    first, again = await asyncio.gather(
        http.post(path, json={"text": "on its way"}, headers=headers),
        http.post(path, json={"text": "on its way"}, headers=headers),
    )
    bodies = [await first.json(), await again.json()]
    assert {first.status, again.status} == {200}
    assert sorted(b["duplicate"] for b in bodies) == [False, True]
    assert bodies[0]["event_ids"] == bodies[1]["event_ids"]
    reply = uuid.UUID(bodies[0]["event_ids"][0])
    sent = [e for e in await world.events(cid) if e.type == "MessageSent"]
    assert [e.event_id for e in sent] == [reply]
    async with fake() as provider, daemon(pool, settings(provider)):
        await world.wait_settled([reply])
    assert provider.sends() == {echo_metadata(reply): 1}


# --------------------------------------------------------------------------- failures


async def test_transient_failures_are_retried_then_delivered(
    pool: AsyncConnectionPool[Any], world: World
) -> None:
    await connections(pool)
    fb = await world.customer("fb", "flaky")
    tg = await world.customer("tg", "777")
    async with fake() as provider:
        provider.script("flaky", "error", "rate_limit")  # answered errors: not sent
        provider.script("777", "timeout")  # no answer: may have been sent
        first = await world.reply(fb, "fb after two errors")
        second = await world.reply(tg, "tg after a timeout")
        # No backoff: each retry is due at once, decided right after the failure is recorded.
        at_once = RetryPolicy(max_attempts=4, base_delay=0.0, in_doubt_after=1.0)
        async with daemon(pool, settings(provider, at_once)):
            await world.wait_settled([first, second])

    events = await world.delivery(first)
    assert [type(e).__name__ for e in events] == [
        "ReplyAttempted",
        "ReplyAttemptFailed",
        "ReplyAttempted",
        "ReplyAttemptFailed",
        "ReplyAttempted",
        "ReplyDelivered",
    ]
    assert [e.attempt for e in events] == [1, 1, 2, 2, 3, 3]
    failed = [e for e in events if isinstance(e, ReplyAttemptFailed)]
    assert [(e.status, e.maybe_sent) for e in failed] == [(500, False), (429, False)]
    assert "Service temporarily unavailable" in failed[0].error
    assert all(e.retry_at >= e.failed_at for e in failed)
    assert provider.sends()[echo_metadata(first)] == 1

    events = await world.delivery(second)
    assert [type(e).__name__ for e in events] == [
        "ReplyAttempted",
        "ReplyAttemptFailed",
        "ReplyAttempted",
        "ReplyDelivered",
    ]
    assert events[1].maybe_sent and events[1].status is None
    # Telegram has no echo and no idempotency key: a timed-out send is sent again, once.
    assert provider.sends()["tg after a timeout"] == 2


async def test_permanent_failures_stop_at_once_and_show_as_failed(
    pool: AsyncConnectionPool[Any], world: World, http: TestClient[Any, Any]
) -> None:
    await connections(pool)
    fb = await world.customer("fb", "gone")
    tg = await world.customer("tg", "555")
    async with fake() as provider:
        provider.script("gone", "invalid")
        provider.script("555", "invalid")
        bad_fb = await world.reply(fb, "to nobody")
        bad_tg = await world.reply(tg, "to no chat")
        async with daemon(pool, settings(provider)):
            await world.wait_settled([bad_fb, bad_tg])
    for message_id, status, error in (
        (bad_fb, 400, "No matching user found"),
        (bad_tg, 400, "chat not found"),
    ):
        events = await world.delivery(message_id)
        assert [type(e).__name__ for e in events] == ["ReplyAttempted", "ReplyFailed"]
        assert (events[1].reason, events[1].status) == ("permanent", status)
        assert error in events[1].error
    assert len(provider.requests) == 2

    await catch_up(pool, [INBOX, DELIVERY])
    row = await (await http.get(f"/api/conversations/{fb}", headers=AUTH)).json()
    assert (row["last_message_status"], row["failed_replies"]) == ("failed", 1)
    page = await (await http.get(f"/api/conversations/{fb}/messages", headers=AUTH)).json()
    out = next(m for m in page["items"] if m["direction"] == "out")
    assert out["delivery_status"] == "failed"
    assert "No matching user found" in out["delivery_error"]
    inbox = await (await http.get("/api/connections/fb/inbox", headers=AUTH)).json()
    assert [c["failed_replies"] for c in inbox["items"]] == [1]
    metrics = await (await http.get("/metrics")).text()
    assert 'convstore_delivery_replies_total{outcome="failed"} 2.0' in metrics


async def test_the_last_attempt_marks_the_reply_failed(
    pool: AsyncConnectionPool[Any], world: World
) -> None:
    await connections(pool)
    cid = await world.customer("fb", "down")
    async with fake() as provider:
        provider.script("down", *["error"] * 10)
        message_id = await world.reply(cid, "never")
        async with daemon(pool, settings(provider)):
            await world.wait_settled([message_id])
    events = await world.delivery(message_id)
    assert [type(e).__name__ for e in events][-2:] == ["ReplyAttemptFailed", "ReplyFailed"]
    assert events[-1].reason == "exhausted" and events[-1].attempt == POLICY.max_attempts
    assert len(provider.requests) == POLICY.max_attempts


async def test_replies_that_cannot_be_sent_fail_without_a_call(
    pool: AsyncConnectionPool[Any], world: World
) -> None:
    await connections(pool, meta_token=False)
    fb = await world.customer("fb", "no-token")
    message_id = await world.reply(fb, "no token to send it with")
    old = await world.customer("tg", "999")
    expiring = await world.reply(old, "too late")
    guest = await world.service.guest_sign_up("site")
    site = await world.customer("site", guest.guest_id)
    shown_late = await world.reply(site, "the guest reads it whenever")
    policy = RetryPolicy(base_delay=0.05, max_delay=0.2, in_doubt_after=1.0, max_age=0.0)
    async with fake() as provider, daemon(pool, settings(provider, policy)):
        await world.wait_settled([message_id, expiring, shown_late])
    assert (await world.delivery(message_id))[-1].reason == "expired"
    assert (await world.delivery(expiring))[-1].reason == "expired"
    assert [type(e) for e in await world.delivery(shown_late)] == [ReplyDelivered]  # no expiry
    assert provider.requests == []

    later = await world.reply(fb, "still no token")
    async with fake() as provider, daemon(pool, settings(provider)):
        await world.wait_settled([later])
    (failed,) = await world.delivery(later)
    assert failed.reason == "unsendable" and "--access-token" in failed.error
    assert provider.requests == []

    # The page then sent it by other means: its echo confirms it, and it shows as delivered.
    await catch_up(pool, [INBOX, DELIVERY])
    assert (await InboxQueries(pool).conversation(fb)).failed_replies == 2  # type: ignore[union-attr]
    echo = await world.service.record_echo(
        "fb",
        "no-token",
        provider_message_id="m_by_hand",
        text="still no token",
        sent_at=dt.datetime.now(dt.UTC),
        metadata=echo_metadata(later),
    )
    assert echo is not None and echo.confirmed_reply == later
    await catch_up(pool, [INBOX, DELIVERY])
    row = await InboxQueries(pool).conversation(fb)
    assert row is not None and (row.failed_replies, row.last_message_status) == (1, "delivered")
    page = await InboxQueries(pool).messages(fb)
    assert [(m.text, m.delivery_status, m.provider_message_id) for m in page.items][:2] == [
        ("still no token", "delivered", "m_by_hand"),
        ("no token to send it with", "failed", None),
    ]


async def test_tokens_never_reach_events_or_logs(
    pool: AsyncConnectionPool[Any], world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """A provider that quotes the credentials back in its error: stored and logged as ***."""

    async def leaky(request: web.Request) -> web.Response:
        said = f"bad credentials {request.headers.get('Authorization')} at {request.path}"
        return web.json_response(
            {"error": {"message": said, "code": 190}, "ok": False, "description": said},
            status=400,
        )

    app = web.Application()
    app.router.add_post("/{tail:.*}", leaky)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    await connections(pool)
    ids = [
        await world.reply(await world.customer("fb", "x"), "to fb"),
        await world.reply(await world.customer("tg", "31"), "to tg"),
    ]
    config = DeliverySettings(
        graph_api_url=base + "/graph",
        telegram_api_url=base + "/tg",
        timeout=0.4,
        policy=POLICY,
        poll_interval=0.05,
    )
    caplog.set_level(logging.DEBUG)
    try:
        async with daemon(pool, config):
            await world.wait_settled(ids)
    finally:
        await runner.cleanup()
    errors = [(await world.delivery(i))[-1].error for i in ids]
    assert all("***" in e for e in errors), errors
    async with pool.connection() as conn:
        rows = await (
            await conn.execute("SELECT data::text, metadata::text FROM events")
        ).fetchall()
    text = "\n".join(a + b for a, b in rows) + "\n".join(r.getMessage() for r in caplog.records)
    for secret in (PAGE_TOKEN, BOT_TOKEN, BOT_TOKEN.split(":")[1]):
        assert secret not in text


# --------------------------------------------------------------------------- echoes


async def _echo(
    http: TestClient[Any, Any], psid: str, mid: str, text: str, metadata: str | None
) -> dict[str, Any]:
    message: dict[str, Any] = {"mid": mid, "is_echo": True, "text": text}
    if metadata is not None:
        message["metadata"] = metadata
    at = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
    body = {
        "object": "page",
        "entry": [
            {
                "id": "page-1",
                "time": at,
                "messaging": [
                    {
                        "sender": {"id": "page-1"},
                        "recipient": {"id": psid},
                        "timestamp": at,
                        "message": message,
                    }
                ],
            }
        ],
    }
    import json

    raw = json.dumps(body).encode()
    response = await http.post(
        "/webhooks/meta",
        data=raw,
        headers={
            "Content-Type": "application/json",
            "X-Hub-Signature-256": signature_header(APP_SECRET, raw),
        },
    )
    assert response.status == 200
    result: dict[str, Any] = await response.json()
    return result


async def test_echoes_confirm_replies_and_never_become_second_messages(
    pool: AsyncConnectionPool[Any], world: World, http: TestClient[Any, Any]
) -> None:
    await connections(pool)
    cid = await world.customer("fb", "echoed")
    async with fake(echo_to=str(http.make_url("/webhooks/meta"))) as provider:
        provider.script("echoed", "ok", "timeout")
        delivered = await world.reply(cid, "sent and echoed")
        timed_out = await world.reply(cid, "timed out, echoed")
        async with daemon(pool, settings(provider)):
            await world.wait_settled([delivered, timed_out])
            await until(lambda: asyncio.sleep(0, provider.echoes_posted == 2))
    # The timed-out send was confirmed by its echo: never sent again.
    assert provider.sends() == {echo_metadata(delivered): 1, echo_metadata(timed_out): 1}
    assert (await world.state(timed_out)).confirmed
    events = await world.events(cid)
    assert [e.type for e in events if e.type.startswith("Message")] == [
        "MessageReceived",
        "MessageSent",
        "MessageSent",
    ]
    assert sum(e.type == "ReplyConfirmed" for e in events) == 2

    # A redelivered echo, an echo of the same reply with another mid (a resend), and an echo
    # naming the reply without metadata (matched by its mid): still no new message.
    confirmed = next(e.data for e in events if e.type == "ReplyConfirmed")
    again = await _echo(
        http, "echoed", confirmed.provider_message_id, "x", echo_metadata(confirmed.message_id)
    )
    assert again["duplicates"] == 1
    other = await _echo(http, "echoed", "m_other", "x", echo_metadata(confirmed.message_id))
    assert other["stored"] == 0 or other["duplicates"] == 1
    # A page message sent from elsewhere (other metadata) is an outbound echo, as before.
    elsewhere = await _echo(http, "echoed", "m_inbox", "sent from Meta's inbox", "x")
    assert elsewhere["stored"] == 1
    # An echo whose metadata names a reply of another customer does not confirm it.
    other_cid = await world.customer("fb", "someone-else")
    foreign = await world.reply(other_cid, "for someone else")
    spoof = await _echo(http, "echoed", "m_spoof", "x", echo_metadata(foreign))
    assert spoof["stored"] == 1 and not (await world.state(foreign)).confirmed
    sent = [e.data for e in await world.events(cid) if e.type == "MessageSent"]
    assert [m.source for m in sent] == ["agent", "agent", "echo", "echo"]

    await catch_up(pool, [INBOX, DELIVERY])
    page = await (await http.get(f"/api/conversations/{cid}/messages", headers=AUTH)).json()
    statuses = {m["text"]: m["delivery_status"] for m in page["items"]}
    assert statuses["sent and echoed"] == statuses["timed out, echoed"] == "delivered"


async def test_an_echo_arriving_before_the_daemon_records_delivery(
    pool: AsyncConnectionPool[Any], world: World, http: TestClient[Any, Any]
) -> None:
    """The echo may beat our own record: the reply is confirmed, then delivered, not doubled."""
    await connections(pool)
    cid = await world.customer("fb", "fast-echo")
    message_id = await world.reply(cid, "quick")
    reply = await world.ledger.load(message_id)
    assert reply is not None
    decision, _ = await world.ledger.begin(reply)
    assert decision == Attempt(1)
    echo = await _echo(http, "fast-echo", "m_fast", "quick", echo_metadata(message_id))
    assert echo["stored"] == 1
    assert (await world.state(message_id)).confirmed
    event = world.ledger.outcome(
        reply, ReplyDelivered(cid, message_id, 1, dt.datetime.now(dt.UTC), "m_fast")
    )
    await world.ledger.record(reply, event)
    await world.ledger.record(reply, event)  # a retried record is stored once
    assert [type(e).__name__ for e in await world.delivery(message_id)] == [
        "ReplyAttempted",
        "ReplyConfirmed",
        "ReplyDelivered",
    ]
    assert isinstance((await world.ledger.begin(reply))[0], Settled)
    await catch_up(pool, [INBOX, DELIVERY])
    page = await InboxQueries(pool).messages(cid)
    assert [(m.direction, m.delivery_status) for m in page.items] == [
        ("out", "delivered"),
        ("in", None),
    ]


# --------------------------------------------------------------------------- the window


async def test_messenger_window_refuses_late_replies_with_a_clear_422(
    pool: AsyncConnectionPool[Any], world: World, http: TestClient[Any, Any]
) -> None:
    await connections(pool)
    now = dt.datetime.now(dt.UTC)
    late = await world.customer("fb", "late", at=now - dt.timedelta(hours=25))
    ancient = await world.customer("ig", "ancient", at=now - dt.timedelta(days=8))
    quiet = await world.customer("tg", "1001", at=now - dt.timedelta(days=30))

    async def post(cid: uuid.UUID, key: str, **body: Any) -> tuple[int, dict[str, Any]]:
        response = await http.post(
            f"/api/conversations/{cid}/messages",
            json={"text": "hello again", **body},
            headers={**AUTH, "Idempotency-Key": key},
        )
        return response.status, await response.json()

    status, body = await post(late, "a")
    assert status == 422 and body["error"] == "messaging_window_closed"
    assert "24 hours" in body["message"] and "HUMAN_AGENT" in body["permitted_tags"]
    assert body["last_customer_message_at"] is not None
    assert (await post(late, "b", tag="HUMAN_AGENT"))[0] == 200
    assert (await post(late, "c", tag="ACCOUNT_UPDATE"))[0] == 200
    status, body = await post(late, "d", tag="NOT_A_TAG")
    assert status == 400 and body["field"] == "tag"
    # Instagram permits HUMAN_AGENT only, for 7 days.
    assert (await post(ancient, "e", tag="ACCOUNT_UPDATE"))[0] == 400
    status, body = await post(ancient, "f", tag="HUMAN_AGENT")
    assert status == 422 and "168 hours" in body["message"]
    # Telegram has no window.
    assert (await post(quiet, "g"))[0] == 200
    # A recent message opens the window again.
    await world.customer("fb", "late")
    assert (await post(late, "h"))[0] == 200
    # Text longer than the channel takes is refused up front.
    status, body = await post(quiet, "i", text="x" * 4097)
    assert status == 400 and body["field"] == "text"
    sent = [e.data for e in await world.events(late) if e.type == "MessageSent"]
    assert [m.tag for m in sent] == ["HUMAN_AGENT", "ACCOUNT_UPDATE", None]


@pytest.mark.parametrize(
    ("psid", "recipient"),
    [
        ("tagged", {"id": "tagged"}),
        # A customer Meta named by a plugin's user_ref (handlers.meta keys it so).
        ("user_ref:guest-7", {"user_ref": "guest-7"}),
    ],
)
async def test_tagged_replies_go_out_as_message_tags(
    pool: AsyncConnectionPool[Any], world: World, psid: str, recipient: dict[str, str]
) -> None:
    await connections(pool)
    cid = await world.customer("fb", psid, at=dt.datetime.now(dt.UTC) - dt.timedelta(days=2))
    message_id = await world.reply(cid, "your order shipped", tag="POST_PURCHASE_UPDATE")
    bodies: list[dict[str, Any]] = []

    async def record(request: web.Request) -> web.Response:
        bodies.append(await request.json())
        return web.json_response({"recipient_id": "tagged", "message_id": "m_1"})

    app = web.Application()
    app.router.add_post("/graph/me/messages", record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    config = DeliverySettings(
        graph_api_url=base + "/graph", telegram_api_url=base, timeout=0.4, policy=POLICY
    )
    try:
        async with daemon(pool, config):
            await world.wait_settled([message_id])
    finally:
        await runner.cleanup()
    assert bodies == [
        {
            "recipient": recipient,
            "messaging_type": "MESSAGE_TAG",
            "message": {"text": "your order shipped", "metadata": echo_metadata(message_id)},
            "tag": "POST_PURCHASE_UPDATE",
        }
    ]


# --------------------------------------------------------------------------- the decisions


def _reply(channel: str = "telegram") -> Reply:
    from conversations.connections import Connection

    now = dt.datetime.now(dt.UTC)
    connection = Connection(
        "c",
        channel,
        "x",
        "new",
        None,
        now,
        access_token="t",
        bot_token="t",  # type: ignore[arg-type]
    )
    return Reply(uuid.uuid4(), uuid.uuid4(), "conversation-x", 2, connection, "42", "hi", None, now)


def test_the_resend_budget_caps_sends_at_two() -> None:
    reply = _reply()
    t0 = reply.queued_at
    later = t0 + dt.timedelta(seconds=POLICY.in_doubt_after + 1)
    cid, mid = reply.conversation_id, reply.message_id

    def state(*events: Any) -> ReplyState:
        s = ReplyState()
        for e in events:
            s.apply(e)
        return s

    assert decide(reply, state(), POLICY, t0) == Attempt(1)
    one = ReplyAttempted(cid, mid, 1, t0)
    # In flight: not in doubt yet; then in doubt: resent once.
    assert isinstance(decide(reply, state(one), POLICY, t0), Wait)
    assert decide(reply, state(one), POLICY, later) == Attempt(2)
    # Killed again during the resend: two attempts may have sent it; no third.
    two = ReplyAttempted(cid, mid, 2, t0)
    verdict = decide(reply, state(one, two), POLICY, later)
    assert isinstance(verdict, GiveUp) and verdict.reason == "uncertain"
    # A timeout then a kill: the same.
    timeout = ReplyAttemptFailed(cid, mid, 1, t0, "timeout", t0, None, True)
    assert isinstance(decide(reply, state(one, timeout, two), POLICY, later), GiveUp)
    # The last attempt failed: the reply fails now, not when a retry would have been due.
    late = ReplyAttemptFailed(cid, mid, 1, t0, "500", t0 + dt.timedelta(hours=1), 500, False)
    last = RetryPolicy(max_attempts=1)
    verdict = decide(reply, state(one, late), last, t0)
    assert isinstance(verdict, GiveUp) and verdict.reason == "exhausted"
    assert isinstance(decide(reply, state(one, late), POLICY, t0), Wait)
    # Errors the provider answered do not count against the budget.
    refused = ReplyAttemptFailed(cid, mid, 1, t0, "500", t0, 500, False)
    assert decide(reply, state(one, refused, two), POLICY, later) == Attempt(3)
    # Delivered or confirmed: settled.
    assert decide(reply, state(one, ReplyDelivered(cid, mid, 1, t0)), POLICY, later) == Settled()
    # The widget needs no provider; Meta needs a token.
    assert decide(_reply("widget"), state(), POLICY, t0) == Attempt(1, local=True)
    assert reply_in_metadata(echo_metadata(mid)) == mid
    assert reply_in_metadata("convstore:reply:nope") is None and reply_in_metadata(None) is None


async def test_racing_daemons_begin_each_attempt_once(
    pool: AsyncConnectionPool[Any], world: World
) -> None:
    """Two leaders (a partition) deciding at once: the stream version lets one begin attempt 1."""
    await connections(pool)
    cid = await world.customer("tg", "64")
    message_id = await world.reply(cid, "once")
    reply = await world.ledger.load(message_id)
    assert reply is not None
    ledgers = [ReplyLedger(world.store, POLICY) for _ in range(8)]
    decisions = await asyncio.gather(*(ledger.begin(reply) for ledger in ledgers))
    assert sorted(type(d).__name__ for d, _ in decisions) == ["Attempt"] + ["Wait"] * 7
    assert [type(e) for e in await world.delivery(message_id)] == [ReplyAttempted]


async def test_a_standby_takes_over_and_the_models_rebuild_equal(
    pool: AsyncConnectionPool[Any], world: World
) -> None:
    await connections(pool)
    cids = [await world.customer("tg", str(100 + n)) for n in range(6)]
    async with fake() as provider:
        for n in range(6):
            provider.script(str(100 + n), *(["error", "ok", "invalid", "timeout"][n % 4],))
        config = settings(provider)
        first = [await world.reply(cid, f"first {i}") for i, cid in enumerate(cids)]
        daemons = [DeliveryDaemon(pool, config) for _ in range(2)]
        stops = [asyncio.Event() for _ in daemons]
        tasks = [asyncio.create_task(d.run(stop)) for d, stop in zip(daemons, stops, strict=True)]
        try:
            await until(lambda: asyncio.sleep(0, any(d.is_leader for d in daemons)))
            await world.wait_settled(first)
            # One leads, the other stands by; the leader stops and the standby carries on.
            leader = next(i for i, d in enumerate(daemons) if d.is_leader)
            assert not daemons[1 - leader].is_leader
            stops[leader].set()
            assert await tasks[leader] == "stopped"
            second = [await world.reply(cid, f"second {i}") for i, cid in enumerate(cids)]
            await world.wait_settled(second)
            assert daemons[1 - leader].is_leader
        finally:
            for stop in stops:
                stop.set()
            await asyncio.gather(*tasks)
    assert daemons[1 - leader].stats.delivered == 6
    assert max(provider.sends().values()) <= 2
    await catch_up(pool, [INBOX, DELIVERY])
    async with pool.connection() as conn:
        for projection, live in ((INBOX, "rm_inbox"), (DELIVERY, "rm_delivery")):
            for batch_size in (1, 7):
                await build_into(pool, projection, "fresh", batch_size=batch_size, replace=True)
                diff = await compare_read_models(conn, projection, live, "fresh")
                assert set(diff.values()) == {(0, 0)}, (projection.name, batch_size, diff)
        counts = await (
            await conn.execute(
                "SELECT delivery_status, count(*) FROM rm_inbox.messages"
                " WHERE direction = 'out' GROUP BY 1 ORDER BY 1"
            )
        ).fetchall()
    assert dict(counts) == {"delivered": 11, "failed": 1}


# ------------------------------------------------------- found by review, with repro scripts


def test_a_reply_past_its_age_fails_even_while_a_retry_waits() -> None:
    reply = _reply()
    t0 = reply.queued_at
    cid, mid = reply.conversation_id, reply.message_id
    state = ReplyState()
    state.apply(ReplyAttempted(cid, mid, 1, t0))
    a_year = t0 + dt.timedelta(days=365)
    state.apply(ReplyAttemptFailed(cid, mid, 1, t0, "429", a_year, 429, False))
    two_days = t0 + dt.timedelta(days=2)
    verdict = decide(reply, state, RetryPolicy(max_age=86400.0), two_days)
    assert isinstance(verdict, GiveUp) and verdict.reason == "expired"
    deleted = ReplyState(conversation_deleted=True)
    verdict = decide(reply, deleted, POLICY, t0)
    assert isinstance(verdict, GiveUp) and verdict.reason == "deleted"


async def test_a_reply_of_a_conversation_deleted_before_it_went_is_not_sent(
    pool: AsyncConnectionPool[Any], world: World
) -> None:
    await connections(pool)
    cid = await world.customer("tg", "77")
    message_id = await world.reply(cid, "never mind")
    await world.service.delete(cid, by="agent")
    async with fake() as provider, daemon(pool, settings(provider)):
        await world.wait_settled([message_id])
    (failed,) = await world.delivery(message_id)
    assert failed.reason == "deleted"
    assert provider.requests == []


def test_retry_after_takes_seconds_or_an_http_date() -> None:
    from email.utils import format_datetime

    from handlers.delivery import _retry_after

    ahead = format_datetime(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=120), usegmt=True)
    waited = _retry_after({"Retry-After": ahead})
    assert waited is not None and 100 < waited <= 120
    assert _retry_after({"Retry-After": "30"}) == 30.0
    assert _retry_after({"Retry-After": "1e12"}) == 3600.0  # capped
    assert _retry_after({"Retry-After": "soon"}) is None
    # A date no datetime holds: this runs on every answer, delivered ones too; it must not raise.
    assert _retry_after({"Retry-After": "Mon, 01 Jan 2024 99999999999999999999:00:00 GMT"}) is None


class _OddTelegram:
    """A Telegram Bot API stand-in whose one answer is chosen per test: odd, not wrong."""

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.calls = 0

    async def send(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        await request.read()
        if self.answer == "nested":  # a 200 whose body is nested deeper than msgspec goes
            nested = b"[" * 5000 + b"]" * 5000  # in a field msgspec skips, recursively
            deep = b'{"ok":true,"result":{"message_id":1},"extra":' + nested + b"}"
            return web.Response(body=deep, content_type="application/json")
        if self.answer == "nul":  # a refusal quoting a NUL back, which jsonb cannot hold
            body = b'{"ok":false,"error_code":400,"description":"bad chat \\u0000 id"}'
            return web.Response(status=400, body=body, content_type="application/json")
        if self.answer == "far":  # a rate limit asking for a wait no timedelta can hold
            body = b'{"ok":false,"error_code":429,"parameters":{"retry_after":1e12}}'
            return web.Response(status=429, body=body, content_type="application/json")
        # "cut": the status and headers, then the body breaks off; "cut-400" the same for a
        # refusal (for Meta, perhaps its rate limit: the reason is in the body that never came)
        status = 400 if self.answer == "cut-400" else 200
        response = web.StreamResponse(status=status, headers={"Content-Length": "1000"})
        await response.prepare(request)
        await response.write(b'{"ok":true,' if status == 200 else b'{"error":{"message":')
        assert request.transport is not None
        request.transport.close()
        return response


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [
        ("nested", "ReplyDelivered"),
        ("cut", "ReplyDelivered"),
        ("nul", "ReplyFailed"),
        ("far", "ReplyAttemptFailed"),
        ("cut-400", "ReplyAttemptFailed"),
    ],
)
async def test_an_odd_answer_is_recorded_and_the_reply_sent_once(
    pool: AsyncConnectionPool[Any], world: World, answer: str, outcome: str
) -> None:
    """Each of these once left the attempt without an outcome: the reply went out again."""
    from aiohttp.test_utils import TestServer

    await connections(pool)
    meta = answer == "cut-400"  # Meta's 4xx may be transient, and only its body says so
    cid = await world.customer("fb" if meta else "tg", "88")
    message_id = await world.reply(cid, f"odd {answer}")
    provider = _OddTelegram(answer)
    app = web.Application()
    app.router.add_post("/bot{token}/sendMessage", provider.send)
    app.router.add_post("/me/messages", provider.send)
    async with TestServer(app, host="127.0.0.1") as server:
        config = settings(None, telegram_url=str(server.make_url("")))

        async def recorded() -> bool:
            return len(await world.delivery(message_id)) >= 2

        async with daemon(pool, config):
            await until(recorded)
    events = await world.delivery(message_id)
    assert [type(e).__name__ for e in events][:2] == ["ReplyAttempted", outcome]
    if meta:  # refused, not "maybe sent", and not for good: its retry may already have run
        assert not events[1].maybe_sent
    else:
        assert provider.calls == 1
    if answer == "far":
        retry_at = events[1].retry_at
        assert retry_at is not None and retry_at <= events[1].failed_at + dt.timedelta(hours=1)
