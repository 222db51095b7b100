"""Meta webhooks: Messenger (``object: page``) and Instagram (``object: instagram``).

``GET /webhooks/meta`` answers the subscription handshake. ``POST /webhooks/meta`` takes a
delivery: every ``entry[]`` is routed by its ``id`` (the page or Instagram account) to a
registered connection, and the request must be signed (``X-Hub-Signature-256``) with the app
secret of a connection it routes to; entries of connections whose secret did not verify are not
processed. Inbound messages are stored with ``receive_inbound`` (idempotent by ``mid``), echoes
with ``record_echo`` as outbound messages (the echo of one of our own replies, recognised by the
``metadata`` the delivery daemon set, confirms that reply instead); read and delivery receipts
are counted and accepted (the store has no receipt events). The items of ``messaging[]`` and
of ``standby[]`` (threads another app controls) are applied one by one in timestamp order, and
the answer is 200 only after every stored event is committed. An item the service refuses is
logged, counted and skipped, since the items before it are already committed.

An entry id no connection is registered for is logged, counted and skipped, and the request
still gets 200 so Meta does not disable the webhook.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import time
from typing import Annotated

import msgspec
from aiohttp import web
from prometheus_client import Counter

from conversations.connections import Connection, list_connections
from conversations.errors import InvalidCommand
from conversations.events import Attachment
from conversations.service import MAX_ID, MAX_TEXT, ConversationService, InboundMessage

from .app import CONNECTIONS, METRICS, POOL, SERVICE, decode_json, json_response
from .errors import HTTPError

__all__ = ["USER_REF_PREFIX", "WEBHOOK_ITEMS", "add_routes", "signature_header", "webhook_items"]

log = logging.getLogger("convstore.webhooks.meta")

#: PostgreSQL's jsonb cannot hold U+0000: a string we store must not contain it.
NO_NUL = r"^[^\x00]*$"
#: The most distinct entry ids one delivery may name (Meta batches at most 1000 updates); they
#: are looked up (in one query) before the signature can be checked.
MAX_ENTRY_IDS = 1000
#: The last millisecond of the year 9999: larger timestamps are not times.
MAX_MILLIS = 253_402_300_799_999
#: The key prefix of a customer Meta names by a plugin's ``user_ref`` rather than an id.
USER_REF_PREFIX = "user_ref:"

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_CHANNELS = {"page": "messenger", "instagram": "instagram"}

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID, pattern=NO_NUL)]
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT, pattern=NO_NUL)]
Str = Annotated[str, msgspec.Meta(max_length=MAX_TEXT, pattern=NO_NUL)]
Millis = Annotated[int, msgspec.Meta(ge=0, le=MAX_MILLIS)]

#: ``convstore_webhook_items_total{provider, kind}``: what webhook deliveries carried.
WEBHOOK_ITEMS = web.AppKey("webhook_items", Counter)


# --------------------------------------------------------------------------- the payload
# Typed and strict on the fields we use, permissive of the fields Meta adds.


class Party(msgspec.Struct, frozen=True):
    """``sender`` / ``recipient``: a PSID, an IGSID, or the page / account id; or, for a
    person the page knows only through a plugin (Chat Plugin guests, the checkbox plugin's
    opt-ins, referrals), a ``user_ref`` instead of an ``id``."""

    id: Id | None = None
    user_ref: Id | None = None


class AttachmentPayload(msgspec.Struct, frozen=True):
    """``message.attachments[].payload``: the file's URL, a fallback's title."""

    url: Str | None = None
    title: Str | None = None


class MetaAttachment(msgspec.Struct, frozen=True):
    """``message.attachments[]``: image, video, audio, file, share, story_mention, ..."""

    type: Annotated[str, msgspec.Meta(min_length=1, max_length=100, pattern=NO_NUL)]
    payload: AttachmentPayload | None = None


class QuickReply(msgspec.Struct, frozen=True):
    """``message.quick_reply``: the payload of the button the customer tapped."""

    payload: Str


class ReplyTo(msgspec.Struct, frozen=True):
    """``message.reply_to``: the message replied to (Instagram story replies have no mid)."""

    mid: Id | None = None


class MetaMessage(msgspec.Struct, frozen=True):
    """``messaging[].message``: a customer's message, or an echo of the page's own."""

    mid: Id
    text: Text | None = None
    attachments: tuple[MetaAttachment, ...] | None = None
    quick_reply: QuickReply | None = None
    reply_to: ReplyTo | None = None
    is_echo: bool = False
    #: set by the sender of an echoed message; ours names the reply (delivery confirmation)
    metadata: Str | None = None


class Read(msgspec.Struct, frozen=True):
    """``messaging[].read``: Messenger sends a watermark, Instagram the message's mid."""

    watermark: Millis | None = None
    mid: Id | None = None


class Delivery(msgspec.Struct, frozen=True):
    """``messaging[].delivery``: the page's messages the customer's device received."""

    watermark: Millis | None = None
    mids: tuple[Id, ...] | None = None


class Messaging(msgspec.Struct, frozen=True):
    """One ``entry[].messaging[]`` item."""

    timestamp: Millis
    # Absent on some items (a plugin opt-in has no sender); a message needs its customer's.
    sender: Party | None = None
    recipient: Party | None = None
    message: MetaMessage | None = None
    read: Read | None = None
    delivery: Delivery | None = None


class Entry(msgspec.Struct, frozen=True):
    """One ``entry[]``: the page or Instagram account ``id`` and its items.

    ``standby`` holds the items of threads another app controls (Meta's handover protocol,
    for example while a person answers in the Page Inbox): they are the customer's messages
    all the same, so they are stored like ``messaging``.
    """

    id: Id
    messaging: tuple[Messaging, ...] | None = None
    standby: tuple[Messaging, ...] | None = None


class MetaDelivery(msgspec.Struct, frozen=True):
    """The body of ``POST /webhooks/meta``."""

    object: Annotated[str, msgspec.Meta(max_length=200)]
    entry: tuple[Entry, ...] = ()


class _Summary(msgspec.Struct):
    """The answer's body: what the delivery carried and what became of it."""

    items: int = 0
    stored: int = 0
    duplicates: int = 0
    receipts: int = 0
    skipped: int = 0
    unknown_entries: int = 0
    unverified_entries: int = 0


# --------------------------------------------------------------------------- helpers


def signature_header(secret: str | bytes, body: bytes) -> str:
    """The ``X-Hub-Signature-256`` value Meta sends for ``body`` signed with ``secret``."""
    key = secret.encode() if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def webhook_items(app: web.Application) -> Counter:
    """The app's webhook item counter, registered once in its metrics registry."""
    if WEBHOOK_ITEMS not in app:
        app[WEBHOOK_ITEMS] = Counter(
            "convstore_webhook_items",
            "Items of webhook deliveries by provider and outcome",
            ["provider", "kind"],
            registry=app[METRICS].registry,
        )
    return app[WEBHOOK_ITEMS]


def _given_signature(request: web.Request) -> bytes:
    """The 32 bytes of ``X-Hub-Signature-256: sha256=<hex>``; 403 when missing or malformed."""
    header = request.headers.get("X-Hub-Signature-256")
    if header is None:
        raise HTTPError(403, "forbidden", "the request is not signed (X-Hub-Signature-256)")
    algorithm, sep, hexdigest = header.strip().partition("=")
    try:
        digest = bytes.fromhex(hexdigest)
    except ValueError:
        digest = b""
    if algorithm.lower() != "sha256" or not sep or len(digest) != hashlib.sha256().digest_size:
        raise HTTPError(403, "forbidden", "X-Hub-Signature-256 must be sha256=<hex digest>")
    return digest


def _signed_by(secret: str | None, body: bytes, given: bytes) -> bool:
    if not secret:
        return False
    expected = hmac.new(secret.encode(), body, hashlib.sha256).digest()
    return hmac.compare_digest(expected, given)


def _when(millis: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(milliseconds=millis)


def _attachments(message: MetaMessage) -> tuple[Attachment, ...]:
    return tuple(
        Attachment(
            type=a.type,
            url=a.payload.url if a.payload else None,
            name=a.payload.title if a.payload else None,
        )
        for a in message.attachments or ()
    )


# --------------------------------------------------------------------------- routes


async def verify(request: web.Request) -> web.StreamResponse:
    """The subscription handshake: echo ``hub.challenge`` for a registered verify token."""
    query = request.query
    token = query.get("hub.verify_token", "")
    challenge = query.get("hub.challenge")
    if query.get("hub.mode") != "subscribe" or not token:
        raise HTTPError(403, "forbidden", "hub.mode must be subscribe, with a verify token")
    given = token.encode("utf-8", "surrogateescape")
    matched = False
    for connection in await list_connections(request.app[POOL]):
        if connection.channel in ("messenger", "instagram") and connection.verify_token:
            # No early exit: the time taken does not depend on which token matched.
            matched |= hmac.compare_digest(connection.verify_token.encode(), given)
    if not matched:
        raise HTTPError(403, "forbidden", "the verify token matches no Meta connection")
    if challenge is None:
        raise HTTPError(400, "invalid_field", "hub.challenge is missing", field="hub.challenge")
    return web.Response(
        text=challenge,
        content_type="text/plain",
        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"},
    )


async def receive(request: web.Request) -> web.Response:
    """A delivery of Messenger or Instagram events; 200 once every stored event is committed."""
    given = _given_signature(request)
    delivery = await decode_json(request, MetaDelivery)
    body = await request.read()  # the exact bytes decode_json read (aiohttp keeps them)
    app = request.app
    items_counter = app[WEBHOOK_ITEMS]
    summary = _Summary()
    channel = _CHANNELS.get(delivery.object)

    entry_ids = {entry.id for entry in delivery.entry}
    if len(entry_ids) > MAX_ENTRY_IDS:
        raise HTTPError(
            400,
            "invalid_field",
            f"a delivery may name at most {MAX_ENTRY_IDS} distinct entry ids",
            field="entry",
        )
    known: dict[str, Connection] = {}
    if channel is not None:
        known = await app[CONNECTIONS].find_many(channel, entry_ids)

    unknown = [entry for entry in delivery.entry if entry.id not in known]
    if unknown:
        summary.unknown_entries = len(unknown)
        app[METRICS].unknown_entries.labels(channel or "other").inc(len(unknown))
        log.warning(
            "meta delivery: %d entries for unregistered ids skipped (object=%.40r ids=%.300r)",
            len(unknown),
            delivery.object,
            sorted({entry.id[:64] for entry in unknown})[:5],  # repr: no raw newlines
        )
    if not known:
        # Nothing routes to a connection, so there is no secret to check and nothing to store.
        return json_response(summary)

    # A delivery is signed by one app: accept the connections whose app secret verifies.
    secrets_ok: dict[str | None, bool] = {}
    verified: set[str] = set()
    for entry_id, connection in known.items():
        secret = connection.app_secret
        if secret not in secrets_ok:
            secrets_ok[secret] = _signed_by(secret, body, given)
        if secrets_ok[secret]:
            verified.add(entry_id)
    if not verified:
        raise HTTPError(403, "forbidden", "X-Hub-Signature-256 does not match the app secret")
    unverified = sorted({known[e].name for e in known if e not in verified})
    if unverified:
        summary.unverified_entries = sum(
            1 for entry in delivery.entry if entry.id in known and entry.id not in verified
        )
        items_counter.labels("meta", "unverified_entry").inc(summary.unverified_entries)
        log.warning(
            "meta delivery: entries of %s skipped: not signed with their app secret",
            ",".join(unverified),
        )

    # Every item of every verified entry, applied one at a time in timestamp order (stable).
    items = [
        (entry, _checked(item, f"$.entry[{e}].{field}[{m}]"))
        for e, entry in enumerate(delivery.entry)
        if entry.id in verified
        for field, listed in (("messaging", entry.messaging), ("standby", entry.standby))
        for m, item in enumerate(listed or ())
    ]
    items.sort(key=lambda pair: pair[1].timestamp)
    summary.items = len(items)
    service = app[SERVICE]
    started = time.perf_counter()
    for entry, item in items:
        connection = known[entry.id]
        try:
            kind = await _apply(service, connection, entry, item)
        except InvalidCommand as exc:
            # The items before this one are committed: a 400 now would have Meta retry the
            # whole delivery for ever and never reach the items after it. The item is
            # counted, logged and skipped instead (a signed delivery gets 200 or 503).
            log.warning(
                "meta item refused on %s (%s, field %s): %s",
                connection.name,
                item.message.mid if item.message is not None else "no mid",
                exc.field,
                exc,
            )
            kind = "invalid"
        items_counter.labels("meta", kind).inc()
        if kind in ("message", "echo", "reply_confirmed"):
            summary.stored += 1
        elif kind == "duplicate":
            summary.duplicates += 1
        elif kind in ("read", "delivery"):
            summary.receipts += 1
        else:
            summary.skipped += 1
    if items:
        app[METRICS].append_latency.labels("meta").observe(time.perf_counter() - started)
    return json_response(summary)


def _customer(item: Messaging) -> str | None:
    """The customer's key: the sender of a message, the recipient of an echo.

    A person known only by a plugin's ``user_ref`` is keyed ``user_ref:<ref>``: the prefix
    keeps those keys apart from PSIDs (digits only), and the reply daemon addresses them by
    ``user_ref`` again.
    """
    party = item.recipient if item.message is not None and item.message.is_echo else item.sender
    if party is None:
        return None
    if party.id is not None:
        return party.id
    return USER_REF_PREFIX + party.user_ref if party.user_ref is not None else None


def _checked(item: Messaging, path: str) -> Messaging:
    """The item, if a message names its customer; 400 (before anything is stored) if not."""
    if item.message is not None and _customer(item) is None:
        party = "recipient" if item.message.is_echo else "sender"
        raise HTTPError(
            400,
            "invalid_field",
            f"a message needs its customer's `{party}` with an `id` or a `user_ref` - at `{path}`",
            field=f"{path}.{party}",
        )
    return item


async def _apply(
    service: ConversationService, connection: Connection, entry: Entry, item: Messaging
) -> str:
    """Store one item; the outcome's kind for the counter."""
    message = item.message
    psid = _customer(item)
    if message is not None and psid is not None:  # _checked: a message has its customer
        attachments = _attachments(message)
        if not (message.text or "").strip() and not attachments:
            # Deleted (unsent) or unsupported messages carry neither: nothing to store. The
            # rule is the service's (blank text is no text), so such an item is not refused.
            return "empty_message"
        sent_at = _when(item.timestamp)
        if message.is_echo:
            # Sent by the page (from Meta's inbox, another tool, or our own reply): the
            # customer is the recipient.
            echo = await service.record_echo(
                connection.name,
                psid,
                provider_message_id=message.mid,
                text=message.text,
                sent_at=sent_at,
                attachments=attachments,
                metadata=message.metadata,
            )
            if echo is None:
                log.info(
                    "meta echo skipped: %s has no conversation for its recipient yet",
                    connection.name,
                )
                return "echo_without_conversation"
            if echo.duplicate:
                return "duplicate"
            # The echo of one of our replies is its delivery confirmation, not a message.
            return "echo" if echo.confirmed_reply is None else "reply_confirmed"
        inbound = InboundMessage(
            provider_message_id=message.mid,
            sent_at=sent_at,
            text=message.text,
            attachments=attachments,
            reply_to=message.reply_to.mid if message.reply_to else None,
            quick_reply=message.quick_reply.payload if message.quick_reply else None,
        )
        result = await service.receive_inbound(
            connection.name,
            psid,
            inbound,
            metadata={"received_via": "meta", "entry_id": entry.id},
        )
        return "duplicate" if result.duplicate else "message"
    if item.read is not None:
        log.debug("meta read receipt for %s", connection.name)
        return "read"
    if item.delivery is not None:
        log.debug("meta delivery receipt for %s", connection.name)
        return "delivery"
    # postbacks, reactions, referrals, message edits, ...: not stored yet
    return "unsupported"


def add_routes(app: web.Application) -> None:
    """Register the Meta webhook routes (and the webhook item counter)."""
    webhook_items(app)
    app.router.add_get("/webhooks/meta", verify)
    app.router.add_post("/webhooks/meta", receive)
