"""The conversation decisions, taken over the event store and the identity tables.

Every command either appends its events and updates the write-side tables (reservations,
conversations, contacts) in one transaction, or changes nothing. Races are settled by the
database: the reservation primary key, the contact-key primary key, the partial unique index of
open conversations and the streams' expected versions. A loser rolls back and retries from a
fresh read, so ``receive_inbound`` never shows its caller a conflict.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import random
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, LiteralString, NamedTuple, TypeVar

import msgspec
import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import AsyncConnectionPool

from eventstore import (
    NO_STREAM,
    DuplicateEvent,
    EventStore,
    InvalidAppend,
    NewEvent,
    WrongExpectedVersion,
    deterministic_id,
    uuid7,
)
from eventstore.errors import raise_translated, translate_errors

from .batching import (
    RECEIVE_ONE_CTES,
    BatchFailed,
    FirstStep,
    InboundBatcher,
    InboundRow,
    OpenHint,
    receive_many,
)
from .connections import Channel, is_connection_name, is_storable_text
from .delivery import META_CHANNELS, check_reply, confirm_echo, reply_in_metadata
from .errors import (
    ConnectionNotFound,
    ContactNotFound,
    ConversationNotFound,
    InvalidCommand,
    InvalidTransition,
    RetriesExhausted,
)
from .events import (
    CODEC,
    Attachment,
    ContactCreated,
    ContactIdentified,
    ContactsMerged,
    ConversationClosed,
    ConversationDeleted,
    ConversationOpened,
    ConversationReopened,
    ConversationRestored,
    ConversationSnoozed,
    ConversationUnsnoozed,
    GuestSignedUp,
    MessageEdited,
    MessageReceived,
    MessageSent,
    MessagesRead,
    contact_stream,
    conversation_stream,
)

__all__ = [
    "CommandResult",
    "ConversationService",
    "ConversationState",
    "GuestSignUp",
    "InboundMessage",
    "InboundResult",
    "ServiceStats",
]

MAX_TEXT = 20_000
MAX_ID = 500
_ATTEMPTS: Final = 30
#: Keys remembered as open by one service (see ``ConversationService._open_keys``).
_OPEN_KEYS_LIMIT: Final = 100_000
_T = TypeVar("_T")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _millis(when: dt.datetime) -> int:
    return int(when.timestamp() * 1000)


class InboundMessage(msgspec.Struct, frozen=True):
    """A customer message as a provider delivered it."""

    provider_message_id: str
    sent_at: dt.datetime
    text: str | None = None
    attachments: tuple[Attachment, ...] = ()
    reply_to: str | None = None
    quick_reply: str | None = None
    provider: str | None = None  # defaults to the connection's channel
    #: the time part of the message's id (default ``sent_at``); fixed where the provider has
    #: no stable timestamp, so a retry still maps to the same id
    id_time: dt.datetime | None = None


class InboundResult(msgspec.Struct, frozen=True):
    """Where an inbound message landed: its conversation, and whether it was new there."""

    conversation_id: uuid.UUID
    message_id: uuid.UUID
    contact_id: uuid.UUID | None
    duplicate: bool = False
    opened: bool = False
    reopened: bool = False


class CommandResult(msgspec.Struct, frozen=True):
    """The conversation's stream version after a command (for the next ``If-Match``)."""

    conversation_id: uuid.UUID
    version: int
    event_ids: tuple[uuid.UUID, ...] = ()
    duplicate: bool = False
    #: an echo recorded as the confirmation of this reply (not as a message)
    confirmed_reply: uuid.UUID | None = None


class GuestSignUp(msgspec.Struct, frozen=True):
    """A signed-up widget guest: its contact and the guest id the widget sends as PSID."""

    contact_id: uuid.UUID
    guest_id: str


class ConversationState(msgspec.Struct, frozen=True):
    """The write side's view of one conversation (not a read model)."""

    conversation_id: uuid.UUID
    stream_id: str
    connection: str
    psid: str
    contact_id: uuid.UUID
    status: str
    deleted: bool
    opened_at: dt.datetime
    closed_at: dt.datetime | None
    snoozed_until: dt.datetime | None
    snooze_until_reply: bool
    version: int


class ServiceStats(msgspec.Struct):
    """Counters for metrics: races retried and redeliveries dropped."""

    conflicts_retried: int = 0
    duplicates_dropped: int = 0


_RETRYABLE_CONSTRAINTS: Final = frozenset(
    {
        "stream_reservations_pkey",
        "contact_keys_pkey",
        "conversations_one_open_per_key",
        "contacts_client_id_key",
        "streams_pkey",
        "events_event_id_key",
        "events_stream_version_key",
    }
)


_FILLED_BY_SQL: Final = uuid.UUID(int=0)
_ENCODE = msgspec.json.Encoder().encode


class _Retry(Exception):
    """Internal: the attempt lost a race; roll back and start again."""


def _raise_unless_retryable(exc: psycopg.Error) -> None:
    """Return for a lost race (retry from a fresh read); raise our error for anything else."""
    if isinstance(exc, pg_errors.UniqueViolation):
        if exc.diag.constraint_name in _RETRYABLE_CONSTRAINTS:
            return
        raise_translated(exc)
    if isinstance(exc, pg_errors.SerializationFailure | pg_errors.DeadlockDetected):
        return
    raise_translated(exc)


class _Inbound(NamedTuple):
    """A delivery being received: the key, the message and its deterministic id."""

    connection: str
    psid: str
    message: InboundMessage
    message_id: uuid.UUID
    metadata: dict[str, Any]


class _Opening(NamedTuple):
    """A conversation about to be opened: the statement's parameters, and its result."""

    params: dict[str, Any]
    result: InboundResult


# Opening a conversation, in one statement (its own transaction): the contact (new, or the
# key's existing one held FOR SHARE and still the one we read, so a concurrent merge either
# waits for us or makes us retry), the reservation (inserted for a new key; replaced only if it
# still names the conversation we read), the conversation row, its stream (and a new contact's
# stream) and the events in log order. Each step selects from the one before, so when a check
# fails nothing at all is written and no row comes back; a lost race on a key raises a unique
# violation instead. Both end in a retry from a fresh read.
_HELD_NEW = """
held AS (
    INSERT INTO contact_keys (connection, psid, contact_id)
    SELECT %(connection)s, %(psid)s, contact_id FROM contact
    RETURNING contact_id
),
"""

_CONTACT_NEW = """
WITH contact AS (
    INSERT INTO contacts (contact_id, created_at) VALUES (%(contact_id)s, %(now)s)
    RETURNING contact_id
),"""

_NEW_CONTACT = _CONTACT_NEW + _HELD_NEW

_KNOWN_CONTACT = """
WITH held AS (
    SELECT contact_id FROM contact_keys
    WHERE connection = %(connection)s AND psid = %(psid)s AND contact_id = %(contact_id)s
    FOR SHARE
),
"""

_RESERVE = """
reserved AS (
    INSERT INTO stream_reservations (connection, psid, conversation_id, stream_id)
    SELECT %(connection)s, %(psid)s, %(conversation_id)s, %(stream_id)s FROM held
    RETURNING conversation_id
),
"""

_REPLACE = """
reserved AS (
    UPDATE stream_reservations
    SET conversation_id = %(conversation_id)s, stream_id = %(stream_id)s, reserved_at = now()
    WHERE connection = %(connection)s AND psid = %(psid)s
      AND conversation_id = %(previous)s AND EXISTS (SELECT FROM held)
    RETURNING conversation_id
),
"""

_OPENED = """
opened AS (
    INSERT INTO conversations (conversation_id, stream_id, connection, psid, contact_id,
                               status, opened_at)
    SELECT r.conversation_id, %(stream_id)s, %(connection)s, %(psid)s, h.contact_id,
           'open', %(now)s
    FROM reserved r, held h
    RETURNING conversation_id
),
"""

# A new contact's conversation: its two streams, then ContactCreated, ConversationOpened and the
# message in log order (in _STREAMS_AND_EVENTS and _RECEIVE_OR_OPEN).
_NEW_CONTACT_STREAMS = """
streams_made AS (
    INSERT INTO streams (stream_id, category)
    SELECT n.stream_id, n.category
    FROM opened,
         (VALUES (%(contact_stream)s::text, 'contact'), (%(stream_id)s::text, 'conversation'))
            AS n(stream_id, category)
)"""

_NEW_CONTACT_EVENTS = """
INSERT INTO events (event_id, stream_id, stream_version, category, type, data, metadata)
SELECT e.event_id, e.stream_id, e.version, e.category, e.type, e.data, e.metadata
FROM opened, (VALUES
    (0, %(created_id)s::uuid, %(contact_stream)s::text, 1, 'contact', %(created_type)s::text,
     %(created_data)s::jsonb, %(created_metadata)s::jsonb),
    (1, %(opened_id)s::uuid, %(stream_id)s::text, 1, 'conversation', %(opened_type)s::text,
     %(opened_data)s::jsonb, %(opened_metadata)s::jsonb),
    (2, %(received_id)s::uuid, %(stream_id)s::text, 2, 'conversation', %(received_type)s::text,
     %(received_data)s::jsonb, %(received_metadata)s::jsonb)
) AS e(ord, event_id, stream_id, version, category, type, data, metadata)
ORDER BY e.ord
RETURNING position
"""

# The conversation's stream and its two events (versions 1 and 2); a new contact's stream and its
# ContactCreated come first. Scalar parameters, not arrays: PostgreSQL then settles on one
# generic plan for the prepared statement instead of planning it on every execution.
_STREAMS_AND_EVENTS: Final[dict[bool, LiteralString]] = {
    False: """
streams_made AS (
    INSERT INTO streams (stream_id, category)
    SELECT %(stream_id)s, 'conversation' FROM opened
)
INSERT INTO events (event_id, stream_id, stream_version, category, type, data, metadata)
SELECT e.event_id, %(stream_id)s, e.version, 'conversation', e.type, e.data, e.metadata
FROM opened, (VALUES
    (%(opened_id)s::uuid, 1, %(opened_type)s::text, %(opened_data)s::jsonb,
     %(opened_metadata)s::jsonb),
    (%(received_id)s::uuid, 2, %(received_type)s::text, %(received_data)s::jsonb,
     %(received_metadata)s::jsonb)
) AS e(event_id, version, type, data, metadata)
ORDER BY e.version
RETURNING position
""",
    True: _NEW_CONTACT_STREAMS + "\n" + _NEW_CONTACT_EVENTS,
}

#: (new contact, new reservation) -> the statement that opens a conversation
_OPEN_CONVERSATION: Final[dict[tuple[bool, bool], LiteralString]] = {
    (True, True): _NEW_CONTACT + _RESERVE + _OPENED + _STREAMS_AND_EVENTS[True],
    (True, False): _NEW_CONTACT + _REPLACE + _OPENED + _STREAMS_AND_EVENTS[True],
    (False, True): _KNOWN_CONTACT + _RESERVE + _OPENED + _STREAMS_AND_EVENTS[False],
    (False, False): _KNOWN_CONTACT + _REPLACE + _OPENED + _STREAMS_AND_EVENTS[False],
}

# A delivery to a key this service does not know to be open, when it knows the connection's
# channel: RECEIVE_ONE's reading and insert, and in the same statement the opening of a new
# key's first conversation (contact, reservation, conversation, two streams, three events) when
# the key has no contact, no reservation and the message is not stored. A first message then
# costs one statement instead of two: measured one at a time, about 750 us of server and client
# CPU against 1100. The row is ``(appended, opened, *FirstStep[1:])``; when neither, the reading
# decides as after RECEIVE_ONE. Two first messages of one key race on contact_keys_pkey, and the
# loser retries. The price is a larger statement for the first delivery a service sees to an
# existing key (after a restart): about 250 us of server CPU against 200, once per key.
_CONTACT_IF_NEW_KEY = """,
contact AS (
    INSERT INTO contacts (contact_id, created_at)
    SELECT %(contact_id)s, %(now)s FROM found f
    WHERE f.conversation_id IS NULL AND f.contact_id IS NULL AND f.stored_in IS NULL
      AND f.channel = %(channel)s
    RETURNING contact_id
),"""
_EVENTS_MADE = """,
events_made AS ("""
_SELECT_APPENDED_OPENED_FOUND = """)
SELECT EXISTS (SELECT FROM appended), EXISTS (SELECT FROM opened), f.* FROM found f
"""
_RECEIVE_OR_OPEN: Final = (
    RECEIVE_ONE_CTES
    + _CONTACT_IF_NEW_KEY
    + _HELD_NEW
    + _RESERVE
    + _OPENED
    + _NEW_CONTACT_STREAMS
    + _EVENTS_MADE
    + _NEW_CONTACT_EVENTS
    + _SELECT_APPENDED_OPENED_FOUND
)

# The newest customer message of a key, over its conversations (Meta's window counts from it).
_LAST_CUSTOMER_MESSAGE = """
SELECT max(last.sent_at) FROM conversations v
CROSS JOIN LATERAL (
    SELECT (e.data ->> 'sent_at')::timestamptz AS sent_at FROM events e
    WHERE e.stream_id = v.stream_id AND e.type = 'MessageReceived'
    ORDER BY e.stream_version DESC LIMIT 1
) AS last
WHERE v.connection = %s AND v.psid = %s
"""

# Identifying a contact matches, in this order, a registered client id, then a username, an
# email (both case-insensitively) and a phone, among the contacts not merged away; each probe
# has its partial index (sql/0002, sql/0009).
_MATCH_PROBES: Final[tuple[tuple[str, LiteralString], ...]] = (
    (
        "client_id",
        "SELECT contact_id FROM contacts WHERE client_id = %s AND merged_into IS NULL"
        " AND contact_id <> %s AND (registered OR NOT is_guest) ORDER BY created_at LIMIT 1",
    ),
    (
        "username",
        "SELECT contact_id FROM contacts WHERE lower(username) = lower(%s)"
        " AND merged_into IS NULL AND contact_id <> %s AND (registered OR NOT is_guest)"
        " ORDER BY created_at LIMIT 1",
    ),
    (
        "email",
        "SELECT contact_id FROM contacts WHERE lower(email) = lower(%s)"
        " AND merged_into IS NULL AND contact_id <> %s AND (registered OR NOT is_guest)"
        " ORDER BY created_at LIMIT 1",
    ),
    (
        "phone",
        "SELECT contact_id FROM contacts WHERE phone = %s AND merged_into IS NULL"
        " AND contact_id <> %s AND (registered OR NOT is_guest) ORDER BY created_at LIMIT 1",
    ),
)

# ConversationState's columns, in its field order, for every query that builds one.
_CONVERSATION_STATES = """
SELECT v.conversation_id, v.stream_id, v.connection, v.psid, v.contact_id, v.status,
       v.deleted, v.opened_at, v.closed_at, v.snoozed_until, v.snooze_until_reply,
       (SELECT max(e.stream_version) FROM events e WHERE e.stream_id = v.stream_id)
FROM conversations v
"""

_CONVERSATION = _CONVERSATION_STATES + "WHERE v.conversation_id = %s"

# One identifier given to a contact, (value, contact_id, value): set where the contact has
# none, the probes can match it (not a guest that never registered: one that held an
# identifier no probe finds would keep it from anyone), and no other contact the probes could
# match has it, so that which contact an identifier matches never changes (and the client
# id's unique index is never hit).
_FILL_IDENTIFIER: Final[dict[str, LiteralString]] = {
    # Any live contact: contacts_client_id_key allows one per client id, guest or not.
    "client_id": "UPDATE contacts t SET client_id = %s WHERE t.contact_id = %s"
    " AND t.client_id IS NULL AND (t.registered OR NOT t.is_guest)"
    " AND NOT EXISTS (SELECT FROM contacts o"
    " WHERE o.client_id = %s AND o.merged_into IS NULL AND o.contact_id <> t.contact_id)",
    "username": "UPDATE contacts t SET username = %s WHERE t.contact_id = %s"
    " AND t.username IS NULL AND (t.registered OR NOT t.is_guest)"
    " AND NOT EXISTS (SELECT FROM contacts o"
    " WHERE lower(o.username) = lower(%s) AND o.merged_into IS NULL"
    " AND o.contact_id <> t.contact_id AND (o.registered OR NOT o.is_guest))",
    "email": "UPDATE contacts t SET email = %s WHERE t.contact_id = %s"
    " AND t.email IS NULL AND (t.registered OR NOT t.is_guest)"
    " AND NOT EXISTS (SELECT FROM contacts o"
    " WHERE lower(o.email) = lower(%s) AND o.merged_into IS NULL"
    " AND o.contact_id <> t.contact_id AND (o.registered OR NOT o.is_guest))",
    "phone": "UPDATE contacts t SET phone = %s WHERE t.contact_id = %s"
    " AND t.phone IS NULL AND (t.registered OR NOT t.is_guest)"
    " AND NOT EXISTS (SELECT FROM contacts o"
    " WHERE o.phone = %s AND o.merged_into IS NULL AND o.contact_id <> t.contact_id"
    " AND (o.registered OR NOT o.is_guest))",
}
#: How many merges identify follows from the contact it matched to where that one went.
_MERGE_CHAIN_LIMIT: Final = 10


class ConversationService:
    """Every conversation and contact command, over one :class:`EventStore`."""

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.pool: AsyncConnectionPool[Any] = store.pool
        self.stats = ServiceStats()
        #: shares the first statement of concurrent ``receive_inbound`` calls
        self.batcher = InboundBatcher(self.pool)
        #: (connection, psid) -> what this service saw of the key's conversation when its last
        #: delivery here left it open: a hint for which first statement to run (see
        #: ``conversations.batching.RECEIVE_TO_OPEN``), never trusted for an outcome
        self._open_keys: dict[tuple[str, str], OpenHint] = {}
        #: connection -> its channel (which never changes), as read by a delivery
        self._channels: dict[str, Channel] = {}

    # ------------------------------------------------------------------ plumbing

    async def _retrying(
        self, command: str, attempt: Callable[[psycopg.AsyncConnection[Any]], Awaitable[_T]]
    ) -> _T:
        """Run ``attempt`` in a transaction until it does not lose a race."""
        for n in range(_ATTEMPTS):
            try:
                async with self.pool.connection() as conn:
                    async with conn.transaction():
                        result = await attempt(conn)
                self.store.wake_subscribers()
                return result
            except (_Retry, WrongExpectedVersion, DuplicateEvent):
                pass
            except psycopg.Error as exc:
                _raise_unless_retryable(exc)
            await self._lost_race(n)
        raise RetriesExhausted(command, _ATTEMPTS)

    async def _lost_race(self, attempt: int) -> None:
        """Count a lost race and back off (jittered, growing) before attempt ``attempt + 1``."""
        self.stats.conflicts_retried += 1
        await asyncio.sleep(random.uniform(0, min(0.05, 0.002 * 2**attempt)))

    @staticmethod
    async def _one(
        conn: psycopg.AsyncConnection[Any], query: Any, params: Any = None
    ) -> tuple[Any, ...] | None:
        cur = await conn.execute(query, params)
        return await cur.fetchone()

    def _event(
        self,
        payload: msgspec.Struct,
        event_id: uuid.UUID | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> NewEvent:
        # The metadata is a mapping, not keyword arguments: a caller's keys (receive_inbound
        # takes any) must not collide with this method's parameters.
        return CODEC.new_event(payload, event_id=event_id, metadata=metadata)

    # ------------------------------------------------------------------ inbound

    async def receive_inbound(
        self,
        connection: str,
        psid: str,
        message: InboundMessage,
        *,
        metadata: dict[str, Any] | None = None,
    ) -> InboundResult:
        """Store a customer message in the key's current conversation, opening one if needed.

        Idempotent: the message id is derived from the connection and the provider's message
        id, so a redelivery (even after a restart) returns ``duplicate=True`` and stores
        nothing. Never raises a conflict: races are retried internally.
        """
        _check_key(psid)
        _check_message(message)
        message_id = deterministic_id(
            _millis(message.id_time or message.sent_at),
            connection,
            "in",
            message.provider_message_id,
        )
        inbound = _Inbound(connection, psid, message, message_id, dict(metadata or {}))
        # Statements are what a delivery costs: a message to an open conversation is one
        # (shared with the deliveries that arrived meanwhile, see conversations.batching), and
        # so is a new key's first message once the connection's channel is known (the same
        # statement writes the contact, reservation, conversation and events; otherwise one
        # more does); only rarer cases take a transaction.
        alone = False
        for n in range(_ATTEMPTS):
            try:
                result = await self._receive_once(inbound, alone)
            except BatchFailed:
                alone = True  # the shared statement failed: find out whether it was ours
                continue
            except (_Retry, WrongExpectedVersion, DuplicateEvent):
                pass
            except (pg_errors.DataError, InvalidAppend) as exc:
                # Class 22 (by SQLSTATE; the store reports it as InvalidAppend): a value jsonb
                # cannot hold (a \u0000 escape in an attachment or in metadata). Nothing was
                # stored.
                raise InvalidCommand(
                    "the message cannot be stored: PostgreSQL refused its data", field="message"
                ) from exc
            except psycopg.Error as exc:
                _raise_unless_retryable(exc)
            else:
                if not result.duplicate:
                    self.store.wake_subscribers()
                return result
            await self._lost_race(n)
        raise RetriesExhausted("receive_inbound", _ATTEMPTS)

    async def _receive_once(self, inbound: _Inbound, alone: bool) -> InboundResult:
        """One attempt: append to the open conversation, or decide from the same read."""
        message = inbound.message
        now = _now()
        key = (inbound.connection, inbound.psid)
        hint = self._open_keys.get(key)
        # The first statement fills in the conversation and the provider (the connection's
        # channel unless the message names one), except RECEIVE_TO_OPEN, which stores the data
        # as it comes: with a hint they are filled in here, to the same JSON.
        if hint is None:
            conversation_id, provider = _FILLED_BY_SQL, message.provider or ""
        else:
            conversation_id = hint.conversation_id
            provider = hint.channel if message.provider is None else message.provider
        payload = MessageReceived(
            conversation_id=conversation_id,
            message_id=inbound.message_id,
            provider=provider,
            provider_message_id=message.provider_message_id,
            text=message.text,
            sent_at=message.sent_at,
            received_at=now,
            attachments=message.attachments,
            reply_to=message.reply_to,
            quick_reply=message.quick_reply,
        )
        # Known whenever the key is: every reading of a key returns its connection's channel.
        channel = self._channels.get(inbound.connection)
        request = InboundRow(
            inbound.connection,
            inbound.psid,
            inbound.message_id,
            _ENCODE(payload).decode(),
            message.provider,
            _ENCODE(inbound.metadata).decode(),
            hint,
        )
        if hint is None and channel is not None:
            # Not known to be open: perhaps a first message, which this statement also opens.
            opening = self._opening(inbound, payload, channel, None)
            opening.params.update(request._asdict(), channel=channel)
            async with self.pool.connection() as conn:
                cur = await conn.execute(_RECEIVE_OR_OPEN, opening.params)
                either = await cur.fetchone()
            if either is not None and either[1]:
                # ConversationOpened and the message: the new stream is at version 2.
                self._remember_open(key, channel, opening.result, opening.params["stream_id"], 2)
                return opening.result
            found = None if either is None else FirstStep(either[0], *either[2:])
        elif alone:
            found = (await receive_many(self.pool, [request]))[0]
        else:
            found = await self.batcher.receive(request)
        if found is None:
            raise ConnectionNotFound(inbound.connection)
        self._channels[inbound.connection] = found.channel
        if found.appended:
            # Appended to it, so the key has a conversation, a stream and a version.
            assert found.conversation_id is not None and found.stream_id is not None
            assert found.version is not None
            result = InboundResult(found.conversation_id, inbound.message_id, found.contact_id)
            self._remember_open(key, found.channel, result, found.stream_id, found.version + 1)
            return result
        self._open_keys.pop(key, None)
        if found.stored_in is not None:
            self.stats.duplicates_dropped += 1
            return InboundResult(
                conversation_id=uuid.UUID(found.stored_in.removeprefix("conversation-")),
                message_id=inbound.message_id,
                contact_id=found.contact_id,
                duplicate=True,
            )
        async with self.pool.connection() as conn:
            if found.conversation_id is not None and found.status in ("open", "snoozed"):
                # Snoozed until the customer's next message (left to us by the first
                # statement), or the stream moved on since the read (the append's version
                # check then fails and we retry).
                async with conn.transaction():
                    result = await self._append_to_current(
                        conn, inbound, found, payload, reopen=False
                    )
            elif (
                found.conversation_id is not None
                and not found.deleted
                and _reopens(
                    found.reopen_policy, found.reopen_window, found.closed_at, message.sent_at
                )
            ):
                async with conn.transaction():
                    result = await self._append_to_current(
                        conn, inbound, found, payload, reopen=True
                    )
            else:
                # A new conversation: for a new key, or after a close the policy does not
                # reopen.
                result = await self._open_for(conn, inbound, found, payload)
                stream_id = conversation_stream(result.conversation_id)
                self._remember_open(key, found.channel, result, stream_id, 2)
        # (A reopening or an unsnooze leaves no hint: the next delivery reads the key.)
        return result

    def _remember_open(
        self,
        key: tuple[str, str],
        channel: Channel,
        result: InboundResult,
        stream_id: str,
        version: int,
    ) -> None:
        """Note what this delivery left: the key's conversation open, its stream at
        ``version`` (see ``_open_keys``)."""
        keys = self._open_keys
        if result.contact_id is None:  # RECEIVE_TO_OPEN checks the contact: no use hinting
            keys.pop(key, None)
            return
        if len(keys) >= _OPEN_KEYS_LIMIT and key not in keys:
            # Bounded; forgetting costs each key one RECEIVE_ONE, so no eviction order is kept.
            keys.clear()
        keys[key] = OpenHint(channel, result.conversation_id, stream_id, result.contact_id, version)

    def _received(
        self,
        inbound: _Inbound,
        channel: str,
        payload: MessageReceived,
        conversation_id: uuid.UUID,
    ) -> NewEvent:
        """The message as an event of ``conversation_id``, its provider defaulted."""
        filled = msgspec.structs.replace(
            payload, conversation_id=conversation_id, provider=payload.provider or channel
        )
        return self._event(filled, event_id=inbound.message_id, metadata=inbound.metadata)

    async def _append_to_current(
        self,
        conn: psycopg.AsyncConnection[Any],
        inbound: _Inbound,
        found: FirstStep,
        payload: MessageReceived,
        *,
        reopen: bool,
    ) -> InboundResult:
        """Append to the key's current conversation, reopening it (by the connection's policy)
        or waking it from a snooze that waited for the customer's next message first."""
        conversation_id = found.conversation_id
        assert conversation_id is not None and found.stream_id is not None
        now = payload.received_at
        events = [self._received(inbound, found.channel, payload, conversation_id)]
        first: msgspec.Struct | None = None
        if reopen:
            first = ConversationReopened(conversation_id, "policy", now)
        elif found.status == "snoozed" and found.snooze_until_reply:
            first = ConversationUnsnoozed(conversation_id, "customer", now)
        if first is not None:
            events.insert(0, self._event(first, metadata=inbound.metadata))
            await self._set_open(conn, conversation_id)
        await self.store.append(found.stream_id, events, found.version or 0, connection=conn)
        return InboundResult(conversation_id, inbound.message_id, found.contact_id, reopened=reopen)

    async def _open_for(
        self,
        conn: psycopg.AsyncConnection[Any],
        inbound: _Inbound,
        found: FirstStep,
        payload: MessageReceived,
    ) -> InboundResult:
        """Open a conversation for the key in one statement (see ``_OPEN_CONVERSATION``)."""
        opening = self._opening(inbound, payload, found.channel, found.contact_id)
        opening.params["previous"] = found.conversation_id
        query = _OPEN_CONVERSATION[found.contact_id is None, found.conversation_id is None]
        cur = await conn.execute(query, opening.params)
        if not await cur.fetchall():
            raise _Retry  # the key's contact or reservation changed since the read
        return opening.result

    def _opening(
        self,
        inbound: _Inbound,
        payload: MessageReceived,
        channel: Channel,
        contact_id: uuid.UUID | None,
    ) -> _Opening:
        """The parameters that open a conversation for the key: ConversationOpened and the
        message, and for a new contact (``contact_id`` None) the contact and ContactCreated."""
        now = payload.received_at
        new_contact = contact_id is None
        contact_id = uuid7() if contact_id is None else contact_id
        conversation_id = uuid7()
        opened = ConversationOpened(
            conversation_id, inbound.connection, channel, inbound.psid, contact_id, now
        )
        params: dict[str, Any] = {
            "connection": inbound.connection,
            "psid": inbound.psid,
            "contact_id": contact_id,
            "conversation_id": conversation_id,
            "stream_id": conversation_stream(conversation_id),
            "now": now,
        }
        events = [
            ("opened", self._event(opened, metadata=inbound.metadata)),
            ("received", self._received(inbound, channel, payload, conversation_id)),
        ]
        if new_contact:
            created = ContactCreated(contact_id, inbound.connection, inbound.psid, now)
            events.append(("created", self._event(created, metadata=inbound.metadata)))
            params["contact_stream"] = contact_stream(contact_id)
        for name, event in events:
            params[f"{name}_id"] = event.event_id
            params[f"{name}_type"] = event.type
            params[f"{name}_data"] = event.data.decode()
            params[f"{name}_metadata"] = _ENCODE(event.metadata).decode()
        result = InboundResult(conversation_id, inbound.message_id, contact_id, opened=True)
        return _Opening(params, result)

    @staticmethod
    async def _set_open(conn: psycopg.AsyncConnection[Any], conversation_id: uuid.UUID) -> None:
        await conn.execute(
            "UPDATE conversations SET status = 'open', closed_at = NULL, snoozed_until = NULL,"
            " snooze_until_reply = false WHERE conversation_id = %s",
            (conversation_id,),
        )

    async def record_edit(
        self,
        connection: str,
        provider_message_id: str,
        sent_at: dt.datetime,
        text: str | None,
        edited_at: dt.datetime,
        *,
        edit_key: str | None = None,
    ) -> CommandResult | None:
        """Record a customer's edit of a stored inbound message (``None`` if it is unknown).

        ``edit_key`` is the provider's own id for this edit, when it has one (Telegram's
        ``update_id``): a redelivery repeats it, and no other edit has it.
        """
        message_id = deterministic_id(_millis(sent_at), connection, "in", provider_message_id)
        # Without the provider's id for the edit, its text is in the id: Telegram stamps edits
        # to the second, so two edits of one message within a second differ by it, while a
        # redelivered edit repeats it.
        edit_id = deterministic_id(
            _millis(edited_at),
            connection,
            "edit",
            provider_message_id,
            str(_millis(edited_at)),
            ("-" if text is None else "+" + text) if edit_key is None else "#" + edit_key,
        )

        async def attempt(conn: psycopg.AsyncConnection[Any]) -> CommandResult | None:
            row = await self._one(
                conn,
                "SELECT e.stream_id, (SELECT max(m.stream_version) FROM events m"
                " WHERE m.stream_id = e.stream_id) FROM events e WHERE e.event_id = %s",
                (message_id,),
            )
            if row is None:
                return None
            stream_id, version = row
            cid = uuid.UUID(stream_id.removeprefix("conversation-"))
            edit = MessageEdited(cid, message_id, provider_message_id, text, edited_at)
            try:
                result = await self.store.append(
                    stream_id, [self._event(edit, event_id=edit_id)], version, connection=conn
                )
            except DuplicateEvent:
                return CommandResult(cid, version, (edit_id,), duplicate=True)
            return CommandResult(cid, result.version, (edit_id,))

        return await self._retrying("record_edit", attempt)

    # ------------------------------------------------------------------ agent commands

    async def conversation(self, conversation_id: uuid.UUID) -> ConversationState:
        """The write side's state of a conversation; raise :class:`ConversationNotFound`."""
        with translate_errors():
            async with self.pool.connection() as conn:
                row = await self._one(conn, _CONVERSATION, (conversation_id,))
        if row is None:
            raise ConversationNotFound(conversation_id)
        return ConversationState(*row)

    async def _command(
        self,
        command: str,
        conversation_id: uuid.UUID,
        expected_version: int | None,
        decide: Callable[
            [psycopg.AsyncConnection[Any], ConversationState],
            Awaitable[Sequence[NewEvent]],
        ],
        *,
        done: Callable[[psycopg.AsyncConnection[Any]], Awaitable[bool]] | None = None,
    ) -> CommandResult:
        """Load the conversation, let ``decide`` check state and write tables, append.

        ``done`` tells whether an idempotent command already took effect: a retry of it then
        reports a duplicate even when its expected version is stale, since its own events
        moved the version on.
        """

        async def attempt(conn: psycopg.AsyncConnection[Any]) -> CommandResult:
            row = await self._one(conn, _CONVERSATION + " FOR UPDATE OF v", (conversation_id,))
            if row is None:
                raise ConversationNotFound(conversation_id)
            state = ConversationState(*row)
            if expected_version is not None and expected_version != state.version:
                if done is not None and await done(conn):
                    return CommandResult(conversation_id, state.version, duplicate=True)
                raise _Conflict(state.stream_id, expected_version, state.version)
            events = await decide(conn, state)
            if not events:
                return CommandResult(conversation_id, state.version, duplicate=True)
            result = await self.store.append(
                state.stream_id, events, state.version, connection=conn
            )
            return CommandResult(conversation_id, result.version, tuple(e.event_id for e in events))

        try:
            return await self._retrying(command, attempt)
        except _Conflict as exc:
            raise WrongExpectedVersion(exc.stream_id, exc.expected, exc.actual) from None

    async def close(
        self,
        conversation_id: uuid.UUID,
        *,
        by: str,
        reason: str | None = None,
        expected_version: int | None = None,
    ) -> CommandResult:
        """Close an open or snoozed conversation; the key's next message follows the policy."""
        _check_actor(by)
        if reason is not None and (
            not isinstance(reason, str) or len(reason) > MAX_TEXT or not is_storable_text(reason)
        ):
            raise InvalidCommand(
                f"reason must be at most {MAX_TEXT} characters of valid Unicode, without NUL",
                field="reason",
            )

        async def decide(
            conn: psycopg.AsyncConnection[Any], state: ConversationState
        ) -> list[NewEvent]:
            if state.status == "closed":
                raise InvalidTransition(conversation_id, "close", "closed", state.version)
            now = _now()
            await conn.execute(
                "UPDATE conversations SET status = 'closed', closed_at = %s, snoozed_until = NULL,"
                " snooze_until_reply = false WHERE conversation_id = %s",
                (now, conversation_id),
            )
            return [self._event(ConversationClosed(conversation_id, by, now, reason))]

        return await self._command("close", conversation_id, expected_version, decide)

    async def reopen(
        self, conversation_id: uuid.UUID, *, by: str, expected_version: int | None = None
    ) -> CommandResult:
        """Reopen a closed conversation, making it its key's current one again.

        Refused while another conversation of the same key is open (at most one may be).
        """
        _check_actor(by)

        async def decide(
            conn: psycopg.AsyncConnection[Any], state: ConversationState
        ) -> list[NewEvent]:
            if state.status != "closed":
                raise InvalidTransition(conversation_id, "reopen", state.status, state.version)
            if state.deleted:
                raise InvalidTransition(conversation_id, "reopen", "deleted", state.version)
            other = await self._one(
                conn,
                "SELECT conversation_id FROM conversations WHERE connection = %s AND psid = %s"
                " AND status IN ('open', 'snoozed') AND conversation_id <> %s",
                (state.connection, state.psid, conversation_id),
            )
            if other is not None:
                raise InvalidTransition(
                    conversation_id,
                    "reopen",
                    "closed, and a newer conversation is open",
                    state.version,
                )
            await self._set_open(conn, conversation_id)
            await conn.execute(
                "UPDATE stream_reservations SET conversation_id = %s, stream_id = %s,"
                " reserved_at = now() WHERE connection = %s AND psid = %s",
                (conversation_id, state.stream_id, state.connection, state.psid),
            )
            return [self._event(ConversationReopened(conversation_id, by, _now()))]

        return await self._command("reopen", conversation_id, expected_version, decide)

    async def snooze(
        self,
        conversation_id: uuid.UUID,
        *,
        by: str,
        until: dt.datetime | None = None,
        expected_version: int | None = None,
    ) -> CommandResult:
        """Snooze until a time, or (``until=None``) until the customer's next message."""
        _check_actor(by)
        if until is not None:
            _check_time(until, "until")

        async def decide(
            conn: psycopg.AsyncConnection[Any], state: ConversationState
        ) -> list[NewEvent]:
            if state.status == "closed":
                raise InvalidTransition(conversation_id, "snooze", "closed", state.version)
            now = _now()
            if until is not None and until <= now:
                raise InvalidCommand("snooze until: the time must be in the future", field="until")
            await conn.execute(
                "UPDATE conversations SET status = 'snoozed', snoozed_until = %s,"
                " snooze_until_reply = %s WHERE conversation_id = %s",
                (until, until is None, conversation_id),
            )
            return [self._event(ConversationSnoozed(conversation_id, by, now, until))]

        return await self._command("snooze", conversation_id, expected_version, decide)

    async def unsnooze(
        self, conversation_id: uuid.UUID, *, by: str, expected_version: int | None = None
    ) -> CommandResult:
        """End a snooze early."""
        _check_actor(by)

        async def decide(
            conn: psycopg.AsyncConnection[Any], state: ConversationState
        ) -> list[NewEvent]:
            if state.status != "snoozed":
                raise InvalidTransition(conversation_id, "unsnooze", state.status, state.version)
            await self._set_open(conn, conversation_id)
            return [self._event(ConversationUnsnoozed(conversation_id, by, _now()))]

        return await self._command("unsnooze", conversation_id, expected_version, decide)

    async def mark_read(
        self,
        conversation_id: uuid.UUID,
        *,
        by: str,
        up_to_message_id: uuid.UUID,
        expected_version: int | None = None,
    ) -> CommandResult:
        """Mark the conversation read up to (and including) one of its messages."""
        _check_actor(by)

        async def decide(
            conn: psycopg.AsyncConnection[Any], state: ConversationState
        ) -> list[NewEvent]:
            row = await self._one(
                conn,
                "SELECT stream_id, type FROM events WHERE event_id = %s",
                (up_to_message_id,),
            )
            if (
                row is None
                or row[0] != state.stream_id
                or row[1]
                not in (
                    "MessageReceived",
                    "MessageSent",
                )
            ):
                raise InvalidCommand(
                    f"message {up_to_message_id} is not a message of conversation "
                    f"{conversation_id}",
                    field="up_to_message_id",
                )
            read = MessagesRead(conversation_id, by, up_to_message_id, _now())
            return [self._event(read)]

        return await self._command("mark_read", conversation_id, expected_version, decide)

    async def delete(
        self, conversation_id: uuid.UUID, *, by: str, expected_version: int | None = None
    ) -> CommandResult:
        """Soft delete: closes the conversation if open (releasing its key) and hides it."""
        _check_actor(by)

        async def decide(
            conn: psycopg.AsyncConnection[Any], state: ConversationState
        ) -> list[NewEvent]:
            if state.deleted:
                raise InvalidTransition(conversation_id, "delete", "deleted", state.version)
            now = _now()
            events = []
            if state.status != "closed":
                events.append(self._event(ConversationClosed(conversation_id, by, now, "deleted")))
            await conn.execute(
                "UPDATE conversations SET status = 'closed', deleted = true,"
                " closed_at = COALESCE(closed_at, %s), snoozed_until = NULL,"
                " snooze_until_reply = false WHERE conversation_id = %s",
                (now, conversation_id),
            )
            events.append(self._event(ConversationDeleted(conversation_id, by, now)))
            return events

        return await self._command("delete", conversation_id, expected_version, decide)

    async def restore(
        self, conversation_id: uuid.UUID, *, by: str, expected_version: int | None = None
    ) -> CommandResult:
        """Undo a soft delete; the conversation comes back closed."""
        _check_actor(by)

        async def decide(
            conn: psycopg.AsyncConnection[Any], state: ConversationState
        ) -> list[NewEvent]:
            if not state.deleted:
                raise InvalidTransition(conversation_id, "restore", "not deleted", state.version)
            await conn.execute(
                "UPDATE conversations SET deleted = false WHERE conversation_id = %s",
                (conversation_id,),
            )
            return [self._event(ConversationRestored(conversation_id, by, _now()))]

        return await self._command("restore", conversation_id, expected_version, decide)

    async def reply(
        self,
        conversation_id: uuid.UUID,
        *,
        by: str,
        text: str,
        idempotency_key: str,
        expected_version: int | None = None,
        tag: str | None = None,
    ) -> CommandResult:
        """Queue an agent reply for delivery; the same ``idempotency_key`` stores it once.

        Refused up front when the channel would refuse it: longer than the channel's limit or
        with a tag it does not permit (:class:`InvalidCommand`), or on Messenger and Instagram
        outside Meta's messaging window (:class:`MessagingWindowClosed`): more than 24 hours
        after the customer's last message without a permitted tag, or 7 days with
        ``HUMAN_AGENT``. The delivery daemon sends it (``handlers/delivery.py``).
        """
        _check_actor(by)
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT:
            raise InvalidCommand(f"text must be 1-{MAX_TEXT} characters", field="text")
        if not is_storable_text(text):
            raise InvalidCommand("text must be valid Unicode without NUL", field="text")
        if (
            not isinstance(idempotency_key, str)
            or not idempotency_key
            or len(idempotency_key) > 200
            or not is_storable_text(idempotency_key)
        ):
            raise InvalidCommand(
                "Idempotency-Key must be 1-200 characters of valid Unicode, without NUL",
                field="idempotency_key",
            )
        # Time-ordered ids need a timestamp, but a retried reply has another "now"; the
        # idempotency key alone must decide the id, so its time bits are fixed.
        event_id = deterministic_id(0, "reply", str(conversation_id), idempotency_key)

        async def stored(conn: psycopg.AsyncConnection[Any]) -> bool:
            found = await self._one(conn, "SELECT FROM events WHERE event_id = %s", (event_id,))
            return found is not None

        async def decide(
            conn: psycopg.AsyncConnection[Any], state: ConversationState
        ) -> list[NewEvent]:
            if await stored(conn):
                return []
            if state.deleted:
                raise InvalidTransition(conversation_id, "reply to", "deleted", state.version)
            now = _now()
            channel = await self._one(
                conn, "SELECT channel FROM connections WHERE name = %s", (state.connection,)
            )
            if channel is not None:
                last_in = None
                if channel[0] in META_CHANNELS:
                    row = await self._one(
                        conn, _LAST_CUSTOMER_MESSAGE, (state.connection, state.psid)
                    )
                    last_in = row[0] if row else None
                check_reply(conversation_id, channel[0], text, tag, last_in, now)
            sent = MessageSent(conversation_id, event_id, text, now, by, "agent", tag=tag)
            metadata = {"idempotency_key": idempotency_key}
            return [self._event(sent, event_id=event_id, metadata=metadata)]

        result = await self._command(
            "reply", conversation_id, expected_version, decide, done=stored
        )
        return msgspec.structs.replace(result, event_ids=(event_id,))

    async def record_echo(
        self,
        connection: str,
        psid: str,
        *,
        provider_message_id: str,
        text: str | None,
        sent_at: dt.datetime,
        attachments: tuple[Attachment, ...] = (),
        metadata: str | None = None,
    ) -> CommandResult | None:
        """Store a provider echo (a message sent from the page itself) as outbound, once.

        Lands in the key's current conversation; ``None`` when the key has none yet. The echo
        of one of our own replies (its ``metadata`` names the reply, or it carries the provider
        message id the reply was delivered with) is recorded as that reply's
        ``ReplyConfirmed`` instead, once per reply: never as a second outbound message.
        """
        message_id = deterministic_id(_millis(sent_at), connection, "out", provider_message_id)
        reply_id = reply_in_metadata(metadata)

        async def attempt(conn: psycopg.AsyncConnection[Any]) -> CommandResult | None:
            row = await self._one(
                conn,
                "SELECT r.conversation_id, r.stream_id,"
                " (SELECT max(m.stream_version) FROM events m WHERE m.stream_id = r.stream_id),"
                " (SELECT 1 FROM events e WHERE e.event_id = %s)"
                " FROM stream_reservations r WHERE r.connection = %s AND r.psid = %s",
                (message_id, connection, psid),
            )
            if row is None:
                return None
            cid, stream_id, version, dup = row
            if dup is not None:
                self.stats.duplicates_dropped += 1
                return CommandResult(cid, version, (message_id,), duplicate=True)
            confirmed = await confirm_echo(
                conn,
                self.store,
                connection=connection,
                psid=psid,
                reply_id=reply_id,
                current_stream=stream_id,
                provider_message_id=provider_message_id,
                confirmed_at=sent_at,
                event_id=message_id,
            )
            if confirmed is not None:
                reply_cid, reply, reply_version, duplicate = confirmed
                if duplicate:
                    self.stats.duplicates_dropped += 1
                return CommandResult(
                    reply_cid,
                    reply_version,
                    () if duplicate else (message_id,),
                    duplicate=duplicate,
                    confirmed_reply=reply,
                )
            sent = MessageSent(
                cid, message_id, text, sent_at, "echo", "echo", provider_message_id, attachments
            )
            result = await self.store.append(
                stream_id, [self._event(sent, event_id=message_id)], version, connection=conn
            )
            return CommandResult(cid, result.version, (message_id,))

        return await self._retrying("record_echo", attempt)

    # ------------------------------------------------------------------ contacts and guests

    async def guest_sign_up(
        self,
        connection: str,
        *,
        username: str | None = None,
        phone: str | None = None,
        email: str | None = None,
    ) -> GuestSignUp:
        """Create a widget guest's contact before any message; returns its guest id."""
        if not is_connection_name(connection):
            raise ConnectionNotFound(connection)
        for field, value in (("username", username), ("phone", phone), ("email", email)):
            _check_optional(field, value)
        contact_id = uuid7()
        guest_id = f"guest-{contact_id}"

        async def attempt(conn: psycopg.AsyncConnection[Any]) -> GuestSignUp:
            row = await self._one(
                conn, "SELECT channel FROM connections WHERE name = %s", (connection,)
            )
            if row is None:
                raise ConnectionNotFound(connection)
            if row[0] != "widget":
                raise InvalidCommand(
                    f"connection {connection!r} is a {row[0]} connection; guests sign up on"
                    " widget connections",
                    field="connection",
                )
            now = _now()
            await conn.execute(
                "INSERT INTO contacts (contact_id, username, phone, email, is_guest, created_at)"
                " VALUES (%s, %s, %s, %s, true, %s)",
                (contact_id, username, phone, email, now),
            )
            await conn.execute(
                "INSERT INTO contact_keys (connection, psid, contact_id) VALUES (%s, %s, %s)",
                (connection, guest_id, contact_id),
            )
            event = GuestSignedUp(contact_id, connection, guest_id, now, username, phone, email)
            await self.store.append(
                contact_stream(contact_id), [self._event(event)], NO_STREAM, connection=conn
            )
            return GuestSignUp(contact_id, guest_id)

        return await self._retrying("guest_sign_up", attempt)

    async def contact_of(self, connection: str, psid: str) -> uuid.UUID | None:
        """The contact a customer key belongs to now (after merges), if any."""
        if not is_connection_name(connection):
            raise ConnectionNotFound(connection)
        _check_key(psid)
        with translate_errors():
            async with self.pool.connection() as conn:
                row = await self._one(
                    conn,
                    "SELECT contact_id FROM contact_keys WHERE connection = %s AND psid = %s",
                    (connection, psid),
                )
        return row[0] if row else None

    async def contact_conversations(self, contact_id: uuid.UUID) -> list[ConversationState]:
        """A contact's conversations (including merged contacts'), newest first."""
        with translate_errors():
            async with self.pool.connection() as conn:
                cur = await conn.execute(
                    _CONVERSATION_STATES + "WHERE v.contact_id = %s"
                    " ORDER BY v.opened_at DESC, v.conversation_id DESC",
                    (contact_id,),
                )
                rows = await cur.fetchall()
        return [ConversationState(*r) for r in rows]

    async def identify(
        self,
        contact_id: uuid.UUID,
        *,
        client_id: str | None = None,
        username: str | None = None,
        email: str | None = None,
        phone: str | None = None,
    ) -> uuid.UUID:
        """Record who a contact is; link it to the existing contact that matches.

        Matches a live contact by registered client id, then username, then email, then
        phone. On a match this contact is merged into it (its conversations follow) and the
        match's id is returned; otherwise the contact is marked registered and its own id
        is returned.
        """
        given = {"client_id": client_id, "username": username, "email": email, "phone": phone}
        for field, value in given.items():
            _check_optional(field, value)
        if not any(given.values()):
            raise InvalidCommand(
                "identify needs a client id, username, email or phone", field="client_id"
            )
        locks = _identifier_locks(given)

        async def attempt(conn: psycopg.AsyncConnection[Any]) -> uuid.UUID:
            # Identifications that share an identifier take turns, so the later one matches
            # the contact the earlier one registered; read first, both would see no match and
            # both register. Taken before any row lock: a contact identifying again holds its
            # row while another identification, holding the lock, waits to merge into it.
            # (Rare, and only identifications wait: no append takes these locks.)
            await conn.execute(
                "SELECT pg_advisory_xact_lock(k) FROM unnest(%s::bigint[]) AS t(k)", (locks,)
            )
            row = await self._one(
                conn,
                "SELECT merged_into FROM contacts WHERE contact_id = %s FOR UPDATE",
                (contact_id,),
            )
            if row is None:
                raise ContactNotFound(contact_id)
            if row[0] is not None:
                raise InvalidTransition(contact_id, "identify", f"merged into {row[0]}")
            match = await self._match(conn, contact_id, given)
            now = _now()
            identified = ContactIdentified(
                contact_id, now, client_id, username, email, phone, registered=match is None
            )
            await self.store.append(
                contact_stream(contact_id), [self._event(identified)], connection=conn
            )
            if match is None:
                await conn.execute(
                    "UPDATE contacts SET registered = true,"
                    " client_id = COALESCE(%s, client_id), username = COALESCE(%s, username),"
                    " email = COALESCE(%s, email), phone = COALESCE(%s, phone)"
                    " WHERE contact_id = %s",
                    (client_id, username, email, phone, contact_id),
                )
                return contact_id
            for _ in range(_MERGE_CHAIN_LIMIT):
                try:
                    await self._merge(conn, contact_id, match, now)
                    break
                except InvalidTransition:
                    # The match was merged into another contact after it was read (this
                    # contact's row is locked, so it is not this one): join where it went.
                    row = await self._one(
                        conn, "SELECT merged_into FROM contacts WHERE contact_id = %s", (match,)
                    )
                    if row is None or row[0] is None or row[0] == contact_id:
                        raise _Retry from None
                    match = row[0]
            else:
                raise _Retry
            # What the contact told about itself stays known to the contact it joined, where
            # that one has nothing of its own and no other matchable contact has it.
            for field, value in given.items():
                if value is not None:
                    await conn.execute(_FILL_IDENTIFIER[field], (value, match, value))
            return match

        return await self._retrying("identify", attempt)

    async def _match(
        self,
        conn: psycopg.AsyncConnection[Any],
        contact_id: uuid.UUID,
        given: dict[str, str | None],
    ) -> uuid.UUID | None:
        for field, query in _MATCH_PROBES:
            value = given[field]
            if value is None:
                continue
            row = await self._one(conn, query, (value, contact_id))
            if row is not None:
                return uuid.UUID(str(row[0]))
        return None

    async def merge_contacts(self, from_contact: uuid.UUID, into_contact: uuid.UUID) -> uuid.UUID:
        """Move every conversation and key of ``from_contact`` to ``into_contact``."""
        if from_contact == into_contact:
            raise InvalidCommand("cannot merge a contact into itself", field="from_contact_id")

        async def attempt(conn: psycopg.AsyncConnection[Any]) -> uuid.UUID:
            await self._merge(conn, from_contact, into_contact, _now())
            return into_contact

        return await self._retrying("merge_contacts", attempt)

    async def _merge(
        self,
        conn: psycopg.AsyncConnection[Any],
        from_contact: uuid.UUID,
        into_contact: uuid.UUID,
        now: dt.datetime,
    ) -> None:
        # Lock both rows in one order so two opposite merges cannot deadlock.
        cur = await conn.execute(
            "SELECT contact_id, merged_into FROM contacts WHERE contact_id = ANY(%s)"
            " ORDER BY contact_id FOR UPDATE",
            ([from_contact, into_contact],),
        )
        rows = {r[0]: r[1] for r in await cur.fetchall()}
        for cid in (from_contact, into_contact):
            if cid not in rows:
                raise ContactNotFound(cid)
            if rows[cid] is not None:
                raise InvalidTransition(cid, "merge", f"already merged into {rows[cid]}")
        # Keys first: a concurrent first message holds its key FOR SHARE, so this waits for it
        # and the conversation it opened is moved by the next statement.
        await conn.execute(
            "UPDATE contact_keys SET contact_id = %s WHERE contact_id = %s",
            (into_contact, from_contact),
        )
        cur = await conn.execute(
            "UPDATE conversations SET contact_id = %s WHERE contact_id = %s"
            " RETURNING conversation_id",
            (into_contact, from_contact),
        )
        moved = tuple(sorted(r[0] for r in await cur.fetchall()))
        await conn.execute(
            "UPDATE contacts SET merged_into = %s WHERE contact_id = %s",
            (into_contact, from_contact),
        )
        merged = ContactsMerged(from_contact, into_contact, now, moved)
        await self.store.append(
            contact_stream(into_contact), [self._event(merged)], connection=conn
        )


class _Conflict(Exception):
    """Internal: the caller's If-Match version is stale (not retried)."""

    def __init__(self, stream_id: str, expected: int, actual: int) -> None:
        super().__init__(stream_id)
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual


def _reopens(
    policy: str | None,
    window: dt.timedelta | None,
    closed_at: dt.datetime | None,
    sent_at: dt.datetime,
) -> bool:
    if policy == "reopen-last":
        return True
    if policy == "reopen-within" and window is not None and closed_at is not None:
        return sent_at - closed_at <= window
    return False


def _identifier_locks(given: dict[str, str | None]) -> list[int]:
    """Advisory lock keys for an identification's identifiers, in one order for everyone.

    Usernames and emails are matched case-insensitively, so their keys are too.
    """
    keys = set()
    for field, value in given.items():
        if value is None:
            continue
        folded = value.lower() if field in ("username", "email") else value
        digest = hashlib.sha256(f"convstore identify\x1f{field}\x1f{folded}".encode()).digest()
        keys.add(int.from_bytes(digest[:8], "big", signed=True))
    return sorted(keys)


def _check_key(psid: str) -> None:
    if not isinstance(psid, str) or not psid or len(psid) > MAX_ID or not is_storable_text(psid):
        raise InvalidCommand(
            f"customer id must be 1-{MAX_ID} characters of valid Unicode, without NUL",
            field="psid",
        )


def _check_actor(by: str) -> None:
    if not isinstance(by, str) or not by or len(by) > 200 or not is_storable_text(by):
        raise InvalidCommand(
            "the acting agent must be named in 1-200 characters of valid Unicode, without NUL",
            field="by",
        )


def _check_optional(field: str, value: str | None, limit: int = 320) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not value.strip() or len(value) > limit:
        raise InvalidCommand(f"{field} must be 1-{limit} characters", field=field)
    if not is_storable_text(value):
        raise InvalidCommand(f"{field} must be valid Unicode without NUL", field=field)


def _check_time(when: dt.datetime, field: str) -> None:
    """A time PostgreSQL stores and Python reads back: timezone-aware, years 1-9999 in UTC.

    PostgreSQL stores later times than Python's datetime can hold; one stored would make every
    later read of its row fail.
    """
    if not isinstance(when, dt.datetime) or when.tzinfo is None:
        raise InvalidCommand(f"{field}: give a timezone-aware time", field=field)
    try:
        when.astimezone(dt.UTC)
    except OverflowError as exc:
        raise InvalidCommand(
            f"{field}: the time must be within the years 1-9999 in UTC", field=field
        ) from exc


def _check_message(message: InboundMessage) -> None:
    pid = message.provider_message_id
    if not isinstance(pid, str) or not pid or len(pid) > MAX_ID or not is_storable_text(pid):
        raise InvalidCommand(
            f"provider message id must be 1-{MAX_ID} characters of valid Unicode, without NUL",
            field="provider_message_id",
        )
    _check_time(message.sent_at, "sent_at")
    if message.id_time is not None:
        _check_time(message.id_time, "id_time")
    text = message.text
    if text is not None and len(text) > MAX_TEXT:
        raise InvalidCommand(f"text must be at most {MAX_TEXT} characters", field="text")
    if text is not None and not is_storable_text(text):
        # PostgreSQL's jsonb cannot hold U+0000; refuse it clearly rather than fail inside.
        raise InvalidCommand("text must be valid Unicode without NUL (U+0000)", field="text")
    if (text is None or not text.strip()) and not message.attachments:
        raise InvalidCommand("a message needs text or attachments", field="text")
