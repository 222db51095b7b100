"""The inbox read model: conversations, their messages, counts per status, contact merges.

One projection owns all four tables so they are always consistent with each other (a row's
``message_count`` is the length of its message list at every checkpoint) and are rebuilt
together.

Applying a batch
----------------
Events are folded in memory, then written with a handful of set-based statements, never one
statement per event (the catch-up goal is tens of thousands of events a second):

1. load the rows the batch touches: its conversations, the messages its reads and edits name,
   and the merges of the contacts it opens conversations for;
2. fold every event in log order over those rows;
3. write: new messages (one ``INSERT ... SELECT FROM unnest``), edits of older messages, the
   touched conversations (one upsert), merges, count deltas, in the caller's transaction.

The result depends only on the events, never on how they were cut into batches or on the
clock, so a rebuild equals the live model row for row.

Meaning of the columns
----------------------
- ``status`` is the status the events left (``open``, ``snoozed``, ``closed``); a snooze whose
  ``snoozed_until`` has passed counts as open, which queries decide with their clock (the
  stored row must not depend on when it was projected).
- ``last_activity_at`` orders the inbox: the last message's time (the provider's), else the
  opening time.
- ``unread_count`` counts customer messages after the message the last ``MessagesRead`` named;
  ``messages.inbound_number`` (customer messages so far, at each message) makes that a
  subtraction.
- ``contact_id`` is the surviving contact: a merge moves every conversation of the merged
  contact, and ``contact_merges`` redirects later events that still name it.
- ``messages.delivery_status`` is where an outbound message stands: an agent reply is
  ``queued``, ``sending`` (an attempt is in flight), ``retrying`` (the last attempt failed and
  another is due), ``delivered`` or ``failed``; an echo (sent outside convstore) is
  ``delivered``; customer messages have none. Delivered is final: a late failure (a paused
  daemon's) does not undo it, and an echo confirming a failed reply makes it delivered.
  ``conversations.failed_replies`` counts the replies that are failed now, the inbox's failed
  marker; ``last_message_status`` is the last message's delivery status.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Final

import msgspec
import psycopg
from psycopg import postgres, sql
from psycopg.adapt import Dumper
from psycopg.pq import Format

from conversations.events import (
    CODEC,
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
    ReplyAttempted,
    ReplyAttemptFailed,
    ReplyConfirmed,
    ReplyDelivered,
    ReplyFailed,
)
from eventstore import EventCodec, RecordedEvent

from .base import EventFailed, Projection, UndecodableEvent

__all__ = ["PREVIEW_LENGTH", "InboxProjection"]

#: Characters of a message kept as the inbox preview.
PREVIEW_LENGTH: Final = 200

_JSON = msgspec.json.Encoder()

# (column, SQL type) of each table, in the order rows are built; the DDL, the loads and the
# writes are all derived from these lists so they cannot drift apart.
_CONVERSATION_COLUMNS: Final = (
    ("conversation_id", "uuid"),
    ("connection", "text"),
    ("channel", "text"),
    ("psid", "text"),
    ("contact_id", "uuid"),
    ("status", "text"),
    ("opened_at", "timestamptz"),
    ("closed_at", "timestamptz"),
    ("snoozed_until", "timestamptz"),
    ("deleted_at", "timestamptz"),
    ("last_message_at", "timestamptz"),
    ("last_message_id", "uuid"),
    ("last_message_preview", "text"),
    ("last_message_direction", "text"),
    ("last_activity_at", "timestamptz"),
    ("message_count", "integer"),
    ("inbound_count", "integer"),
    ("unread_count", "integer"),
    ("last_message_status", "text"),
    ("failed_replies", "integer"),
)

_MESSAGE_COLUMNS: Final = (
    ("conversation_id", "uuid"),
    ("stream_version", "bigint"),
    ("message_id", "uuid"),
    ("direction", "text"),
    ("inbound_number", "integer"),
    ("text", "text"),
    ("attachments", "jsonb"),
    ("sent_at", "timestamptz"),
    ("author", "text"),
    ("provider_message_id", "text"),
    ("edited_at", "timestamptz"),
    ("delivery_status", "text"),
    ("delivery_attempts", "integer"),
    ("delivery_error", "text"),
    ("delivered_at", "timestamptz"),
)

_TABLE_DDL: Final = (
    """
    CREATE TABLE {schema}.conversations (
        conversation_id         uuid        PRIMARY KEY,
        connection              text        NOT NULL,
        channel                 text        NOT NULL,
        psid                    text        NOT NULL,
        contact_id              uuid        NOT NULL,
        status                  text        NOT NULL
                                            CHECK (status IN ('open', 'snoozed', 'closed')),
        opened_at               timestamptz NOT NULL,
        closed_at               timestamptz,
        snoozed_until           timestamptz,
        deleted_at              timestamptz,
        last_message_at         timestamptz,
        last_message_id         uuid,
        last_message_preview    text,
        last_message_direction  text        CHECK (last_message_direction IN ('in', 'out')),
        last_activity_at        timestamptz NOT NULL,
        message_count           integer     NOT NULL CHECK (message_count >= 0),
        inbound_count           integer     NOT NULL CHECK (inbound_count >= 0),
        unread_count            integer     NOT NULL CHECK (unread_count >= 0),
        last_message_status     text,
        failed_replies          integer     NOT NULL DEFAULT 0 CHECK (failed_replies >= 0)
    )
    """,
    """
    CREATE TABLE {schema}.messages (
        conversation_id     uuid        NOT NULL,
        stream_version      bigint      NOT NULL,
        message_id          uuid        NOT NULL,
        direction           text        NOT NULL CHECK (direction IN ('in', 'out')),
        inbound_number      integer     NOT NULL,
        text                text,
        attachments         jsonb,
        sent_at             timestamptz NOT NULL,
        author              text,
        provider_message_id text,
        edited_at           timestamptz,
        delivery_status     text        CHECK (delivery_status IN
                                        ('queued', 'sending', 'retrying', 'delivered', 'failed')),
        delivery_attempts   integer     NOT NULL DEFAULT 0,
        delivery_error      text,
        delivered_at        timestamptz,
        PRIMARY KEY (conversation_id, stream_version)
    )
    """,
    "CREATE UNIQUE INDEX messages_message_id_key ON {schema}.messages (message_id)",
    # A contact's conversations, newest activity first; also what a merge moves, so it is
    # built with the table (a rebuild applies merges too) and covers deleted rows.
    """
    CREATE INDEX conversations_contact_idx ON {schema}.conversations
        (contact_id, last_activity_at DESC, conversation_id DESC)
    """,
    """
    CREATE TABLE {schema}.counts (
        connection      text    NOT NULL,
        status          text    NOT NULL,
        -- No CHECK (>= 0): PostgreSQL checks the row an upsert proposes before it finds the
        -- conflict, so a negative delta could never be added to an existing row.
        conversations   bigint  NOT NULL,
        PRIMARY KEY (connection, status)
    )
    """,
    """
    CREATE TABLE {schema}.contact_merges (
        from_contact_id uuid        PRIMARY KEY,
        into_contact_id uuid        NOT NULL,
        merged_at       timestamptz NOT NULL
    )
    """,
    "CREATE INDEX contact_merges_into_idx ON {schema}.contact_merges (into_contact_id)",
    # The planner picks an ordered index range for a page only if it knows the conversation
    # (or contact) has many rows; otherwise it may fetch them all and sort. Ten times the
    # default statistics keeps the long conversations and busy contacts among the values
    # whose frequency ANALYZE records.
    "ALTER TABLE {schema}.messages ALTER COLUMN conversation_id SET STATISTICS 1000",
    "ALTER TABLE {schema}.conversations ALTER COLUMN contact_id SET STATISTICS 1000",
)

_INDEX_DDL: Final = (
    # The inbox: per connection and status, newest activity first, hidden when deleted. The
    # cursor (last_activity_at, conversation_id) is a row comparison on the same columns, so a
    # page is one index range scan with no sort. A snooze that has run out counts as open:
    # ``snoozed_until`` is the last key column so that the open page's second range (snoozed,
    # run out) checks it inside the index, in order, instead of collecting the run-out
    # snoozes and sorting them (measured: 0.1 ms against 20 ms at 1M conversations).
    """
    CREATE INDEX conversations_inbox_idx ON {schema}.conversations
        (connection, status, last_activity_at DESC, conversation_id DESC, snoozed_until)
        WHERE deleted_at IS NULL
    """,
)

_HANDLED: Final = frozenset(
    {
        "ConversationOpened",
        "MessageReceived",
        "MessageSent",
        "MessageEdited",
        "ConversationClosed",
        "ConversationReopened",
        "ConversationSnoozed",
        "ConversationUnsnoozed",
        "ConversationDeleted",
        "ConversationRestored",
        "MessagesRead",
        "ContactsMerged",
        "ReplyAttempted",
        "ReplyDelivered",
        "ReplyAttemptFailed",
        "ReplyFailed",
        "ReplyConfirmed",
    }
)
_DELIVERY_EVENTS: Final = (
    ReplyAttempted,
    ReplyDelivered,
    ReplyAttemptFailed,
    ReplyFailed,
    ReplyConfirmed,
)


class _Conversation:
    """One inbox row being folded; ``counted`` is its (connection, status) in ``counts``."""

    __slots__ = (
        "channel",
        "closed_at",
        "connection",
        "contact_id",
        "conversation_id",
        "counted",
        "deleted_at",
        "failed_replies",
        "inbound_count",
        "last_activity_at",
        "last_message_at",
        "last_message_direction",
        "last_message_id",
        "last_message_preview",
        "last_message_status",
        "message_count",
        "opened_at",
        "psid",
        "snoozed_until",
        "status",
        "unread_count",
    )

    conversation_id: uuid.UUID
    connection: str
    channel: str
    psid: str
    contact_id: uuid.UUID
    status: str
    opened_at: dt.datetime
    closed_at: dt.datetime | None
    snoozed_until: dt.datetime | None
    deleted_at: dt.datetime | None
    last_message_at: dt.datetime | None
    last_message_id: uuid.UUID | None
    last_message_preview: str | None
    last_message_direction: str | None
    last_activity_at: dt.datetime
    message_count: int
    inbound_count: int
    unread_count: int
    last_message_status: str | None
    failed_replies: int
    counted: tuple[str, str] | None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> _Conversation:
        self = cls.__new__(cls)
        for (name, _), value in zip(_CONVERSATION_COLUMNS, row, strict=True):
            setattr(self, name, value)
        self.counted = self.count_key()
        return self

    @classmethod
    def opened(cls, event: ConversationOpened, contact_id: uuid.UUID) -> _Conversation:
        self = cls.__new__(cls)
        self.conversation_id = event.conversation_id
        self.connection = event.connection
        self.channel = event.channel
        self.psid = event.psid
        self.contact_id = contact_id
        self.status = "open"
        self.opened_at = event.opened_at
        self.closed_at = self.snoozed_until = self.deleted_at = None
        self.last_message_at = self.last_message_id = None
        self.last_message_preview = self.last_message_direction = None
        self.last_activity_at = event.opened_at
        self.message_count = self.inbound_count = self.unread_count = 0
        self.last_message_status = None
        self.failed_replies = 0
        self.counted = None
        return self

    def count_key(self) -> tuple[str, str] | None:
        """Where this row counts in ``counts``: nowhere once deleted."""
        return None if self.deleted_at is not None else (self.connection, self.status)

    def row(self) -> tuple[Any, ...]:
        return (
            self.conversation_id,
            self.connection,
            self.channel,
            self.psid,
            self.contact_id,
            self.status,
            self.opened_at,
            self.closed_at,
            self.snoozed_until,
            self.deleted_at,
            self.last_message_at,
            self.last_message_id,
            self.last_message_preview,
            self.last_message_direction,
            self.last_activity_at,
            self.message_count,
            self.inbound_count,
            self.unread_count,
            self.last_message_status,
            self.failed_replies,
        )


class _Delivery:
    """Where an outbound message stands (the ``delivery_*`` columns and its provider id)."""

    __slots__ = ("attempts", "delivered_at", "error", "provider_message_id", "status")

    def __init__(
        self,
        status: str | None,
        attempts: int = 0,
        error: str | None = None,
        delivered_at: dt.datetime | None = None,
        provider_message_id: str | None = None,
    ) -> None:
        self.status = status
        self.attempts = attempts
        self.error = error
        self.delivered_at = delivered_at
        self.provider_message_id = provider_message_id

    @classmethod
    def of(cls, data: MessageReceived | MessageSent) -> _Delivery:
        if isinstance(data, MessageReceived):
            return cls(None, provider_message_id=data.provider_message_id)
        if data.source == "agent":
            return cls("queued", provider_message_id=data.provider_message_id)
        return cls(
            "delivered", delivered_at=data.sent_at, provider_message_id=data.provider_message_id
        )

    def apply(self, data: Any) -> None:
        """One delivery event; delivered is final (see the module docstring)."""
        kind = type(data)
        if self.status is None:
            return  # not a reply (the fold checks the owner; an echo id is never reused)
        if kind is ReplyDelivered or kind is ReplyConfirmed:
            if self.status != "delivered":
                self.status = "delivered"
                self.error = None
                self.delivered_at = (
                    data.delivered_at if kind is ReplyDelivered else data.confirmed_at
                )
            if self.provider_message_id is None:
                self.provider_message_id = data.provider_message_id
            if kind is ReplyDelivered:
                self.attempts = max(self.attempts, data.attempt)
        elif self.status == "delivered":
            return
        elif kind is ReplyFailed:
            self.status, self.error = "failed", data.error
            self.attempts = max(self.attempts, data.attempt)
        elif self.status == "failed":
            return
        elif kind is ReplyAttempted:
            self.status = "sending"
            self.attempts = max(self.attempts, data.attempt)
        elif kind is ReplyAttemptFailed:
            self.status, self.error = "retrying", data.error
            self.attempts = max(self.attempts, data.attempt)

    def row(self) -> tuple[Any, ...]:
        return (self.status, self.attempts, self.error, self.delivered_at, self.provider_message_id)


class _Message:
    """A message row inserted by this batch (edits and reads may still change or name it)."""

    __slots__ = (
        "attachment_types",
        "attachments",
        "delivery",
        "edited_at",
        "event",
        "inbound_number",
        "text",
    )

    def __init__(self, event: RecordedEvent, inbound_number: int) -> None:
        data: MessageReceived | MessageSent = event.data
        self.event = event
        self.inbound_number = inbound_number
        self.text = data.text
        self.attachment_types = tuple(a.type for a in data.attachments)
        self.attachments = _RawJsonb(_JSON.encode(data.attachments)) if data.attachments else None
        self.edited_at: dt.datetime | None = None
        self.delivery = _Delivery.of(data)


class _Stored(msgspec.Struct, frozen=True):
    """What a read, an edit or a delivery event needs of a message stored by an earlier batch."""

    conversation_id: uuid.UUID
    inbound_number: int
    attachment_types: tuple[str, ...]
    delivery: _Delivery


class _AttachmentType(msgspec.Struct):
    type: str


_ATTACHMENT_TYPES = msgspec.json.Decoder(list[_AttachmentType])


def preview_of(text: str | None, attachment_types: Sequence[str]) -> str:
    """The inbox preview: the text with whitespace collapsed, else the attachment types."""
    if text:
        return " ".join(text.split())[:PREVIEW_LENGTH]
    if attachment_types:
        return "[" + ", ".join(attachment_types) + "]"
    return ""


def _columns(spec: Iterable[tuple[str, str]]) -> sql.Composed:
    return sql.SQL(", ").join(sql.Identifier(name) for name, _ in spec)


def _unnest(spec: Iterable[tuple[str, str]]) -> sql.Composed:
    """``unnest(%b::t1[], %b::t2[], ...)``: one array parameter per column, sent in binary
    (psycopg dumps a list three times faster in binary than as array text)."""
    return sql.SQL("unnest({})").format(
        sql.SQL(", ").join(sql.SQL("%b::{}[]").format(sql.SQL(typ)) for _, typ in spec)
    )


class _Statements:
    """The statements of one schema, composed once and reused for every batch."""

    def __init__(self, schema: str) -> None:
        conversations = sql.Identifier(schema, "conversations")
        messages = sql.Identifier(schema, "messages")
        counts = sql.Identifier(schema, "counts")
        merges = sql.Identifier(schema, "contact_merges")
        self.load_conversations = sql.SQL(
            "SELECT {cols} FROM {t} WHERE conversation_id = ANY(%b::uuid[])"
        ).format(cols=_columns(_CONVERSATION_COLUMNS), t=conversations)
        self.load_messages = sql.SQL(
            "SELECT message_id, conversation_id, inbound_number, attachments, delivery_status,"
            " delivery_attempts, delivery_error, delivered_at, provider_message_id FROM {t}"
            " WHERE message_id = ANY(%b::uuid[])"
        ).format(t=messages)
        self.deliver_messages = sql.SQL(
            "UPDATE {t} AS m SET delivery_status = u.status, delivery_attempts = u.attempts,"
            " delivery_error = u.error, delivered_at = u.delivered_at,"
            " provider_message_id = u.provider_message_id"
            " FROM unnest(%b::uuid[], %b::text[], %b::integer[], %b::text[], %b::timestamptz[],"
            " %b::text[]) AS u(message_id, status, attempts, error, delivered_at,"
            " provider_message_id) WHERE m.message_id = u.message_id"
        ).format(t=messages)
        self.load_merges = sql.SQL(
            "SELECT from_contact_id, into_contact_id FROM {t}"
            " WHERE from_contact_id = ANY(%b::uuid[])"
        ).format(t=merges)
        updates = sql.SQL(", ").join(
            sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(name))
            for name, _ in _CONVERSATION_COLUMNS[1:]
        )
        self.upsert_conversations = sql.SQL(
            "INSERT INTO {t} ({cols}) SELECT * FROM {src}"
            " ON CONFLICT (conversation_id) DO UPDATE SET {updates}"
        ).format(
            t=conversations,
            cols=_columns(_CONVERSATION_COLUMNS),
            src=_unnest(_CONVERSATION_COLUMNS),
            updates=updates,
        )
        self.copy_messages = sql.SQL("COPY {t} ({cols}) FROM STDIN (FORMAT BINARY)").format(
            t=messages, cols=_columns(_MESSAGE_COLUMNS)
        )
        self.edit_messages = sql.SQL(
            "UPDATE {t} AS m SET text = u.text, edited_at = u.edited_at"
            " FROM unnest(%b::uuid[], %b::text[], %b::timestamptz[]) AS u(message_id, text,"
            " edited_at) WHERE m.message_id = u.message_id"
        ).format(t=messages)
        self.add_counts = sql.SQL(
            "INSERT INTO {t} AS c (connection, status, conversations)"
            " SELECT * FROM unnest(%b::text[], %b::text[], %b::bigint[])"
            " ON CONFLICT (connection, status)"
            " DO UPDATE SET conversations = c.conversations + EXCLUDED.conversations"
        ).format(t=counts)
        # Zero rows are dropped so the table's rows do not depend on batch boundaries.
        self.drop_zero_counts = sql.SQL(
            "DELETE FROM {t} WHERE conversations = 0"
            " AND (connection, status) IN (SELECT * FROM unnest(%b::text[], %b::text[]))"
        ).format(t=counts)
        self.insert_merge = sql.SQL(
            "INSERT INTO {t} (from_contact_id, into_contact_id, merged_at) VALUES (%s, %s, %s)"
            " ON CONFLICT (from_contact_id) DO UPDATE"
            " SET into_contact_id = EXCLUDED.into_contact_id, merged_at = EXCLUDED.merged_at"
        ).format(t=merges)
        # Earlier merges into the merged contact now lead to the survivor (one hop to resolve).
        self.forward_merges = sql.SQL(
            "UPDATE {t} SET into_contact_id = %s WHERE into_contact_id = %s"
        ).format(t=merges)
        self.move_conversations = sql.SQL(
            "UPDATE {t} SET contact_id = %s"
            " WHERE (contact_id = %s OR conversation_id = ANY(%b::uuid[])) AND contact_id <> %s"
        ).format(t=conversations)


class _Batch:
    """The fold of one batch: rows loaded, rows changed, and the writes they need."""

    def __init__(
        self,
        conversations: dict[uuid.UUID, _Conversation],
        known_messages: dict[uuid.UUID, _Stored],
        merges: dict[uuid.UUID, uuid.UUID],
    ) -> None:
        self.conversations = conversations
        self.known_messages = known_messages
        self.merges = merges  # merged contact -> surviving contact
        self.new_messages: dict[uuid.UUID, _Message] = {}
        self.edits: dict[uuid.UUID, tuple[str | None, dt.datetime]] = {}
        self.deliveries: set[uuid.UUID] = set()  # known messages whose delivery changed
        self.merge_log: list[ContactsMerged] = []

    def conversation(self, event: RecordedEvent, conversation_id: uuid.UUID) -> _Conversation:
        conv = self.conversations.get(conversation_id)
        if conv is None:
            raise EventFailed(event, f"conversation {conversation_id} was never opened")
        return conv

    def survivor(self, contact_id: uuid.UUID) -> uuid.UUID:
        return self.merges.get(contact_id, contact_id)

    # ---------------------------------------------------------------- the fold

    def fold(self, event: RecordedEvent) -> None:
        data = event.data
        kind = type(data)
        if kind is MessageReceived or kind is MessageSent:
            self.message(event, data)
        elif kind is ConversationOpened:
            if data.conversation_id in self.conversations:
                raise EventFailed(event, f"conversation {data.conversation_id} opened twice")
            self.conversations[data.conversation_id] = _Conversation.opened(
                data, self.survivor(data.contact_id)
            )
        elif kind is MessagesRead:
            self.read(event, data)
        elif kind is MessageEdited:
            self.edit(event, data)
        elif kind is ConversationClosed:
            conv = self.conversation(event, data.conversation_id)
            conv.status, conv.closed_at, conv.snoozed_until = "closed", data.closed_at, None
        elif kind is ConversationReopened:
            conv = self.conversation(event, data.conversation_id)
            conv.status, conv.closed_at, conv.snoozed_until = "open", None, None
        elif kind is ConversationSnoozed:
            conv = self.conversation(event, data.conversation_id)
            conv.status, conv.snoozed_until = "snoozed", data.until
        elif kind is ConversationUnsnoozed:
            conv = self.conversation(event, data.conversation_id)
            conv.status, conv.snoozed_until = "open", None
        elif kind is ConversationDeleted:
            self.conversation(event, data.conversation_id).deleted_at = data.deleted_at
        elif kind is ConversationRestored:
            self.conversation(event, data.conversation_id).deleted_at = None
        elif kind is ContactsMerged:
            self.merge(data)
        elif kind in _DELIVERY_EVENTS:
            self.deliver(event, data)
        elif kind is UndecodableEvent:
            raise EventFailed(event, f"cannot decode the event's data: {data.error}")
        else:
            raise EventFailed(event, f"unexpected payload {kind.__name__} for {event.type}")

    def message(self, event: RecordedEvent, data: MessageReceived | MessageSent) -> None:
        conv = self.conversation(event, data.conversation_id)
        if data.message_id in self.new_messages or data.message_id in self.known_messages:
            raise EventFailed(event, f"message {data.message_id} is stored twice")
        inbound = type(data) is MessageReceived
        conv.message_count += 1
        if inbound:
            conv.inbound_count += 1
            conv.unread_count += 1
        message = self.new_messages[data.message_id] = _Message(event, conv.inbound_count)
        preview = preview_of(data.text, message.attachment_types)
        conv.last_message_at = conv.last_activity_at = data.sent_at
        conv.last_message_id = data.message_id
        conv.last_message_preview = preview
        conv.last_message_direction = "in" if inbound else "out"
        conv.last_message_status = message.delivery.status

    def deliver(self, event: RecordedEvent, data: Any) -> None:
        conv = self.conversation(event, data.conversation_id)
        new = self.new_messages.get(data.message_id)
        if new is not None:
            owner, delivery = new.event.data.conversation_id, new.delivery
        else:
            known = self.known_messages.get(data.message_id)
            if known is None:
                raise EventFailed(event, f"delivery of unknown message {data.message_id}")
            owner, delivery = known.conversation_id, known.delivery
            self.deliveries.add(data.message_id)
        if owner != conv.conversation_id:
            raise EventFailed(event, f"message {data.message_id} belongs to conversation {owner}")
        was = delivery.status
        delivery.apply(data)
        if was != "failed" and delivery.status == "failed":
            conv.failed_replies += 1
        elif was == "failed" and delivery.status != "failed":
            conv.failed_replies -= 1
        if conv.last_message_id == data.message_id:
            conv.last_message_status = delivery.status

    def read(self, event: RecordedEvent, data: MessagesRead) -> None:
        conv = self.conversation(event, data.conversation_id)
        new = self.new_messages.get(data.up_to_message_id)
        if new is not None:
            owner, number = new.event.data.conversation_id, new.inbound_number
        else:
            known = self.known_messages.get(data.up_to_message_id)
            if known is None:
                raise EventFailed(event, f"message {data.up_to_message_id} is unknown")
            owner, number = known.conversation_id, known.inbound_number
        if owner != conv.conversation_id:
            raise EventFailed(
                event, f"message {data.up_to_message_id} belongs to conversation {owner}"
            )
        conv.unread_count = max(conv.inbound_count - number, 0)

    def edit(self, event: RecordedEvent, data: MessageEdited) -> None:
        conv = self.conversation(event, data.conversation_id)
        new = self.new_messages.get(data.message_id)
        if new is not None:
            owner = new.event.data.conversation_id
            new.text, new.edited_at = data.text, data.edited_at
            types = new.attachment_types
        else:
            known = self.known_messages.get(data.message_id)
            if known is None:
                raise EventFailed(event, f"edit of unknown message {data.message_id}")
            owner, types = known.conversation_id, known.attachment_types
            self.edits[data.message_id] = (data.text, data.edited_at)
        if owner != conv.conversation_id:
            raise EventFailed(event, f"message {data.message_id} belongs to conversation {owner}")
        if conv.last_message_id == data.message_id:
            conv.last_message_preview = preview_of(data.text, types)

    def merge(self, data: ContactsMerged) -> None:
        into = self.survivor(data.into_contact_id)
        source = data.from_contact_id
        if into == source:
            return
        for merged, survivor in list(self.merges.items()):
            if survivor == source:
                self.merges[merged] = into
        self.merges[source] = into
        moved = set(data.conversation_ids)
        for conv in self.conversations.values():
            if conv.contact_id == source or conv.conversation_id in moved:
                conv.contact_id = into
        self.merge_log.append(msgspec.structs.replace(data, into_contact_id=into))


class InboxProjection(Projection):
    """Inbox rows, message lists, counts per status and contact merges (see the module)."""

    name: ClassVar[str] = "inbox"
    #: 2: delivery status of outbound messages, failed replies per conversation
    version: ClassVar[int] = 2
    handles: ClassVar[frozenset[str]] = _HANDLED
    tables: ClassVar[tuple[str, ...]] = ("conversations", "messages", "counts", "contact_merges")
    codec: ClassVar[EventCodec] = CODEC

    def __init__(self) -> None:
        self._statements: dict[str, _Statements] = {}

    def table_ddl(self, schema: str) -> Sequence[sql.Composed]:
        """The four tables, with their primary keys and the message id key."""
        return [sql.SQL(text).format(schema=sql.Identifier(schema)) for text in _TABLE_DDL]

    def index_ddl(self, schema: str) -> Sequence[sql.Composed]:
        """The inbox, contact and snooze indexes the queries use."""
        return [sql.SQL(text).format(schema=sql.Identifier(schema)) for text in _INDEX_DDL]

    def _for(self, schema: str) -> _Statements:
        statements = self._statements.get(schema)
        if statements is None:
            statements = self._statements[schema] = _Statements(schema)
        return statements

    async def apply(
        self,
        conn: psycopg.AsyncConnection[Any],
        schema: str,
        events: Sequence[RecordedEvent],
    ) -> None:
        """Fold the batch in memory, then write it with set-based statements."""
        st = self._for(schema)
        batch = await self._load(conn, st, events)
        for event in events:
            batch.fold(event)
        await self._write(conn, st, batch)

    async def _load(
        self, conn: psycopg.AsyncConnection[Any], st: _Statements, events: Sequence[RecordedEvent]
    ) -> _Batch:
        conversation_ids: set[uuid.UUID] = set()
        named_messages: set[uuid.UUID] = set()
        new_messages: set[uuid.UUID] = set()
        contacts: set[uuid.UUID] = set()
        for event in events:
            data = event.data
            kind = type(data)
            if kind is MessageReceived or kind is MessageSent:
                conversation_ids.add(data.conversation_id)
                new_messages.add(data.message_id)
            elif kind in _DELIVERY_EVENTS:
                conversation_ids.add(data.conversation_id)
                named_messages.add(data.message_id)
            elif kind is ContactsMerged:
                contacts.add(data.into_contact_id)
                contacts.add(data.from_contact_id)
                conversation_ids.update(data.conversation_ids)
            elif kind is UndecodableEvent:
                continue
            else:
                conversation_ids.add(data.conversation_id)
                if kind is ConversationOpened:
                    contacts.add(data.contact_id)
                elif kind is MessagesRead:
                    named_messages.add(data.up_to_message_id)
                elif kind is MessageEdited:
                    named_messages.add(data.message_id)
        cur = await conn.execute(st.load_conversations, (list(conversation_ids),))
        conversations = {row[0]: _Conversation.from_row(row) for row in await cur.fetchall()}
        known: dict[uuid.UUID, _Stored] = {}
        lookup = named_messages - new_messages
        if lookup:
            cur = await conn.execute(st.load_messages, (list(lookup),))
            for message_id, conversation_id, number, attachments, *delivery in await cur.fetchall():
                types = tuple(a.type for a in _ATTACHMENT_TYPES.decode(attachments or b"[]"))
                known[message_id] = _Stored(conversation_id, number, types, _Delivery(*delivery))
        merges: dict[uuid.UUID, uuid.UUID] = {}
        if contacts:
            cur = await conn.execute(st.load_merges, (list(contacts),))
            merges = {row[0]: row[1] for row in await cur.fetchall()}
        return _Batch(conversations, known, merges)

    async def _write(
        self, conn: psycopg.AsyncConnection[Any], st: _Statements, batch: _Batch
    ) -> None:
        if batch.new_messages:
            await _copy_messages(conn, st.copy_messages, batch.new_messages.values())
        if batch.edits:
            ids = list(batch.edits)
            await conn.execute(
                st.edit_messages,
                (ids, [batch.edits[i][0] for i in ids], [batch.edits[i][1] for i in ids]),
            )
        if batch.deliveries:
            ids = list(batch.deliveries)
            rows = [batch.known_messages[i].delivery.row() for i in ids]
            await conn.execute(
                st.deliver_messages, [ids, *(list(col) for col in zip(*rows, strict=True))]
            )
        if batch.conversations:
            rows = [conv.row() for conv in batch.conversations.values()]
            await conn.execute(
                st.upsert_conversations, [list(col) for col in zip(*rows, strict=True)]
            )
        for merge in batch.merge_log:
            await conn.execute(
                st.insert_merge, (merge.from_contact_id, merge.into_contact_id, merge.merged_at)
            )
            await conn.execute(st.forward_merges, (merge.into_contact_id, merge.from_contact_id))
            await conn.execute(
                st.move_conversations,
                (
                    merge.into_contact_id,
                    merge.from_contact_id,
                    list(merge.conversation_ids),
                    merge.into_contact_id,
                ),
            )
        deltas: dict[tuple[str, str], int] = {}
        for conv in batch.conversations.values():
            now = conv.count_key()
            if now != conv.counted:
                if conv.counted is not None:
                    deltas[conv.counted] = deltas.get(conv.counted, 0) - 1
                if now is not None:
                    deltas[now] = deltas.get(now, 0) + 1
        changed = [(key, n) for key, n in deltas.items() if n]
        if changed:
            connections = [key[0] for key, _ in changed]
            statuses = [key[1] for key, _ in changed]
            await conn.execute(st.add_counts, (connections, statuses, [n for _, n in changed]))
            await conn.execute(st.drop_zero_counts, (connections, statuses))


class _RawJsonb(bytes):
    """JSON text already encoded (by msgspec), to be sent as a jsonb value as it is."""


class _RawJsonbBinaryDumper(Dumper):
    """Binary jsonb is a version byte (1) and the JSON text: no re-encoding needed."""

    format = Format.BINARY
    oid = postgres.types["jsonb"].oid

    def dump(self, obj: Any) -> bytes:
        return b"\x01" + bytes(obj)


_MESSAGE_TYPES: Final = [typ for _, typ in _MESSAGE_COLUMNS]


async def _copy_messages(
    conn: psycopg.AsyncConnection[Any], statement: sql.Composed, messages: Iterable[_Message]
) -> None:
    """Insert a batch's messages with a binary COPY (several times faster than INSERT)."""
    async with conn.cursor() as cur:
        # Only this cursor's jsonb values come pre-encoded.
        cur.adapters.register_dumper(None, _RawJsonbBinaryDumper)
        async with cur.copy(statement) as copy:
            copy.set_types(_MESSAGE_TYPES)
            for message in messages:
                event = message.event
                data = event.data
                inbound = type(data) is MessageReceived
                await copy.write_row(
                    (
                        data.conversation_id,
                        event.stream_version,
                        data.message_id,
                        "in" if inbound else "out",
                        message.inbound_number,
                        message.text,
                        message.attachments,
                        data.sent_at,
                        None if inbound else data.author,
                        message.delivery.provider_message_id,
                        message.edited_at,
                        message.delivery.status,
                        message.delivery.attempts,
                        message.delivery.error,
                        message.delivery.delivered_at,
                    )
                )
