"""Provider webhooks (Meta, Telegram) through a real aiohttp server on loopback.

Bodies are sent as the exact bytes a provider would send and signed over those bytes; what was
stored is read back from the event store on the test's own pool, independent of the app.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from aiohttp.test_utils import TestClient
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from conversations.connections import add_connection
from conversations.events import CODEC, Attachment
from eventstore import EventStore, RecordedEvent
from handlers.meta import signature_header

SECRET = "meta-app-secret"
OTHER_SECRET = "another-app-secret"
PAGE = "1029384756"
IG_ACCOUNT = "17841400000000001"
BOT_SECRET = "tg-secret-token"
T0 = 1_700_000_000_000  # ms


def _ms(millis: int) -> dt.datetime:
    return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(milliseconds=millis)


@pytest.fixture
async def events(pool: AsyncConnectionPool[Any]) -> AsyncIterator[EventStore]:
    """An event store with the domain codec, on the test's pool (not the app's)."""
    store = EventStore(pool, CODEC)
    try:
        yield store
    finally:
        await store.close()


async def conversations_of(
    pool: AsyncConnectionPool[Any], events: EventStore, connection: str, psid: str
) -> list[list[RecordedEvent]]:
    """Each conversation of a customer key, oldest first, as its stream of events."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT stream_id FROM conversations WHERE connection = %s AND psid = %s"
            " ORDER BY opened_at",
            (connection, psid),
        )
        rows = await cur.fetchall()
    return [await events.read_stream(stream_id) for (stream_id,) in rows]


async def event_count(pool: AsyncConnectionPool[Any]) -> int:
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT count(*) FROM events")).fetchone()
    assert row is not None
    return int(row[0])


async def metric(http: TestClient[Any, Any], name: str, **labels: str) -> float:
    """One sample of ``/metrics`` (0 when absent)."""
    text = await (await http.get("/metrics")).text()
    for line in text.splitlines():
        match = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if match is None or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if found == labels:
            return float(match.group(3))
    return 0.0


# --------------------------------------------------------------------------- Meta


async def _page(pool: AsyncConnectionPool[Any], name: str = "page", **kw: Any) -> None:
    kw.setdefault("channel", "messenger")
    kw.setdefault("external_id", PAGE)
    kw.setdefault("app_secret", SECRET)
    kw.setdefault("verify_token", "verify-me")
    await add_connection(pool, name, **kw)


async def post_meta(
    http: TestClient[Any, Any], body: bytes, secret: str | None = SECRET, **headers: str
) -> Any:
    sent = {"Content-Type": "application/json", **headers}
    if secret is not None:
        sent["X-Hub-Signature-256"] = signature_header(secret, body)
    return await http.post("/webhooks/meta", data=body, headers=sent)


def _inbound(psid: str, mid: str, timestamp: int, text: str, page: str = PAGE) -> dict[str, Any]:
    return {
        "sender": {"id": psid},
        "recipient": {"id": page},
        "timestamp": timestamp,
        "message": {"mid": mid, "text": text},
    }


def _body(obj: str, *entries: tuple[str, list[dict[str, Any]]]) -> bytes:
    return json.dumps(
        {
            "object": obj,
            "entry": [{"id": eid, "time": T0, "messaging": items} for eid, items in entries],
        }
    ).encode()


# The raw bytes Meta sends: escaped unicode (\u00e9, a surrogate pair), raw UTF-8 emoji,
# fields we do not use (time, seq, app_id, metadata, sticker_id, nlp), and the items of the
# first entry out of timestamp order.
MESSENGER_DELIVERY = (
    """{"object":"page","entry":[
 {"id":"1029384756","time":1700000009000,"messaging":[
  {"sender":{"id":"PSID-1"},"recipient":{"id":"1029384756"},"timestamp":1700000000200,
   "message":{"mid":"m_2","seq":12,"text":"caf\\u00e9 \u2615 \\ud83d\\ude00",
   "quick_reply":{"payload":"ORDER_COFFEE"},"nlp":{"entities":{}}}},
  {"sender":{"id":"PSID-1"},"recipient":{"id":"1029384756"},"timestamp":1700000000100,
   "message":{"mid":"m_1","text":"Hello \U0001f44b"}}
 ]},
 {"id":"1029384756","time":1700000009001,"messaging":[
  {"sender":{"id":"PSID-1"},"recipient":{"id":"1029384756"},"timestamp":1700000000300,
   "message":{"mid":"m_3","attachments":[
     {"type":"image","payload":{"url":"https://cdn.example/p/1.jpg?x=1&y=2","sticker_id":369239263222822}},
     {"type":"file","payload":{"url":"https://cdn.example/f/r.pdf"}}]}},
  {"sender":{"id":"1029384756"},"recipient":{"id":"PSID-1"},"timestamp":1700000000400,
   "message":{"mid":"m_echo","is_echo":true,"app_id":1517,"metadata":"x",
   "text":"Merci \\u00e0 vous"}},
  {"sender":{"id":"PSID-1"},"recipient":{"id":"1029384756"},"timestamp":1700000000500,
   "read":{"watermark":1700000000400}},
  {"sender":{"id":"PSID-1"},"recipient":{"id":"1029384756"},"timestamp":1700000000600,
   "delivery":{"mids":["m_echo"],"watermark":1700000000400}},
  {"sender":{"id":"PSID-2"},"recipient":{"id":"1029384756"},"timestamp":1700000000700,
   "message":{"mid":"m_4","text":"re: that","reply_to":{"mid":"m_echo"}}}
 ]},
 {"id":"5550001","time":1700000009002,"messaging":[
  {"sender":{"id":"PSID-9"},"recipient":{"id":"5550001"},"timestamp":1700000000800,
   "message":{"mid":"m_other","text":"for a page nobody registered"}}
 ]}
]}"""
).encode()


async def test_meta_delivery_is_stored_exactly(
    http: TestClient[Any, Any], pool: AsyncConnectionPool[Any], events: EventStore
) -> None:
    await _page(pool)
    response = await post_meta(http, MESSENGER_DELIVERY)
    assert response.status == 200, await response.text()
    summary = await response.json()
    assert summary["stored"] == 5 and summary["receipts"] == 2
    assert summary["unknown_entries"] == 1 and summary["duplicates"] == 0

    [first] = await conversations_of(pool, events, "page", "PSID-1")
    assert [e.type for e in first] == [
        "ConversationOpened",
        "MessageReceived",
        "MessageReceived",
        "MessageReceived",
        "MessageSent",
    ]
    opened, m1, m2, m3, echo = (e.data for e in first)
    assert opened.channel == "messenger" and opened.psid == "PSID-1"
    # applied in timestamp order, not body order
    assert (m1.provider_message_id, m1.text) == ("m_1", "Hello 👋")
    assert m1.sent_at == _ms(T0 + 100) and m1.provider == "messenger"
    assert (m2.provider_message_id, m2.text) == ("m_2", "café ☕ 😀")
    assert m2.quick_reply == "ORDER_COFFEE"
    assert m3.text is None and m3.attachments == (
        Attachment(type="image", url="https://cdn.example/p/1.jpg?x=1&y=2"),
        Attachment(type="file", url="https://cdn.example/f/r.pdf"),
    )
    assert (echo.source, echo.text, echo.provider_message_id) == ("echo", "Merci à vous", "m_echo")
    assert echo.sent_at == _ms(T0 + 400)
    assert first[1].metadata["entry_id"] == PAGE

    [second] = await conversations_of(pool, events, "page", "PSID-2")
    assert [e.type for e in second] == ["ConversationOpened", "MessageReceived"]
    assert second[1].data.reply_to == "m_echo"
    assert await conversations_of(pool, events, "page", "PSID-9") == []

    assert await metric(http, "convstore_webhook_unknown_entries_total", channel="messenger") == 1
    for kind, count in (("message", 4), ("echo", 1), ("read", 1), ("delivery", 1)):
        assert await metric(http, "convstore_webhook_items_total", provider="meta", kind=kind) == (
            count
        )
    assert await metric(http, "convstore_append_seconds_count", operation="meta") == 1


async def test_meta_same_body_twice_is_stored_once(
    http: TestClient[Any, Any], pool: AsyncConnectionPool[Any]
) -> None:
    await _page(pool)
    assert (await post_meta(http, MESSENGER_DELIVERY)).status == 200
    stored = await event_count(pool)
    again = await post_meta(http, MESSENGER_DELIVERY)
    assert again.status == 200
    summary = await again.json()
    assert summary["stored"] == 0 and summary["duplicates"] == 5
    assert await event_count(pool) == stored


async def test_meta_bad_or_missing_signature_is_403_and_stores_nothing(
    http: TestClient[Any, Any], pool: AsyncConnectionPool[Any]
) -> None:
    await _page(pool)
    body = _body("page", (PAGE, [_inbound("PSID-1", "m_1", T0, "hi")]))
    respaced = body.replace(b'"hi"', b' "hi"')  # same JSON, other bytes
    attempts = [
        await post_meta(http, body, secret=None),
        await post_meta(http, body, secret=OTHER_SECRET),
        await post_meta(http, body, secret=None, **{"X-Hub-Signature-256": "sha256="}),
        await post_meta(http, body, secret=None, **{"X-Hub-Signature-256": "sha256=zz"}),
        await post_meta(
            http,
            body,
            secret=None,
            **{"X-Hub-Signature-256": signature_header(SECRET, body).replace("sha256", "sha1")},
        ),
        await http.post(
            "/webhooks/meta",
            data=respaced,
            headers={
                "Content-Type": "application/json",
                "X-Hub-Signature-256": signature_header(SECRET, body),
            },
        ),
    ]
    for response in attempts:
        assert response.status == 403
        assert (await response.json())["error"] == "forbidden"
    assert await event_count(pool) == 0
    # an unsigned request is refused even when no entry routes anywhere
    unknown = _body("page", ("404404", [_inbound("PSID-1", "m_1", T0, "hi", page="404404")]))
    assert (await post_meta(http, unknown, secret=None)).status == 403
    # and the right signature is accepted
    assert (await post_meta(http, body)).status == 200
    assert await event_count(pool) > 0


async def test_meta_connection_without_app_secret_accepts_nothing(
    http: TestClient[Any, Any], pool: AsyncConnectionPool[Any]
) -> None:
    await _page(pool, app_secret=None)
    body = _body("page", (PAGE, [_inbound("PSID-1", "m_1", T0, "hi")]))
    assert (await post_meta(http, body)).status == 403
    assert await event_count(pool) == 0


async def test_meta_unknown_entry_ids_get_200_and_store_nothing(
    http: TestClient[Any, Any], pool: AsyncConnectionPool[Any]
) -> None:
    await _page(pool)
    body = _body(
        "page",
        ("777", [_inbound("PSID-1", "m_1", T0, "hi", page="777")]),
        ("888", [_inbound("PSID-2", "m_2", T0, "hi", page="888")]),
    )
    # nothing routes to a connection, so there is no secret to check it against
    response = await post_meta(http, body, secret="whatever")
    assert response.status == 200
    assert (await response.json())["unknown_entries"] == 2
    # an object Meta may send that convstore does not handle routes nowhere either
    other = _body("whatsapp_business_account", (PAGE, []))
    assert (await post_meta(http, other)).status == 200
    assert await event_count(pool) == 0
    assert await metric(http, "convstore_webhook_unknown_entries_total", channel="messenger") == 2
    assert await metric(http, "convstore_webhook_unknown_entries_total", channel="other") == 1


async def test_meta_entries_need_their_own_connection_secret(
    http: TestClient[Any, Any], pool: AsyncConnectionPool[Any], events: EventStore
) -> None:
    await _page(pool, "page-a")
    await _page(pool, "page-b", external_id="2222", app_secret=OTHER_SECRET)
    body = _body(
        "page",
        (PAGE, [_inbound("PSID-1", "m_a", T0, "for a")]),
        ("2222", [_inbound("PSID-1", "m_b", T0, "for b", page="2222")]),
    )
    response = await post_meta(http, body, secret=SECRET)
    assert response.status == 200
    assert (await response.json())["unverified_entries"] == 1
    [a] = await conversations_of(pool, events, "page-a", "PSID-1")
    assert [e.data.text for e in a if e.type == "MessageReceived"] == ["for a"]
    assert await conversations_of(pool, events, "page-b", "PSID-1") == []


async def test_instagram_routes_by_account_id(
    http: TestClient[Any, Any], pool: AsyncConnectionPool[Any], events: EventStore
) -> None:
    # The same provider-side id registered on both channels: the object decides which.
    await _page(pool, "fb", external_id=IG_ACCOUNT)
    await _page(pool, "ig", channel="instagram", external_id=IG_ACCOUNT)
    item = {
        "sender": {"id": "IGSID-1"},
        "recipient": {"id": IG_ACCOUNT},
        "timestamp": T0,
        "message": {
            "mid": "aWdfZAG1faXRlbToxOklHTWVzc2FnZAUlEOjE3ODQxNDAw",
            "attachments": [{"type": "ig_reel", "payload": {"url": "https://ig.example/r"}}],
        },
    }
    seen = {"sender": {"id": "IGSID-1"}, "recipient": {"id": IG_ACCOUNT}, "timestamp": T0 + 1}
    unsent = {**item, "timestamp": T0 + 2, "message": {"mid": "gone", "is_deleted": True}}
    body = _body(
        "instagram",
        (IG_ACCOUNT, [item, {**seen, "read": {"mid": "aWdfZAG1faXRlbToxOklH"}}, unsent]),
    )
    response = await post_meta(http, body)
    assert response.status == 200
    assert (await response.json())["skipped"] == 1  # the unsent message has nothing to store
    [conversation] = await conversations_of(pool, events, "ig", "IGSID-1")
    assert conversation[0].data.channel == "instagram"
    assert conversation[1].data.provider == "instagram"
    assert conversation[1].data.attachments == (
        Attachment(type="ig_reel", url="https://ig.example/r"),
    )
    assert await conversations_of(pool, events, "fb", "IGSID-1") == []


async def test_meta_verification_handshake(
    http: TestClient[Any, Any], pool: AsyncConnectionPool[Any]
) -> None:
    await _page(pool)
    await add_connection(
        pool, "bot", channel="telegram", external_id="42", verify_token="bot-token"
    )

    def handshake(mode: str, token: str) -> Any:
        return http.get(
            "/webhooks/meta",
            params={"hub.mode": mode, "hub.verify_token": token, "hub.challenge": "1158201444"},
        )

    good = await handshake("subscribe", "verify-me")
    assert good.status == 200 and good.content_type == "text/plain"
    assert await good.text() == "1158201444"
    for mode, token in (
        ("subscribe", "wrong"),
        ("subscribe", "bot-token"),  # a telegram connection's token is not a Meta one
        ("subscribe", ""),
        ("unsubscribe", "verify-me"),
        ("subscribe", "verify-mé"),
    ):
        response = await handshake(mode, token)
        assert response.status == 403
        assert (await response.json())["error"] == "forbidden"
    assert (await http.get("/webhooks/meta")).status == 403


async def test_meta_concurrent_first_messages_make_one_conversation(
    http: TestClient[Any, Any], pool: AsyncConnectionPool[Any], events: EventStore
) -> None:
    await _page(pool)
    bodies = [
        _body("page", (PAGE, [_inbound("PSID-new", f"m_{n}", T0 + n, f"message {n}")]))
        for n in range(50)
    ]
    responses = await asyncio.gather(*(post_meta(http, body) for body in bodies))
    assert [r.status for r in responses] == [200] * 50
    [conversation] = await conversations_of(pool, events, "page", "PSID-new")
    received = [e.data.provider_message_id for e in conversation if e.type == "MessageReceived"]
    assert sorted(received) == sorted(f"m_{n}" for n in range(50))
    assert [e.type for e in conversation].count("ConversationOpened") == 1
    # Every delivery went through the shared statement at least once; /metrics shows how many
    # statements carried them.
    assert await metric(http, "convstore_inbound_deliveries") >= 50
    assert await metric(http, "convstore_inbound_statements") >= 1


async def test_meta_bad_bodies_get_clear_4xx(
    http: TestClient[Any, Any], pool: AsyncConnectionPool[Any]
) -> None:
    await _page(pool)
    response = await post_meta(http, b'{"object": "page", "entry": [')
    assert response.status == 400 and (await response.json())["error"] == "malformed_json"
    bad_time = _body("page", (PAGE, [{**_inbound("P", "m", T0, "x"), "timestamp": "yesterday"}]))
    response = await post_meta(http, bad_time)
    assert response.status == 400
    assert "$.entry[0].messaging[0].timestamp" in (await response.json())["message"]
    nul = _body("page", (PAGE, [_inbound("P", "m", T0, "a\x00b")]))
    response = await post_meta(http, nul)
    assert response.status == 400
    assert "$.entry[0].messaging[0].message.text" in (await response.json())["message"]
    # a message must name its customer; the check runs before anything of the body is stored
    no_sender = {"recipient": {"id": PAGE}, "timestamp": T0, "message": {"mid": "m", "text": "x"}}
    body = _body("page", (PAGE, [_inbound("P", "m0", T0, "ok"), no_sender]))
    response = await post_meta(http, body)
    assert response.status == 400
    assert (await response.json())["field"] == "$.entry[0].messaging[1].sender"
    assert await event_count(pool) == 0
    # items that need no sender (a checkbox plugin opt-in) are accepted and skipped
    optin = {"recipient": {"id": PAGE}, "timestamp": T0, "optin": {"user_ref": "u-1"}}
    response = await post_meta(http, _body("page", (PAGE, [optin])))
    assert response.status == 200 and (await response.json())["skipped"] == 1
    body = _body("page", (PAGE, [_inbound("P", "m", T0, "x")]))
    response = await post_meta(http, body, **{"Content-Type": "text/plain"})
    assert response.status == 415
    huge = b'{"object":"page","entry":[],"pad":"' + b"x" * (1024 * 1024) + b'"}'
    response = await http.post(
        "/webhooks/meta",
        data=io.BytesIO(huge),
        headers={
            "Content-Type": "application/json",
            "X-Hub-Signature-256": signature_header(SECRET, huge),
        },
    )
    assert response.status == 413
    assert await event_count(pool) == 0


async def test_meta_user_ref_senders_and_standby_items_are_kept(
    http: TestClient[Any, Any], pool: AsyncConnectionPool[Any], events: EventStore
) -> None:
    # Meta's shapes: a Chat Plugin guest or a referral names its sender by user_ref only, and
    # items of a thread another app controls (handover protocol) come under "standby".
    await _page(pool)
    guest = {
        "sender": {"user_ref": "guest-7"},
        "recipient": {"id": PAGE},
        "timestamp": T0 + 2,
        "message": {"mid": "m_guest", "text": "hi from the chat plugin"},
    }
    postback = {
        "sender": {"user_ref": "guest-7"},
        "recipient": {"id": PAGE},
        "timestamp": T0 + 3,
        "postback": {"title": "Start", "payload": "GET_STARTED"},
    }
    body = json.dumps(
        {
            "object": "page",
            "entry": [
                {
                    "id": PAGE,
                    "time": T0,
                    "messaging": [_inbound("P-1", "m_1", T0, "first"), guest, postback],
                    "standby": [_inbound("P-2", "m_standby", T0 + 1, "while a person answers")],
                }
            ],
        }
    ).encode()
    response = await post_meta(http, body)
    assert response.status == 200, await response.text()
    summary = await response.json()
    assert (summary["items"], summary["stored"], summary["skipped"]) == (4, 3, 1)
    for psid, text in (
        ("P-1", "first"),
        ("P-2", "while a person answers"),
        ("user_ref:guest-7", "hi from the chat plugin"),
    ):
        [stream] = await conversations_of(pool, events, "page", psid)
        assert [e.data.text for e in stream if e.type == "MessageReceived"] == [text]
    again = await post_meta(http, body)
    assert (await again.json())["duplicates"] == 3


async def test_meta_an_item_the_service_refuses_does_not_block_the_others(
    http: TestClient[Any, Any], pool: AsyncConnectionPool[Any], events: EventStore
) -> None:
    # Items are committed one by one, so one item refused midway must not turn the delivery
    # into a 400 that Meta retries for ever while the later items are never stored.
    await _page(pool)
    blank = _inbound("P-1", "m_blank", T0 + 1, "\u3000 \n")  # whitespace only: nothing to store
    too_long = {  # a user_ref longer than a customer key may be
        "sender": {"user_ref": "r" * 495},
        "recipient": {"id": PAGE},
        "timestamp": T0 + 2,
        "message": {"mid": "m_long", "text": "lost?"},
    }
    items = [_inbound("P-1", "m_1", T0, "first"), blank, too_long]
    items.append(_inbound("P-1", "m_3", T0 + 3, "third"))
    body = _body("page", (PAGE, items))
    for attempt in range(2):
        response = await post_meta(http, body)
        assert response.status == 200, await response.text()
        summary = await response.json()
        assert summary["skipped"] == 2
        assert (summary["stored"], summary["duplicates"]) == ((2, 0) if attempt == 0 else (0, 2))
    [stream] = await conversations_of(pool, events, "page", "P-1")
    assert [e.data.text for e in stream if e.type == "MessageReceived"] == ["first", "third"]
    kinds = {"empty_message": 2, "invalid": 2}
    for kind, count in kinds.items():
        assert await metric(http, "convstore_webhook_items_total", provider="meta", kind=kind) == (
            count
        )


# --------------------------------------------------------------------------- Telegram


async def _bot(pool: AsyncConnectionPool[Any], name: str = "bot") -> None:
    await add_connection(
        pool, name, channel="telegram", external_id="7000000001", secret_token=BOT_SECRET
    )


def _update(
    update_id: int,
    message_id: int,
    *,
    chat_id: int = 987654321,
    chat_type: str = "private",
    key: str = "message",
    **fields: Any,
) -> dict[str, Any]:
    fields.setdefault("text", "hi")
    return {
        "update_id": update_id,
        key: {
            "message_id": message_id,
            "from": {"id": chat_id, "is_bot": False, "first_name": "Ann", "language_code": "fr"},
            "chat": {"id": chat_id, "first_name": "Ann", "type": chat_type},
            "date": 1_700_000_000,
            **fields,
        },
    }


async def post_telegram(
    http: TestClient[Any, Any],
    body: Any,
    connection: str = "bot",
    secret: str | None = BOT_SECRET,
    content_type: str = "application/json",
) -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": content_type}
    if secret is not None:
        headers["X-Telegram-Bot-Api-Secret-Token"] = secret
    return await http.post(f"/webhooks/telegram/{connection}", data=raw, headers=headers)


async def test_telegram_secret_token_and_connection_are_checked(
    http: TestClient[Any, Any], pool: AsyncConnectionPool[Any]
) -> None:
    await _bot(pool)
    await add_connection(pool, "nosecret", channel="telegram", external_id="7000000002")
    await _page(pool)
    update = _update(1, 1)
    assert (await post_telegram(http, update, secret=None)).status == 403
    assert (await post_telegram(http, update, secret="wrong")).status == 403
    assert (await post_telegram(http, update, secret=BOT_SECRET + "x")).status == 403
    assert (await post_telegram(http, update, connection="nosecret", secret="")).status == 403
    assert (await post_telegram(http, update, connection="nobody")).status == 404
    assert (await post_telegram(http, update, connection="page")).status == 404
    assert await event_count(pool) == 0


async def test_telegram_private_message_is_stored_once(
    http: TestClient[Any, Any], pool: AsyncConnectionPool[Any], events: EventStore
) -> None:
    await _bot(pool)
    raw = json.dumps(_update(10, 55, text="Привет \U0001f600", entities=[])).encode()
    first = await post_telegram(http, raw)
    assert first.status == 200 and (await first.json())["outcome"] == "message"
    again = await post_telegram(http, raw)  # Telegram redelivers the same update
    assert again.status == 200 and (await again.json())["outcome"] == "duplicate"
    [conversation] = await conversations_of(pool, events, "bot", "987654321")
    assert [e.type for e in conversation] == ["ConversationOpened", "MessageReceived"]
    message = conversation[1].data
    assert (message.provider, message.provider_message_id) == ("telegram", "987654321:55")
    assert message.text == "Привет 😀"
    assert message.sent_at == dt.datetime.fromtimestamp(1_700_000_000, dt.UTC)
    assert conversation[1].metadata["update_id"] == 10
    # The same message id in another chat is another message.
    other = await post_telegram(http, _update(11, 55, chat_id=-1 + 2**40, text="yo"))
    assert (await other.json())["outcome"] == "message"
    assert await metric(http, "convstore_append_seconds_count", operation="telegram") == 3


async def test_telegram_group_messages_are_acknowledged_and_skipped(
    http: TestClient[Any, Any], pool: AsyncConnectionPool[Any]
) -> None:
    await _bot(pool)
    for n, chat_type in enumerate(("group", "supergroup", "channel")):
        response = await post_telegram(
            http, _update(n, n, chat_id=-1001234567890, chat_type=chat_type)
        )
        assert response.status == 200 and (await response.json())["outcome"] == "not_private"
    callback = {"update_id": 9, "callback_query": {"id": "1", "data": "x"}}
    response = await post_telegram(http, callback)
    assert response.status == 200 and (await response.json())["outcome"] == "unsupported"
    assert await event_count(pool) == 0


async def test_telegram_edited_message_is_recorded(
    http: TestClient[Any, Any], pool: AsyncConnectionPool[Any], events: EventStore
) -> None:
    await _bot(pool)
    assert (await post_telegram(http, _update(1, 7, text="teh typo"))).status == 200
    edit = _update(2, 7, key="edited_message", text="the typo", edit_date=1_700_000_060)
    first = await post_telegram(http, edit)
    assert (await first.json())["outcome"] == "edit"
    assert (await (await post_telegram(http, edit)).json())["outcome"] == "duplicate"
    # Edits are stamped to the second: another edit within the same second is another edit.
    again = _update(4, 7, key="edited_message", text="the typo!", edit_date=1_700_000_060)
    assert (await (await post_telegram(http, again)).json())["outcome"] == "edit"
    [conversation] = await conversations_of(pool, events, "bot", "987654321")
    assert [e.type for e in conversation] == [
        "ConversationOpened",
        "MessageReceived",
        "MessageEdited",
        "MessageEdited",
    ]
    assert conversation[3].data.text == "the typo!"
    # ...and an edit back to the first text, in that second too, is a third edit (update 5).
    back = _update(5, 7, key="edited_message", text="the typo", edit_date=1_700_000_060)
    assert (await (await post_telegram(http, back)).json())["outcome"] == "edit"
    edited = conversation[2].data
    assert edited.message_id == conversation[1].data.message_id
    assert (edited.text, edited.provider_message_id) == ("the typo", "987654321:7")
    assert edited.edited_at == dt.datetime.fromtimestamp(1_700_000_060, dt.UTC)


async def test_telegram_edit_of_a_message_never_stored_stores_it_as_it_now_reads(
    http: TestClient[Any, Any], pool: AsyncConnectionPool[Any], events: EventStore
) -> None:
    # The original was sent before the webhook was set, or is still on its way: the edit is
    # all there is of the customer's message, and it must not be lost.
    await _bot(pool)
    edit = _update(3, 8, key="edited_message", text="fixed", edit_date=1_700_000_070)
    edit["edited_message"]["reply_to_message"] = {
        "message_id": 2,
        "chat": {"id": 987654321, "type": "private"},
        "date": 1_699_999_990,
    }
    response = await post_telegram(http, edit)
    assert response.status == 200 and (await response.json())["outcome"] == "message_from_edit"
    # A redelivered edit, then the original arriving late, store nothing more.
    assert (await (await post_telegram(http, edit)).json())["outcome"] == "duplicate"
    original = _update(1, 8, text="fxied")
    assert (await (await post_telegram(http, original)).json())["outcome"] == "duplicate"
    stored = await event_count(pool)
    [conversation] = await conversations_of(pool, events, "bot", "987654321")
    assert [e.type for e in conversation] == [
        "ConversationOpened",
        "MessageReceived",
        "MessageEdited",
    ]
    received, edited = conversation[1].data, conversation[2].data
    assert (received.provider_message_id, received.text) == ("987654321:8", "fixed")
    assert received.sent_at == dt.datetime.fromtimestamp(1_700_000_000, dt.UTC)
    assert received.reply_to == "987654321:2"
    assert conversation[1].metadata["stored_from_edit"] is True
    assert (edited.message_id, edited.text) == (received.message_id, "fixed")
    assert edited.edited_at == dt.datetime.fromtimestamp(1_700_000_070, dt.UTC)
    # An edit with nothing we store (no text, no file) is still acknowledged and skipped.
    empty = _update(4, 9, key="edited_message", text=None, edit_date=1_700_000_080)
    del empty["edited_message"]["text"]
    response = await post_telegram(http, empty)
    assert response.status == 200 and (await response.json())["outcome"] == "unsupported"
    assert await event_count(pool) == stored


async def test_telegram_files_are_attachments(
    http: TestClient[Any, Any], pool: AsyncConnectionPool[Any], events: EventStore
) -> None:
    await _bot(pool)
    size = {"file_unique_id": "u", "width": 90, "height": 90, "file_size": 1000}
    photo = _update(
        1,
        1,
        text=None,
        caption="look",
        photo=[{**size, "file_id": "small"}, {**size, "file_id": "large", "width": 1280}],
    )
    del photo["message"]["text"]
    sticker = _update(
        2,
        2,
        sticker={"file_id": "stk", "file_unique_id": "s", "emoji": "🐱", "is_animated": False},
        reply_to_message={"message_id": 1, "date": 1_700_000_000, "chat": {"id": 1, "type": "x"}},
    )
    del sticker["message"]["text"]
    voice = _update(3, 3, voice={"file_id": "v", "duration": 3, "mime_type": "audio/ogg"})
    del voice["message"]["text"]
    doc = _update(
        4,
        4,
        document={"file_id": "d", "file_name": "invoice.pdf", "mime_type": "application/pdf"},
    )
    del doc["message"]["text"]
    for update in (photo, sticker, voice, doc):
        response = await post_telegram(http, update)
        assert (await response.json())["outcome"] == "message"
    [conversation] = await conversations_of(pool, events, "bot", "987654321")
    messages = [e.data for e in conversation if e.type == "MessageReceived"]
    assert [(m.text, m.attachments) for m in messages] == [
        ("look", (Attachment("photo", payload={"file_id": "large", "file_unique_id": "u"}),)),
        (
            None,
            (
                Attachment(
                    "sticker", payload={"file_id": "stk", "file_unique_id": "s", "emoji": "🐱"}
                ),
            ),
        ),
        (None, (Attachment("voice", mime_type="audio/ogg", payload={"file_id": "v"}),)),
        (
            None,
            (
                Attachment(
                    "document",
                    name="invoice.pdf",
                    mime_type="application/pdf",
                    payload={"file_id": "d"},
                ),
            ),
        ),
    ]
    assert messages[1].reply_to == "987654321:1"


async def test_telegram_bad_bodies_get_clear_4xx(
    http: TestClient[Any, Any], pool: AsyncConnectionPool[Any]
) -> None:
    await _bot(pool)
    huge = await post_telegram(http, _update(1, 1, chat_id=2**63))
    assert huge.status == 400
    assert "$.message.chat.id" in (await huge.json())["message"]
    assert (await post_telegram(http, _update(1, 1, chat_id=-(2**63) - 1))).status == 400
    assert (await post_telegram(http, _update(1, 1, chat_id=2**63 - 1))).status == 200
    malformed = await post_telegram(http, b'{"update_id": 1, "message": {')
    assert malformed.status == 400 and (await malformed.json())["error"] == "malformed_json"
    wrong_type = await post_telegram(http, _update(2, "two"))
    assert wrong_type.status == 400
    assert "$.message.message_id" in (await wrong_type.json())["message"]
    plain = await post_telegram(http, _update(3, 3), content_type="text/plain")
    assert plain.status == 415
    assert await event_count(pool) == 3  # only the one valid update: contact, opened, message


# --------------------------------------------------------------------------- the database away


async def test_webhooks_answer_503_while_postgres_is_away_and_the_retry_stores_once(
    http: TestClient[Any, Any],
    pool: AsyncConnectionPool[Any],
    events: EventStore,
    server_url: str,
    database_url: str,
) -> None:
    await _page(pool)
    await _bot(pool)
    name = conninfo_to_dict(database_url)["dbname"]
    meta_body = _body("page", (PAGE, [_inbound("PSID-1", "m_1", T0, "hello")]))
    update = _update(1, 1)

    def cut_off(allow: bool) -> None:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
                    sql.Identifier(name), sql.Literal(allow)
                )
            )
            if not allow:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = %s AND pid <> pg_backend_pid()",
                    (name,),
                )

    await asyncio.to_thread(cut_off, False)
    try:
        for response in (await post_meta(http, meta_body), await post_telegram(http, update)):
            assert response.status == 503
            assert response.headers["Retry-After"].isdigit()
            assert (await response.json())["error"] == "unavailable"
    finally:
        await asyncio.to_thread(cut_off, True)
    # The providers retry until PostgreSQL is back (the app's pool drops the connections that
    # were cut off as it meets them), then retry again: each delivery is stored once.
    for _ in range(2):
        for post in (lambda: post_meta(http, meta_body), lambda: post_telegram(http, update)):
            for _attempt in range(20):
                response = await post()
                if response.status != 503:
                    break
                await asyncio.sleep(0.05)
            assert response.status == 200
    await pool.check()  # the test's own pool lost its connections too
    [meta] = await conversations_of(pool, events, "page", "PSID-1")
    [telegram] = await conversations_of(pool, events, "bot", "987654321")
    assert (
        [e.type for e in meta]
        == [e.type for e in telegram]
        == [
            "ConversationOpened",
            "MessageReceived",
        ]
    )
