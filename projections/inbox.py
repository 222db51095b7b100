"""The inbox read model: conversations, their messages, counts per status, contact merges.

One projection owns all four tables so they are always consistent with each other (a row's
``message_count`` is the length of its message list at every checkpoint) and are rebuilt
together.

Applying a batch
----------------
Events are folded in memory, then written with a handful of set-based statements, never one
statement per event (the catch-up goal is tens of thousands of events a second):

1. take the rows the batch touches: its conversations, the messages its reads, edits and
   deliveries name (from the applier's memory of recent batches, else loaded), and the merges
   of the contacts it opens conversations for;
2. fold every event in log order over those rows;
3. write: new messages (one binary ``COPY``), edits and deliveries of older messages, the
   touched conversations (one upsert), merges, count deltas, in the caller's transaction.

Steps 1 and 2 (:meth:`InboxProjection.prepare`) may run for the next batch, on another
connection, while this batch's writes run: the applier's memory holds every row this batch
writes, and what the next batch loads from the tables is resolved through this batch's merges,
so it is the same before and after this batch commits (see :meth:`_Memory.remember`).

The result depends only on the events, never on how they were cut into batches or on the
clock, so a rebuild equals the live model row for row.

Meaning of the columns
----------------------
- ``status`` is the status the events left (``open``, ``snoozed``, ``closed``); a snooze whose
  ``snoozed_until`` has passed counts as open, which queries decide with their clock (the
  stored row must not depend on when it was projected).
- ``last_activity_at`` orders the inbox: the newest time of its messages (the provider's),
  else the opening time. It never moves back: a message delivered late is the last message
  (the preview), but leaves the order where it was, so a pager never meets a row twice.
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

import asyncio
import datetime as dt
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Final, cast

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
    CREATE INDEX {concurrently} IF NOT EXISTS conversations_inbox_idx ON {schema}.conversations
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

#: Events folded between two yields to the event loop (see :meth:`InboxProjection.prepare`).
_FOLD_SLICE: Final = 100


class _Conversation(msgspec.Struct, gc=False):
    """One inbox row being folded: the table's columns in order, then ``counted``, its
    (connection, status) in ``counts`` as stored."""

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
    counted: tuple[str, str] | None = None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> _Conversation:
        self = cls(*row)
        self.counted = self.count_key()
        return self

    @classmethod
    def opened(cls, event: ConversationOpened, contact_id: uuid.UUID) -> _Conversation:
        return cls(
            event.conversation_id,
            event.connection,
            event.channel,
            event.psid,
            contact_id,
            "open",
            event.opened_at,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            event.opened_at,
            0,
            0,
            0,
            None,
            0,
        )

    def count_key(self) -> tuple[str, str] | None:
        """Where this row counts in ``counts``: nowhere once deleted."""
        return None if self.deleted_at is not None else (self.connection, self.status)

    def row(self) -> tuple[Any, ...]:
        """The values of the table's columns (all but ``counted``)."""
        return msgspec.structs.astuple(self)[:-1]


class _Message(msgspec.Struct, gc=False):
    """One message row: the table's columns in order, then the attachments' types.

    Rows inserted by a batch, and rows of earlier batches that a read, an edit or a delivery
    names (loaded, or remembered from the batch that inserted them), are the same kind: the
    fold changes them in place.
    """

    conversation_id: uuid.UUID
    stream_version: int
    message_id: uuid.UUID
    direction: str
    inbound_number: int
    text: str | None
    #: the attachments as JSON, for a row this batch inserts (``None`` in a loaded row)
    attachments: _RawJsonb | None
    sent_at: dt.datetime
    author: str | None
    provider_message_id: str | None
    edited_at: dt.datetime | None
    delivery_status: str | None
    delivery_attempts: int
    delivery_error: str | None
    delivered_at: dt.datetime | None
    #: what the preview shows of a message without text
    attachment_types: tuple[str, ...]

    @classmethod
    def new(
        cls, event: RecordedEvent, data: MessageReceived | MessageSent, inbound_number: int
    ) -> _Message:
        """The row of a message event; an agent reply starts queued, an echo delivered."""
        inbound = type(data) is MessageReceived
        status: str | None = None
        delivered_at: dt.datetime | None = None
        if not inbound:
            if data.source == "agent":  # type: ignore[union-attr]
                status = "queued"
            else:
                status, delivered_at = "delivered", data.sent_at
        return cls(
            data.conversation_id,
            event.stream_version,
            data.message_id,
            "in" if inbound else "out",
            inbound_number,
            data.text,
            _RawJsonb(_JSON.encode(data.attachments)) if data.attachments else None,
            data.sent_at,
            None if inbound else data.author,  # type: ignore[union-attr]
            data.provider_message_id,
            None,
            status,
            0,
            None,
            delivered_at,
            tuple(a.type for a in data.attachments) if data.attachments else (),
        )

    @classmethod
    def stored(cls, row: Sequence[Any]) -> _Message:
        """A row loaded from the table (its attachments decoded to their types only)."""
        values = list(row)
        attachments = values[6]
        values[6] = None
        values.append(tuple(a.type for a in _STORED_ATTACHMENTS.decode(attachments or b"[]")))
        return cls(*values)

    def row(self) -> tuple[Any, ...]:
        """The values of the table's columns."""
        return msgspec.structs.astuple(self)[:-1]

    def deliver(self, data: Any) -> None:
        """One delivery event; delivered is final (see the module docstring)."""
        kind = type(data)
        status = self.delivery_status
        if status is None:
            return  # not a reply (the fold checks the owner; an echo id is never reused)
        if kind is ReplyDelivered or kind is ReplyConfirmed:
            if status != "delivered":
                self.delivery_status = "delivered"
                self.delivery_error = None
                self.delivered_at = (
                    data.delivered_at if kind is ReplyDelivered else data.confirmed_at
                )
            if self.provider_message_id is None:
                self.provider_message_id = data.provider_message_id
            if kind is ReplyDelivered:
                self.delivery_attempts = max(self.delivery_attempts, data.attempt)
        elif status == "delivered":
            return
        elif kind is ReplyFailed:
            self.delivery_status, self.delivery_error = "failed", data.error
            self.delivery_attempts = max(self.delivery_attempts, data.attempt)
        elif status == "failed":
            return
        elif kind is ReplyAttempted:
            self.delivery_status = "sending"
            self.delivery_attempts = max(self.delivery_attempts, data.attempt)
        elif kind is ReplyAttemptFailed:
            self.delivery_status, self.delivery_error = "retrying", data.error
            self.delivery_attempts = max(self.delivery_attempts, data.attempt)


class _AttachmentType(msgspec.Struct, gc=False):
    type: str


_STORED_ATTACHMENTS = msgspec.json.Decoder(tuple[_AttachmentType, ...])

if _Conversation.__struct_fields__ != (*(n for n, _ in _CONVERSATION_COLUMNS), "counted"):
    raise AssertionError("_Conversation's fields must be the conversations columns, in order")
if _Message.__struct_fields__[:-1] != tuple(n for n, _ in _MESSAGE_COLUMNS):
    raise AssertionError("_Message's fields must be the messages columns, in order")


def preview_of(text: str | None, attachment_types: Sequence[str]) -> str:
    """The inbox preview: the text with whitespace collapsed, else the attachment types."""
    if text:
        return " ".join(text.split())[:PREVIEW_LENGTH]
    if attachment_types:
        return "[" + ", ".join(attachment_types) + "]"
    return ""


class _RawJsonb(bytes):
    """JSON text already encoded (by msgspec), to be sent as a jsonb value as it is."""


class _RawJsonbBinaryDumper(Dumper):
    """Binary jsonb is a version byte (1) and the JSON text: no re-encoding needed."""

    format = Format.BINARY
    oid = postgres.types["jsonb"].oid

    def dump(self, obj: Any) -> bytes:
        return b"\x01" + bytes(obj)


_MESSAGE_TYPES: Final = [typ for _, typ in _MESSAGE_COLUMNS]


def _columns(spec: Iterable[tuple[str, str]]) -> sql.Composed:
    return sql.SQL(", ").join(sql.Identifier(name) for name, _ in spec)


def _unnest(spec: Iterable[tuple[str, str]]) -> sql.Composed:
    """``unnest(%b::t1[], %b::t2[], ...)``: one array parameter per column, sent in binary
    (psycopg dumps a list three times faster in binary than as array text; PostgreSQL reads
    binary arrays far more cheaply than JSON, measured: json_populate_recordset doubled the
    server's time per event)."""
    return sql.SQL("unnest({})").format(
        sql.SQL(", ").join(sql.SQL("%b::{}[]").format(sql.SQL(typ)) for _, typ in spec)
    )


def _render(statement: sql.Composed) -> bytes:
    """A composed statement as the bytes psycopg sends (psycopg renders a ``Composed`` again at
    every execution: 2.5% of a catch-up's CPU, profiled)."""
    return statement.as_bytes(None)


class _Statements:
    """The statements of one schema, composed and rendered once, reused for every batch."""

    def __init__(self, schema: str) -> None:
        conversations = sql.Identifier(schema, "conversations")
        messages = sql.Identifier(schema, "messages")
        counts = sql.Identifier(schema, "counts")
        merges = sql.Identifier(schema, "contact_merges")
        conversation_columns = _columns(_CONVERSATION_COLUMNS)
        message_columns = _columns(_MESSAGE_COLUMNS)
        self.load_conversations = _render(
            sql.SQL("SELECT {cols} FROM {t} WHERE conversation_id = ANY(%b::uuid[])").format(
                cols=conversation_columns, t=conversations
            )
        )
        self.load_messages = _render(
            sql.SQL("SELECT {cols} FROM {t} WHERE message_id = ANY(%b::uuid[])").format(
                cols=message_columns, t=messages
            )
        )
        self.load_merges = _render(
            sql.SQL(
                "SELECT from_contact_id, into_contact_id FROM {t}"
                " WHERE from_contact_id = ANY(%b::uuid[])"
            ).format(t=merges)
        )
        # COPY: several times cheaper than INSERT, for this process and for the server.
        self.copy_messages = _render(
            sql.SQL("COPY {t} ({cols}) FROM STDIN (FORMAT BINARY)").format(
                t=messages, cols=message_columns
            )
        )
        self.update_messages = _render(
            sql.SQL(
                "UPDATE {t} AS m SET text = u.text, edited_at = u.edited_at,"
                " delivery_status = u.status, delivery_attempts = u.attempts,"
                " delivery_error = u.error, delivered_at = u.delivered_at,"
                " provider_message_id = u.provider_message_id"
                " FROM unnest(%b::uuid[], %b::text[], %b::timestamptz[], %b::text[],"
                " %b::integer[], %b::text[], %b::timestamptz[], %b::text[])"
                " AS u(message_id, text, edited_at, status, attempts, error, delivered_at,"
                " provider_message_id)"
                " WHERE m.message_id = u.message_id"
            ).format(t=messages)
        )
        updates = sql.SQL(", ").join(
            sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(name))
            for name, _ in _CONVERSATION_COLUMNS[1:]
        )
        self.upsert_conversations = _render(
            sql.SQL(
                "INSERT INTO {t} ({cols}) SELECT * FROM {src}"
                " ON CONFLICT (conversation_id) DO UPDATE SET {updates}"
            ).format(
                t=conversations,
                cols=conversation_columns,
                src=_unnest(_CONVERSATION_COLUMNS),
                updates=updates,
            )
        )
        self.add_counts = _render(
            sql.SQL(
                "INSERT INTO {t} AS c (connection, status, conversations)"
                " SELECT * FROM unnest(%b::text[], %b::text[], %b::bigint[])"
                " ON CONFLICT (connection, status)"
                " DO UPDATE SET conversations = c.conversations + EXCLUDED.conversations"
            ).format(t=counts)
        )
        # Zero rows are dropped so the table's rows do not depend on batch boundaries.
        self.drop_zero_counts = _render(
            sql.SQL(
                "DELETE FROM {t} WHERE conversations = 0"
                " AND (connection, status) IN (SELECT * FROM unnest(%b::text[], %b::text[]))"
            ).format(t=counts)
        )
        self.insert_merge = _render(
            sql.SQL(
                "INSERT INTO {t} (from_contact_id, into_contact_id, merged_at) VALUES (%s, %s, %s)"
                " ON CONFLICT (from_contact_id) DO UPDATE"
                " SET into_contact_id = EXCLUDED.into_contact_id, merged_at = EXCLUDED.merged_at"
            ).format(t=merges)
        )
        # Earlier merges into the merged contact now lead to the survivor (one hop to resolve).
        self.forward_merges = _render(
            sql.SQL("UPDATE {t} SET into_contact_id = %s WHERE into_contact_id = %s").format(
                t=merges
            )
        )
        self.move_conversations = _render(
            sql.SQL(
                "UPDATE {t} SET contact_id = %s"
                " WHERE (contact_id = %s OR conversation_id = ANY(%b::uuid[])) AND contact_id <> %s"
            ).format(t=conversations)
        )


class _Memory:
    """Rows of earlier batches of one applier, as committed, so the next batches need not
    load them again (see :meth:`Projection.new_memory` for when it is valid).

    Bounded, in two generations per kind: a batch's rows go into the current one, and once it
    holds :attr:`LIMIT` rows it becomes the old one, whose rows are forgotten at the next turn
    unless a batch takes them again. (Forgetting the oldest rows of one dict one by one, or
    copying the newest, hashes every key again: ``uuid.UUID`` hashes in Python, so that was 3%
    of a catch-up.) A forgotten row is loaded again when an event names it. A merge changes
    rows the batch does not hold (every conversation of the merged contact): ``merged``
    records it, and a remembered conversation's contact is resolved through it when a batch
    takes the row.
    """

    __slots__ = ("conversations", "merged", "messages", "old_conversations", "old_messages")

    #: Rows of each kind in the current generation before it turns old.
    LIMIT: ClassVar[int] = 2_000

    def __init__(self) -> None:
        self.conversations: dict[uuid.UUID, _Conversation] = {}
        self.old_conversations: dict[uuid.UUID, _Conversation] = {}
        self.messages: dict[uuid.UUID, _Message] = {}
        self.old_messages: dict[uuid.UUID, _Message] = {}
        #: contact -> the contact it was merged into, for the merges of this memory's batches
        self.merged: dict[uuid.UUID, uuid.UUID] = {}

    def conversation(self, conversation_id: uuid.UUID) -> _Conversation | None:
        conv = self.conversations.get(conversation_id)
        if conv is None:
            conv = self.old_conversations.get(conversation_id)
        if conv is not None and self.merged:
            conv.contact_id = self.survivor(conv.contact_id)
        return conv

    def message(self, message_id: uuid.UUID) -> _Message | None:
        message = self.messages.get(message_id)
        return self.old_messages.get(message_id) if message is None else message

    def survivor(self, contact_id: uuid.UUID) -> uuid.UUID:
        """The contact that ``contact_id`` ends in through this memory's merges."""
        while (into := self.merged.get(contact_id)) is not None:
            contact_id = into
        return contact_id

    def remember(self, batch: _Batch) -> bool:
        """Take in the rows of a batch that is about to commit.

        True when the next batch may be folded before this one commits: the memory then holds
        every row the batch touched (the turn of generations happens before they go in), and
        the rows it does not hold are the same before and after the commit once resolved
        through ``merged`` (a merge also moves conversations and forwards merges that the
        memory does not hold, and :meth:`InboxProjection._load` resolves what it loads through
        the merges the memory knows).
        """
        for merge in batch.merge_log:
            self.merged[merge.from_contact_id] = merge.into_contact_id
        if len(self.conversations) >= self.LIMIT:
            self.old_conversations, self.conversations = self.conversations, {}
        for conv in batch.conversations.values():
            conv.counted = conv.count_key()
        # update() reuses the stored hashes.
        self.conversations.update(batch.conversations)
        if len(self.messages) >= self.LIMIT:
            self.old_messages, self.messages = self.messages, {}
        self.messages.update(batch.known_messages)
        self.messages.update(batch.new_messages)
        if len(self.merged) > self.LIMIT:
            # Merges only matter to remembered conversations: forget both, not grow for ever.
            self.conversations, self.old_conversations, self.merged = {}, {}, {}
            return False
        return True


class _Writes:
    """A folded batch's writes as values, taken before the next batch's fold changes the rows."""

    __slots__ = ("batch", "changed_messages", "conversations", "counts", "merges", "new_messages")

    def __init__(self, batch: _Batch) -> None:
        self.batch = batch
        for conversation_id, message in batch.previews.items():
            batch.conversations[conversation_id].last_message_preview = preview_of(
                message.text, message.attachment_types
            )
        self.new_messages = [message.row() for message in batch.new_messages.values()]
        changed = batch.changed_messages.values()
        self.changed_messages: list[list[Any]] | None = (
            [
                [m.message_id for m in changed],
                [m.text for m in changed],
                [m.edited_at for m in changed],
                [m.delivery_status for m in changed],
                [m.delivery_attempts for m in changed],
                [m.delivery_error for m in changed],
                [m.delivered_at for m in changed],
                [m.provider_message_id for m in changed],
            ]
            if changed
            else None
        )
        rows = [conv.row() for conv in batch.conversations.values()]
        self.conversations: list[list[Any]] | None = (
            [list(column) for column in zip(*rows, strict=True)] if rows else None
        )
        self.merges = list(batch.merge_log)
        deltas: dict[tuple[str, str], int] = {}
        for conv in batch.conversations.values():
            now = conv.count_key()
            if now != conv.counted:
                if conv.counted is not None:
                    deltas[conv.counted] = deltas.get(conv.counted, 0) - 1
                if now is not None:
                    deltas[now] = deltas.get(now, 0) + 1
        moved = [(key, n) for key, n in deltas.items() if n]
        self.counts: tuple[list[str], list[str], list[int]] | None = (
            ([key[0] for key, _ in moved], [key[1] for key, _ in moved], [n for _, n in moved])
            if moved
            else None
        )


class _Batch:
    """The fold of one batch: rows loaded, rows changed, and the writes they need."""

    def __init__(
        self,
        conversations: dict[uuid.UUID, _Conversation],
        known_messages: dict[uuid.UUID, _Message],
        merges: dict[uuid.UUID, uuid.UUID],
    ) -> None:
        self.conversations = conversations
        self.known_messages = known_messages
        self.merges = merges  # merged contact -> surviving contact
        self.new_messages: dict[uuid.UUID, _Message] = {}
        self.changed_messages: dict[uuid.UUID, _Message] = {}  # known ones edited or delivered
        # conversation -> its last message, whose preview is made once, at the write
        self.previews: dict[uuid.UUID, _Message] = {}
        self.merge_log: list[ContactsMerged] = []

    def conversation(self, event: RecordedEvent, conversation_id: uuid.UUID) -> _Conversation:
        conv = self.conversations.get(conversation_id)
        if conv is None:
            raise EventFailed(event, f"conversation {conversation_id} was never opened")
        return conv

    def survivor(self, contact_id: uuid.UUID) -> uuid.UUID:
        return self.merges.get(contact_id, contact_id)

    def named(self, event: RecordedEvent, message_id: uuid.UUID, unknown: str) -> _Message:
        """A message an event names: inserted by this batch, or stored before."""
        message = self.new_messages.get(message_id)
        if message is None:
            message = self.known_messages.get(message_id)
            if message is None:
                raise EventFailed(event, unknown.format(message_id))
        return message

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
        message_id = data.message_id
        if message_id in self.new_messages or message_id in self.known_messages:
            raise EventFailed(event, f"message {message_id} is stored twice")
        inbound = type(data) is MessageReceived
        conv.message_count += 1
        if inbound:
            conv.inbound_count += 1
            conv.unread_count += 1
        message = self.new_messages[message_id] = _Message.new(event, data, conv.inbound_count)
        self.previews[conv.conversation_id] = message
        # The order never moves back: a message a provider delivered late (or stamped by a
        # clock behind ours) is still the last one to arrive, but it must not sink the
        # conversation below older ones, where a pager would meet it twice.
        if conv.last_message_at is None:
            conv.last_activity_at = data.sent_at
        else:
            conv.last_activity_at = max(conv.last_activity_at, data.sent_at)
        conv.last_message_at = data.sent_at
        conv.last_message_id = message_id
        conv.last_message_direction = message.direction
        conv.last_message_status = message.delivery_status

    def deliver(self, event: RecordedEvent, data: Any) -> None:
        conv = self.conversation(event, data.conversation_id)
        message = self.named(event, data.message_id, "delivery of unknown message {}")
        owner = message.conversation_id
        if owner != conv.conversation_id:
            raise EventFailed(event, f"message {data.message_id} belongs to conversation {owner}")
        if data.message_id not in self.new_messages:
            self.changed_messages[data.message_id] = message
        was = message.delivery_status
        message.deliver(data)
        now = message.delivery_status
        if was != "failed" and now == "failed":
            conv.failed_replies += 1
        elif was == "failed" and now != "failed":
            conv.failed_replies -= 1
        if conv.last_message_id == data.message_id:
            conv.last_message_status = now

    def read(self, event: RecordedEvent, data: MessagesRead) -> None:
        conv = self.conversation(event, data.conversation_id)
        message = self.named(event, data.up_to_message_id, "message {} is unknown")
        owner = message.conversation_id
        if owner != conv.conversation_id:
            raise EventFailed(
                event, f"message {data.up_to_message_id} belongs to conversation {owner}"
            )
        conv.unread_count = max(conv.inbound_count - message.inbound_number, 0)

    def edit(self, event: RecordedEvent, data: MessageEdited) -> None:
        conv = self.conversation(event, data.conversation_id)
        message = self.named(event, data.message_id, "edit of unknown message {}")
        owner = message.conversation_id
        if owner != conv.conversation_id:
            raise EventFailed(event, f"message {data.message_id} belongs to conversation {owner}")
        message.text, message.edited_at = data.text, data.edited_at
        if data.message_id not in self.new_messages:
            self.changed_messages[data.message_id] = message
        if conv.last_message_id == data.message_id:
            self.previews[conv.conversation_id] = message

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
    #: 2: delivery status of outbound messages, failed replies per conversation; 3:
    #: last_activity_at keeps the newest message time (it followed the last message's)
    version: ClassVar[int] = 3
    handles: ClassVar[frozenset[str]] = _HANDLED
    tables: ClassVar[tuple[str, ...]] = ("conversations", "messages", "counts", "contact_merges")
    codec: ClassVar[EventCodec] = CODEC

    def __init__(self) -> None:
        self._statements: dict[str, _Statements] = {}

    def table_ddl(self, schema: str) -> Sequence[sql.Composed]:
        """The four tables, with their primary keys and the message id key."""
        return [sql.SQL(text).format(schema=sql.Identifier(schema)) for text in _TABLE_DDL]

    def index_ddl(self, schema: str, *, concurrently: bool = False) -> Sequence[sql.Composed]:
        """The inbox, contact and snooze indexes the queries use."""
        how = sql.SQL("CONCURRENTLY") if concurrently else sql.SQL("")
        return [
            sql.SQL(text).format(schema=sql.Identifier(schema), concurrently=how)
            for text in _INDEX_DDL
        ]

    def _for(self, schema: str) -> _Statements:
        statements = self._statements.get(schema)
        if statements is None:
            statements = self._statements[schema] = _Statements(schema)
        return statements

    def new_memory(self) -> Any:
        """The conversations and messages of recent batches (see :class:`_Memory`)."""
        return _Memory()

    async def apply(
        self,
        conn: psycopg.AsyncConnection[Any],
        schema: str,
        events: Sequence[RecordedEvent],
    ) -> None:
        """Fold the batch in memory, then write it with set-based statements."""
        await self.apply_with_memory(conn, schema, events, _Memory())

    async def apply_with_memory(
        self,
        conn: psycopg.AsyncConnection[Any],
        schema: str,
        events: Sequence[RecordedEvent],
        memory: Any,
    ) -> None:
        """:meth:`apply`, taking the rows ``memory`` holds instead of loading them."""
        prepared = await self.prepare(conn, schema, events, memory)
        self.remember(memory, prepared)
        await self.write(conn, schema, prepared, memory)

    async def prepare(
        self,
        conn: psycopg.AsyncConnection[Any],
        schema: str,
        events: Sequence[RecordedEvent],
        memory: Any,
    ) -> _Writes:
        """Take the batch's rows (from ``memory``, else loaded), fold the events over them and
        return the writes as values."""
        st = self._for(schema)
        batch = await self._load(conn, st, events, memory)
        fold = batch.fold
        for index, event in enumerate(events, 1):
            fold(event)
            if not index % _FOLD_SLICE:
                # Folded ahead, this runs while the batch before is written: give its
                # statements their turn, so the server works while this process folds.
                await asyncio.sleep(0)
        return _Writes(batch)

    def remember(self, memory: Any, prepared: Any) -> bool:
        """Keep the batch's rows in ``memory`` (see :meth:`_Memory.remember`)."""
        return cast(_Memory, memory).remember(cast(_Writes, prepared).batch)

    async def write(
        self,
        conn: psycopg.AsyncConnection[Any],
        schema: str,
        prepared: Any,
        memory: Any,
    ) -> None:
        """Write a prepared batch: new messages (COPY), changed messages, the touched
        conversations, merges, count deltas."""
        st = self._for(schema)
        writes = cast(_Writes, prepared)
        if writes.new_messages:
            await _copy_messages(conn, st.copy_messages, writes.new_messages)
        if writes.changed_messages is not None:
            await conn.execute(st.update_messages, writes.changed_messages)
        if writes.conversations is not None:
            await conn.execute(st.upsert_conversations, writes.conversations)
        for merge in writes.merges:
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
        if writes.counts is not None:
            connections, statuses, deltas = writes.counts
            await conn.execute(st.add_counts, (connections, statuses, deltas))
            await conn.execute(st.drop_zero_counts, (connections, statuses))

    async def _load(
        self,
        conn: psycopg.AsyncConnection[Any],
        st: _Statements,
        events: Sequence[RecordedEvent],
        memory: _Memory,
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
        conversations: dict[uuid.UUID, _Conversation] = {}
        missing: list[uuid.UUID] = []
        for conversation_id in conversation_ids:
            conv = memory.conversation(conversation_id)
            if conv is None:
                missing.append(conversation_id)
            else:
                conversations[conversation_id] = conv
        if missing:
            cur = await conn.execute(st.load_conversations, (missing,))
            for row in await cur.fetchall():
                conv = conversations[row[0]] = _Conversation.from_row(row)
                if memory.merged:
                    # Folded ahead, the rows are read before the batch before commits, which
                    # may have moved this one to another contact.
                    conv.contact_id = memory.survivor(conv.contact_id)
        known: dict[uuid.UUID, _Message] = {}
        lookup: list[uuid.UUID] = []
        for message_id in named_messages - new_messages:
            message = memory.message(message_id)
            if message is None:
                lookup.append(message_id)
            else:
                known[message_id] = message
        if lookup:
            cur = await conn.execute(st.load_messages, (lookup,))
            for row in await cur.fetchall():
                known[row[2]] = _Message.stored(row)
        merges: dict[uuid.UUID, uuid.UUID] = {}
        if contacts:
            cur = await conn.execute(st.load_merges, (list(contacts),))
            merges = {row[0]: row[1] for row in await cur.fetchall()}
            if memory.merged:
                # As above: the merges of the batch before may not be stored yet.
                for contact in contacts:
                    survivor = memory.survivor(merges.get(contact, contact))
                    if survivor != contact:
                        merges[contact] = survivor
        return _Batch(conversations, known, merges)


async def _copy_messages(
    conn: psycopg.AsyncConnection[Any], statement: bytes, rows: Iterable[tuple[Any, ...]]
) -> None:
    """Insert a batch's messages with a binary COPY."""
    async with conn.cursor() as cur:
        # Only this cursor's jsonb values come pre-encoded.
        cur.adapters.register_dumper(None, _RawJsonbBinaryDumper)
        async with cur.copy(statement) as copy:
            copy.set_types(_MESSAGE_TYPES)
            for row in rows:
                await copy.write_row(row)
