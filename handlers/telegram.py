"""Telegram bot webhooks: ``POST /webhooks/telegram/{connection}``.

The connection is the bot. Telegram proves a delivery with ``X-Telegram-Bot-Api-Secret-Token``
(the ``secret_token`` given to ``setWebhook``), compared in constant time with the connection's;
a connection without one accepts nothing. Private-chat messages are stored with
``receive_inbound``: the customer key is the chat id and the provider message id is
``<chat id>:<message id>``, so a redelivered update (same ``update_id``, same message) is stored
once. Edits become ``MessageEdited``; the edit of a message never stored (sent before the webhook
was set, or still on its way) stores the message as it now reads, then the edit. Group,
supergroup and channel updates, and update kinds we do not store, are acknowledged with 200
and skipped (Telegram would otherwise retry them).
"""

from __future__ import annotations

import datetime as dt
import hmac
import logging
import time
from typing import Annotated

import msgspec
from aiohttp import web

from conversations.connections import Connection
from conversations.events import Attachment
from conversations.service import MAX_ID, MAX_TEXT, CommandResult, InboundMessage

from .app import CONNECTIONS, METRICS, SERVICE, decode_json, json_response
from .errors import HTTPError
from .meta import WEBHOOK_ITEMS, webhook_items

__all__ = ["SECRET_HEADER", "add_routes"]

log = logging.getLogger("convstore.webhooks.telegram")

SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
NO_NUL = r"^[^\x00]*$"
#: The last second of the year 9999.
MAX_SECONDS = 253_402_300_799

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID, pattern=NO_NUL)]
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT, pattern=NO_NUL)]
#: Telegram chat, user and message ids are signed 64-bit integers.
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
Seconds = Annotated[int, msgspec.Meta(ge=0, le=MAX_SECONDS)]

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


# --------------------------------------------------------------------------- the payload
# Typed and strict on the fields we use, permissive of the fields Telegram adds.


class Chat(msgspec.Struct, frozen=True):
    """``message.chat``: ``private``, ``group``, ``supergroup`` or ``channel``."""

    id: Int64
    type: Annotated[str, msgspec.Meta(max_length=100)]


class File(msgspec.Struct, frozen=True):
    """A file Telegram holds: fetched later through ``getFile`` with its ``file_id``."""

    file_id: Id
    file_unique_id: Id | None = None
    file_name: Text | None = None
    mime_type: Text | None = None
    emoji: Text | None = None  # stickers


class Replied(msgspec.Struct, frozen=True):
    """``message.reply_to_message``: only its id is used."""

    message_id: Int64


class Message(msgspec.Struct, frozen=True):
    """A Telegram ``Message`` (the fields convstore stores)."""

    message_id: Int64
    date: Seconds
    chat: Chat
    text: Text | None = None
    caption: Text | None = None
    edit_date: Seconds | None = None
    reply_to_message: Replied | None = None
    photo: tuple[File, ...] | None = None  # sizes, smallest first
    document: File | None = None
    sticker: File | None = None
    voice: File | None = None
    audio: File | None = None
    video: File | None = None
    video_note: File | None = None
    animation: File | None = None


class Update(msgspec.Struct, frozen=True):
    """The body of a webhook delivery: one ``Update``."""

    update_id: Int64
    message: Message | None = None
    edited_message: Message | None = None


# --------------------------------------------------------------------------- helpers


def _when(seconds: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(seconds=seconds)


def _file(type_: str, file: File) -> Attachment:
    payload = {"file_id": file.file_id}
    if file.file_unique_id is not None:
        payload["file_unique_id"] = file.file_unique_id
    if file.emoji is not None:
        payload["emoji"] = file.emoji
    return Attachment(type=type_, name=file.file_name, mime_type=file.mime_type, payload=payload)


def _attachments(message: Message) -> tuple[Attachment, ...]:
    found: list[Attachment] = []
    if message.photo:
        found.append(_file("photo", message.photo[-1]))  # the largest size
    for type_, file in (
        ("document", message.document),
        ("sticker", message.sticker),
        ("voice", message.voice),
        ("audio", message.audio),
        ("video", message.video),
        ("video_note", message.video_note),
    ):
        if file is not None:
            found.append(_file(type_, file))
    # Telegram sends an animation as both ``animation`` and ``document``: keep one.
    if message.animation is not None and message.document is None:
        found.append(_file("animation", message.animation))
    return tuple(found)


def _provider_message_id(message: Message) -> str:
    return f"{message.chat.id}:{message.message_id}"


async def _telegram_connection(request: web.Request) -> Connection:
    """The bot in the path, if the request carries its secret token; 404 or 403 otherwise."""
    connection = await request.app[CONNECTIONS].get(request.match_info["connection"])
    if connection.channel != "telegram":
        raise HTTPError(404, "not_found", f"no telegram connection {connection.name!r}")
    given = request.headers.get(SECRET_HEADER)
    expected = connection.secret_token
    if (
        given is None
        or not expected
        or not hmac.compare_digest(
            given.encode("utf-8", "surrogateescape"), expected.encode("utf-8")
        )
    ):
        raise HTTPError(403, "forbidden", f"{SECRET_HEADER} does not match the bot's secret token")
    return connection


# --------------------------------------------------------------------------- route


def _inbound(message: Message) -> InboundMessage | None:
    """The message as stored, or None when it has nothing we store (a poll, a contact...)."""
    attachments = _attachments(message)
    text = message.text if message.text is not None else message.caption
    if text is None and not attachments:
        return None
    return InboundMessage(
        provider_message_id=_provider_message_id(message),
        sent_at=_when(message.date),
        text=text,
        attachments=attachments,
        reply_to=(
            f"{message.chat.id}:{message.reply_to_message.message_id}"
            if message.reply_to_message is not None
            else None
        ),
    )


async def receive(request: web.Request) -> web.Response:
    """One update; 200 once its events are committed (or once it is known to need none)."""
    connection = await _telegram_connection(request)
    update = await decode_json(request, Update)
    app = request.app
    service = app[SERVICE]
    metadata = {"received_via": "telegram", "update_id": update.update_id}
    message = update.message or update.edited_message
    if message is None:
        kind = "unsupported"  # callback queries, channel posts, member updates, ...
    elif message.chat.type != "private":
        kind = "not_private"
    elif update.message is not None:
        inbound = _inbound(message)
        if inbound is None:
            kind = "unsupported"  # polls, contacts, service messages, ...
        else:
            started = time.perf_counter()
            result = await service.receive_inbound(
                connection.name, str(message.chat.id), inbound, metadata=metadata
            )
            app[METRICS].append_latency.labels("telegram").observe(time.perf_counter() - started)
            kind = "duplicate" if result.duplicate else "message"
    else:
        started = time.perf_counter()

        async def record_edit() -> CommandResult | None:
            return await service.record_edit(
                connection.name,
                _provider_message_id(message),
                _when(message.date),  # the original message's date: it names the message
                message.text if message.text is not None else message.caption,
                _when(message.edit_date if message.edit_date is not None else message.date),
                edit_key=str(update.update_id),
            )

        edit = await record_edit()
        kind = "edit"
        if edit is None:
            # The original never reached us (sent before the bot's webhook was set, or still
            # on its way): the edit carries the whole message as it now reads, so it is stored
            # under the original's id (an original arriving later is then a duplicate) and the
            # edit is recorded on it, which also makes a redelivered edit a duplicate.
            inbound = _inbound(message)
            if inbound is not None:
                await service.receive_inbound(
                    connection.name,
                    str(message.chat.id),
                    inbound,
                    metadata={**metadata, "stored_from_edit": True},
                )
                edit = await record_edit()
                kind = "message_from_edit"
        app[METRICS].append_latency.labels("telegram").observe(time.perf_counter() - started)
        if edit is None:
            log.info("telegram edit skipped: %s has nothing to store", connection.name)
            kind = "unsupported"
        elif edit.duplicate:
            kind = "duplicate"
    app[WEBHOOK_ITEMS].labels("telegram", kind).inc()
    # No "method" key: Telegram would run a body with one as a Bot API call.
    return json_response({"ok": True, "outcome": kind})


def add_routes(app: web.Application) -> None:
    """Register the Telegram webhook route (and the webhook item counter)."""
    webhook_items(app)
    app.router.add_post("/webhooks/telegram/{connection}", receive)
