"""The website widget: guest sign-up, a guest's messages, and the guest's own history.

A guest token is ``<guest_id>.<hmac>``: an HMAC-SHA256 of the connection name and guest id with
the connection's ``secret_token`` (or ``CONVSTORE_WIDGET_SECRET``), so the server verifies it
without a database lookup, and a token of one guest or connection is worthless for another.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import time
from typing import Annotated, Final

import msgspec
from aiohttp import web

from conversations.connections import Connection
from conversations.service import InboundMessage

from .agent import connection_name
from .app import CONNECTIONS, METRICS, POOL, SERVICE, STORE, WIDGET_KEY, decode_json, json_response
from .errors import HTTPError

__all__ = ["CORS_HEADERS", "PREFLIGHT_HEADERS", "add_routes", "guest_token"]

_EPOCH = dt.datetime.fromtimestamp(0, dt.UTC)

# The widget runs in the browser on the customer's own website, an origin other than ours, so
# browsers let it call these routes only with CORS. Any origin may: the routes take a bearer
# guest token and never a cookie, so a page cannot act with a visitor's ambient credentials.
#: Headers of every widget response, errors included (the widget reads their bodies too).
CORS_HEADERS: Final = {
    "Access-Control-Allow-Origin": "*",
    # Readable by the widget's script too: when to retry a 503, and the id to report.
    "Access-Control-Expose-Headers": "Retry-After, X-Request-Id",
}
#: The answer to a browser's preflight (OPTIONS) before a call with a JSON body or a token.
PREFLIGHT_HEADERS: Final = {
    **CORS_HEADERS,
    "Access-Control-Allow-Methods": "GET, POST",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, X-Request-Id",
    "Access-Control-Max-Age": "600",
}


class GuestSignUpBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``POST /widget/{connection}/guests``."""

    username: str | None = None
    phone: str | None = None
    email: str | None = None


#: The client's message id: with the guest id it must fit a provider message id (500
#: characters), and PostgreSQL's jsonb cannot hold U+0000.
ClientMessageId = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^[^\x00]*$")]


class GuestMessageBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``POST /widget/{connection}/messages``: the client's id makes a retry idempotent."""

    client_message_id: ClientMessageId
    text: str


def guest_token(key: bytes, connection: str, guest_id: str) -> str:
    """The token that proves a client holds ``guest_id`` on ``connection``."""
    mac = hmac.new(key, f"{connection}\x1f{guest_id}".encode(), hashlib.sha256).hexdigest()
    return f"{guest_id}.{mac}"


def _key(request: web.Request, connection: Connection) -> bytes:
    if connection.secret_token:
        return connection.secret_token.encode()
    return request.app[WIDGET_KEY]


async def _widget_connection(request: web.Request) -> Connection:
    connection = await request.app[CONNECTIONS].get(connection_name(request, "connection"))
    if connection.channel != "widget":
        raise HTTPError(404, "not_found", f"no widget connection {connection.name!r}")
    return connection


def _guest(request: web.Request, connection: Connection) -> str:
    given = request.headers.get("Authorization", "")
    scheme, _, token = given.partition(" ")
    token = token.strip()
    guest_id, dot, _ = token.rpartition(".")
    # A token is ASCII; other bytes arrive as lone surrogates, which cannot be encoded.
    if scheme.lower() != "bearer" or not dot or not guest_id or not token.isascii():
        raise HTTPError(401, "unauthorized", "send Authorization: Bearer <guest token>")
    expected = guest_token(_key(request, connection), connection.name, guest_id)
    if not hmac.compare_digest(expected.encode(), token.encode()):
        raise HTTPError(401, "unauthorized", "the guest token is not valid for this widget")
    return guest_id


async def sign_up(request: web.Request) -> web.Response:
    """Create a guest contact before any message; returns the guest id and its token."""
    connection = await _widget_connection(request)
    body = await decode_json(request, GuestSignUpBody)
    guest = await request.app[SERVICE].guest_sign_up(
        connection.name, username=body.username, phone=body.phone, email=body.email
    )
    token = guest_token(_key(request, connection), connection.name, guest.guest_id)
    return json_response(
        {"guest_id": guest.guest_id, "contact_id": guest.contact_id, "token": token}, status=201
    )


async def post_message(request: web.Request) -> web.Response:
    """Store a guest's message once per client message id."""
    connection = await _widget_connection(request)
    guest_id = _guest(request, connection)
    body = await decode_json(request, GuestMessageBody)
    # The widget has no provider timestamp: a retry arrives at another time, so the client's
    # id alone must decide the message id, and the id's time part is fixed.
    message = InboundMessage(
        provider_message_id=f"{guest_id}:{body.client_message_id}",
        sent_at=dt.datetime.now(dt.UTC),
        id_time=_EPOCH,
        text=body.text,
        provider="widget",
    )
    started = time.perf_counter()
    result = await request.app[SERVICE].receive_inbound(
        connection.name, guest_id, message, metadata={"received_via": "widget"}
    )
    request.app[METRICS].append_latency.labels("widget").observe(time.perf_counter() - started)
    return json_response(
        {
            "conversation_id": result.conversation_id,
            "message_id": result.message_id,
            "duplicate": result.duplicate,
        },
        status=200 if result.duplicate else 201,
    )


async def history(request: web.Request) -> web.Response:
    """The guest's own messages and the replies delivered to it, oldest first, across its
    conversations on this widget (a reply shows once ``convstore deliver`` delivered it)."""
    connection = await _widget_connection(request)
    guest_id = _guest(request, connection)
    store = request.app[STORE]
    async with request.app[POOL].connection() as conn:
        rows = await (
            await conn.execute(
                "SELECT stream_id FROM conversations WHERE connection = %s AND psid = %s"
                " AND NOT deleted ORDER BY opened_at",
                (connection.name, guest_id),
            )
        ).fetchall()
    items = []
    for (stream_id,) in rows:
        events = await store.read_stream(stream_id)
        # An agent reply reaches the guest when the delivery daemon delivers it.
        delivered = {
            e.data.message_id for e in events if e.type in ("ReplyDelivered", "ReplyConfirmed")
        }
        for event in events:
            data = event.data
            if event.type == "MessageReceived":
                items.append(
                    {
                        "message_id": data.message_id,
                        "direction": "in",
                        "text": data.text,
                        "sent_at": data.sent_at,
                    }
                )
            elif event.type == "MessageSent" and (
                data.source != "agent" or data.message_id in delivered
            ):
                items.append(
                    {
                        "message_id": data.message_id,
                        "direction": "out",
                        "text": data.text,
                        "sent_at": data.sent_at,
                    }
                )
    return json_response({"items": items, "next_cursor": None})


async def preflight(request: web.Request) -> web.Response:
    """A browser's CORS preflight: any origin may call the widget routes (see above)."""
    return web.Response(status=204, headers=PREFLIGHT_HEADERS)


async def _allow_any_origin(request: web.Request, response: web.StreamResponse) -> None:
    # Called as the response starts, before its headers are written.
    if request.path.startswith("/widget/"):
        response.headers.update(CORS_HEADERS)


def add_routes(app: web.Application) -> None:
    """Register the widget routes, and CORS headers on their responses."""
    app.router.add_post("/widget/{connection}/guests", sign_up)
    app.router.add_post("/widget/{connection}/messages", post_message)
    app.router.add_get("/widget/{connection}/messages", history)
    app.router.add_route("OPTIONS", "/widget/{connection}/guests", preflight)
    app.router.add_route("OPTIONS", "/widget/{connection}/messages", preflight)
    app.on_response_prepare.append(_allow_any_origin)
