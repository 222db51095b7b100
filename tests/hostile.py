"""Shared by the hostile-input and security tests: a small world of connections, and proof that
a rejected request stored nothing.

``footprint`` digests every write-side table (row counts and an md5 of the rows), so a request
that changed anything, even one column of one row without appending an event, changes it.
"""

from __future__ import annotations

import io
import json
from typing import Any

import msgspec
from aiohttp.test_utils import TestClient
from psycopg_pool import AsyncConnectionPool

from conversations.connections import add_connection
from handlers.meta import signature_header
from projections import PROJECTIONS, catch_up
from tests.conftest import API_TOKEN

__all__ = [
    "AGENT",
    "BOT_SECRET",
    "IG_ACCOUNT",
    "IG_SECRET",
    "PAGE",
    "PAGE_SECRET",
    "SITE_SECRET",
    "World",
    "build_world",
    "footprint",
    "send",
]

PAGE = "100000000000001"
PAGE_SECRET = "meta-app-secret-for-the-page-5b1f0c"
IG_ACCOUNT = "17841400000000009"
IG_SECRET = "meta-app-secret-for-instagram-93d7"
VERIFY_TOKEN = "meta-verify-token-0e4471"
BOT_SECRET = "telegram-secret-token-88c1a6"
BOT_TOKEN = "7000000001:telegram-bot-token-f00d"
SITE_SECRET = "widget-secret-of-site-7e2a31"
OTHER_SITE_SECRET = "widget-secret-of-other-site-c4b9"
PAGE_ACCESS_TOKEN = "EAAB-page-access-token-61c0"
#: The agent API's headers.
AGENT = {"Authorization": f"Bearer {API_TOKEN}", "X-Agent-Id": "fuzz-agent"}
#: Every secret the world holds: none may ever appear in a log line or a response.
SECRETS = (
    PAGE_SECRET,
    IG_SECRET,
    VERIFY_TOKEN,
    BOT_SECRET,
    BOT_TOKEN,
    SITE_SECRET,
    OTHER_SITE_SECRET,
    PAGE_ACCESS_TOKEN,
    API_TOKEN,
)

# One statement over every write-side table; a literal, like every query of the product.
_FOOTPRINT = """
SELECT
    (SELECT count(*) FROM events),
    (SELECT coalesce(max(position), 0) FROM events),
    (SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t.stream_id), '')) FROM streams t),
    (SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t.contact_id), '')) FROM contacts t),
    (SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t.connection, t.psid), ''))
       FROM contact_keys t),
    (SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t.conversation_id), ''))
       FROM conversations t),
    (SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t.connection, t.psid), ''))
       FROM stream_reservations t),
    (SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t.name), '')) FROM connections t)
"""


async def footprint(pool: AsyncConnectionPool[Any]) -> tuple[Any, ...]:
    """A digest of everything the write side holds."""
    async with pool.connection() as conn:
        row = await (await conn.execute(_FOOTPRINT)).fetchone()
    assert row is not None
    return tuple(row)


class World(msgspec.Struct):
    """What the hostile-input tests address: registered connections, a guest, a conversation."""

    guest_id: str
    guest_token: str
    contact_id: str
    conversation_id: str
    other_guest_id: str
    other_guest_token: str


async def build_world(http: TestClient[Any, Any], pool: AsyncConnectionPool[Any]) -> World:
    """Register a page, an Instagram account, a bot and two widgets; one guest who wrote once."""
    await add_connection(
        pool,
        "page",
        channel="messenger",
        external_id=PAGE,
        app_secret=PAGE_SECRET,
        verify_token=VERIFY_TOKEN,
        access_token=PAGE_ACCESS_TOKEN,
    )
    await add_connection(
        pool,
        "insta",
        channel="instagram",
        external_id=IG_ACCOUNT,
        app_secret=IG_SECRET,
        reopen_policy="reopen-within=7d",
    )
    await add_connection(
        pool,
        "bot",
        channel="telegram",
        external_id="7000000001",
        secret_token=BOT_SECRET,
        bot_token=BOT_TOKEN,
        reopen_policy="reopen-last",
    )
    await add_connection(pool, "site", channel="widget", external_id="w1", secret_token=SITE_SECRET)
    await add_connection(
        pool, "other-site", channel="widget", external_id="w2", secret_token=OTHER_SITE_SECRET
    )
    guest = await (await http.post("/widget/site/guests", json={"username": "ann"})).json()
    sent = await http.post(
        "/widget/site/messages",
        json={"client_message_id": "first", "text": "hello"},
        headers={"Authorization": f"Bearer {guest['token']}"},
    )
    assert sent.status == 201, await sent.text()
    other = await (await http.post("/widget/other-site/guests", json={})).json()
    await catch_up(pool, list(PROJECTIONS.values()))  # the agent API's reads need the inbox
    return World(
        guest_id=guest["guest_id"],
        guest_token=guest["token"],
        contact_id=guest["contact_id"],
        conversation_id=(await sent.json())["conversation_id"],
        other_guest_id=other["guest_id"],
        other_guest_token=other["token"],
    )


def meta_headers(body: bytes, secret: str = PAGE_SECRET) -> dict[str, str]:
    """The headers Meta sends with ``body``, signed with ``secret``."""
    return {
        "Content-Type": "application/json",
        "X-Hub-Signature-256": signature_header(secret, body),
    }


def encode(value: Any, *, ascii_only: bool = True) -> bytes:
    """JSON bytes of ``value``; lone surrogates become invalid UTF-8 when not ``ascii_only``."""
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


async def send(
    http: TestClient[Any, Any],
    pool: AsyncConnectionPool[Any],
    method: str,
    path: str,
    *,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """Send one request; check it got no 5xx and, when rejected, a JSON error and no change."""
    before = await footprint(pool)
    payload: bytes | io.BytesIO | None = data
    if data is not None and len(data) > 64 * 1024:
        payload = io.BytesIO(data)  # aiohttp warns about large raw bodies
    async with http.request(method, path, data=payload, headers=headers, params=params) as response:
        status, body = response.status, await response.read()
    where = f"{method} {path} {params or ''} -> {status} {body[:400]!r}"
    assert status < 500, where
    if status >= 400:
        error = msgspec.json.decode(body)
        assert isinstance(error, dict) and {"error", "message"} <= error.keys(), where
        assert await footprint(pool) == before, f"a rejected request changed the store: {where}"
    return status, body
