"""The conversation domain's events: one tagged union, encoded and decoded by one codec.

Every payload is a ``msgspec.Struct(frozen=True, tag=True)``; its tag (the class name) is the
stored type name. Schemas evolve by msgspec's rules: a new field gets a default, a field's type
never changes; any other change to a stored shape gets an upcaster in :data:`UPCASTERS`.
Times are timezone-aware UTC datetimes (stored as RFC 3339 strings, queryable in SQL).
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Literal

import msgspec

from eventstore import EventCodec

from .connections import Channel

__all__ = [
    "CONTACT_EVENTS",
    "CONVERSATION_EVENTS",
    "CODEC",
    "Attachment",
    "ContactCreated",
    "ContactEvent",
    "ContactIdentified",
    "ContactsMerged",
    "ConversationClosed",
    "ConversationDeleted",
    "ConversationEvent",
    "ConversationOpened",
    "ConversationReopened",
    "ConversationRestored",
    "ConversationSnoozed",
    "ConversationUnsnoozed",
    "GuestSignedUp",
    "MessageEdited",
    "MessageReceived",
    "MessageSent",
    "MessagesRead",
    "ReplyAttemptFailed",
    "ReplyAttempted",
    "ReplyConfirmed",
    "ReplyDelivered",
    "ReplyFailed",
    "contact_stream",
    "conversation_stream",
]


def conversation_stream(conversation_id: uuid.UUID) -> str:
    """The stream of a conversation: ``conversation-<id>``."""
    return f"conversation-{conversation_id}"


def contact_stream(contact_id: uuid.UUID) -> str:
    """The stream of a contact: ``contact-<id>``."""
    return f"contact-{contact_id}"


class Attachment(msgspec.Struct, frozen=True, omit_defaults=True):
    """A file, image, sticker or location sent with a message."""

    type: str
    url: str | None = None
    name: str | None = None
    mime_type: str | None = None
    payload: dict[str, str] | None = None


# --------------------------------------------------------------------------- conversations


class ConversationOpened(msgspec.Struct, frozen=True, tag=True):
    """A new conversation for a customer key (connection, psid), owned by a contact."""

    conversation_id: uuid.UUID
    connection: str
    channel: Channel
    psid: str
    contact_id: uuid.UUID
    opened_at: dt.datetime


class MessageReceived(msgspec.Struct, frozen=True, tag=True):
    """An inbound customer message, as the provider delivered it."""

    conversation_id: uuid.UUID
    message_id: uuid.UUID
    provider: str
    provider_message_id: str
    text: str | None
    sent_at: dt.datetime  # the provider's timestamp
    received_at: dt.datetime  # when convstore accepted it
    attachments: tuple[Attachment, ...] = ()
    reply_to: str | None = None
    quick_reply: str | None = None


class MessageSent(msgspec.Struct, frozen=True, tag=True):
    """An outbound message: an agent reply (queued for delivery) or a provider echo."""

    conversation_id: uuid.UUID
    message_id: uuid.UUID
    text: str | None
    sent_at: dt.datetime
    author: str  # the agent, or "echo" for a message sent outside convstore
    source: Literal["agent", "echo"] = "agent"
    provider_message_id: str | None = None
    attachments: tuple[Attachment, ...] = ()
    tag: str | None = None  # Messenger message tag, when one was used


class MessageEdited(msgspec.Struct, frozen=True, tag=True):
    """The customer edited an inbound message (Telegram's edited_message)."""

    conversation_id: uuid.UUID
    message_id: uuid.UUID
    provider_message_id: str
    text: str | None
    edited_at: dt.datetime


class ConversationClosed(msgspec.Struct, frozen=True, tag=True):
    """The conversation was closed; the key's next message follows the reopen policy."""

    conversation_id: uuid.UUID
    closed_by: str
    closed_at: dt.datetime
    reason: str | None = None


class ConversationReopened(msgspec.Struct, frozen=True, tag=True):
    """A closed conversation was reopened, by an agent or by the reopen policy."""

    conversation_id: uuid.UUID
    reopened_by: str
    reopened_at: dt.datetime


class ConversationSnoozed(msgspec.Struct, frozen=True, tag=True):
    """Hidden from the open inbox until a time, or until the customer's next message."""

    conversation_id: uuid.UUID
    snoozed_by: str
    snoozed_at: dt.datetime
    until: dt.datetime | None = None  # None: until the customer's next message


class ConversationUnsnoozed(msgspec.Struct, frozen=True, tag=True):
    """The snooze ended early: the customer wrote, or an agent unsnoozed it."""

    conversation_id: uuid.UUID
    unsnoozed_by: str
    unsnoozed_at: dt.datetime


class ConversationDeleted(msgspec.Struct, frozen=True, tag=True):
    """Soft delete: hidden from every list; the events stay in the log."""

    conversation_id: uuid.UUID
    deleted_by: str
    deleted_at: dt.datetime


class ConversationRestored(msgspec.Struct, frozen=True, tag=True):
    """A soft-deleted conversation is visible again."""

    conversation_id: uuid.UUID
    restored_by: str
    restored_at: dt.datetime


class MessagesRead(msgspec.Struct, frozen=True, tag=True):
    """An agent read the conversation up to (and including) a message."""

    conversation_id: uuid.UUID
    read_by: str
    up_to_message_id: uuid.UUID
    read_at: dt.datetime


# --------------------------------------------------------------------------- reply delivery
# An agent reply (``MessageSent`` with source "agent") is queued; the delivery daemon records
# each attempt before calling the provider and its outcome after (see handlers/delivery.py).
# Each names the reply by its ``message_id``.


class ReplyAttempted(msgspec.Struct, frozen=True, tag=True):
    """Attempt ``attempt`` (1, 2, ...) to send a reply begins; committed before the call."""

    conversation_id: uuid.UUID
    message_id: uuid.UUID
    attempt: int
    attempted_at: dt.datetime


class ReplyDelivered(msgspec.Struct, frozen=True, tag=True):
    """The provider accepted the reply (or, on the widget, the guest can now see it)."""

    conversation_id: uuid.UUID
    message_id: uuid.UUID
    attempt: int
    delivered_at: dt.datetime
    provider_message_id: str | None = None


class ReplyAttemptFailed(msgspec.Struct, frozen=True, tag=True):
    """An attempt failed in a way worth retrying; the next one is due at ``retry_at``.

    ``maybe_sent``: the provider may have sent it anyway (a timeout, a connection lost after
    the request went out), so the attempt counts against the resend budget.
    """

    conversation_id: uuid.UUID
    message_id: uuid.UUID
    attempt: int
    failed_at: dt.datetime
    error: str
    retry_at: dt.datetime
    status: int | None = None  # the provider's HTTP status, when it answered
    maybe_sent: bool = False


class ReplyFailed(msgspec.Struct, frozen=True, tag=True):
    """The reply will not be sent (again): the last word on it unless an echo confirms it.

    ``reason``: ``permanent`` (the provider refused it), ``exhausted`` (every attempt failed),
    ``uncertain`` (two attempts may have reached the provider: a third could be a duplicate),
    ``expired`` (queued too long ago to be sent now), ``unsendable`` (no token, no channel),
    ``deleted`` (the conversation was deleted before it was sent).
    """

    conversation_id: uuid.UUID
    message_id: uuid.UUID
    attempt: int  # the last attempt made (0: none)
    failed_at: dt.datetime
    reason: str
    error: str
    status: int | None = None


class ReplyConfirmed(msgspec.Struct, frozen=True, tag=True):
    """The provider echoed the reply back (Meta's ``is_echo`` carrying our ``metadata``).

    Proof that it was sent, whatever the daemon recorded; never a second outbound message.
    """

    conversation_id: uuid.UUID
    message_id: uuid.UUID
    provider_message_id: str
    confirmed_at: dt.datetime


# --------------------------------------------------------------------------- contacts


class ContactCreated(msgspec.Struct, frozen=True, tag=True):
    """A contact created from a customer key's first message."""

    contact_id: uuid.UUID
    connection: str
    psid: str
    created_at: dt.datetime


class GuestSignedUp(msgspec.Struct, frozen=True, tag=True):
    """A widget guest signed up, before sending any message."""

    contact_id: uuid.UUID
    connection: str
    guest_id: str
    signed_up_at: dt.datetime
    username: str | None = None
    phone: str | None = None
    email: str | None = None


class ContactIdentified(msgspec.Struct, frozen=True, tag=True):
    """A contact told us who they are; ``registered`` when no existing contact matched."""

    contact_id: uuid.UUID
    identified_at: dt.datetime
    client_id: str | None = None
    username: str | None = None
    email: str | None = None
    phone: str | None = None
    registered: bool = False


class ContactsMerged(msgspec.Struct, frozen=True, tag=True):
    """Every conversation of ``from_contact_id`` now belongs to ``into_contact_id``."""

    from_contact_id: uuid.UUID
    into_contact_id: uuid.UUID
    merged_at: dt.datetime
    conversation_ids: tuple[uuid.UUID, ...] = ()


ConversationEvent = (
    ConversationOpened
    | MessageReceived
    | MessageSent
    | MessageEdited
    | ConversationClosed
    | ConversationReopened
    | ConversationSnoozed
    | ConversationUnsnoozed
    | ConversationDeleted
    | ConversationRestored
    | MessagesRead
    | ReplyAttempted
    | ReplyDelivered
    | ReplyAttemptFailed
    | ReplyFailed
    | ReplyConfirmed
)
ContactEvent = ContactCreated | GuestSignedUp | ContactIdentified | ContactsMerged

CONVERSATION_EVENTS: tuple[type[msgspec.Struct], ...] = (
    ConversationOpened,
    MessageReceived,
    MessageSent,
    MessageEdited,
    ConversationClosed,
    ConversationReopened,
    ConversationSnoozed,
    ConversationUnsnoozed,
    ConversationDeleted,
    ConversationRestored,
    MessagesRead,
    ReplyAttempted,
    ReplyDelivered,
    ReplyAttemptFailed,
    ReplyFailed,
    ReplyConfirmed,
)
CONTACT_EVENTS: tuple[type[msgspec.Struct], ...] = (
    ContactCreated,
    GuestSignedUp,
    ContactIdentified,
    ContactsMerged,
)

#: The one codec for every domain event, built once.
CODEC = EventCodec((*CONVERSATION_EVENTS, *CONTACT_EVENTS))
