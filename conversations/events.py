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
)
CONTACT_EVENTS: tuple[type[msgspec.Struct], ...] = (
    ContactCreated,
    GuestSignedUp,
    ContactIdentified,
    ContactsMerged,
)

#: The one codec for every domain event, built once.
CODEC = EventCodec((*CONVERSATION_EVENTS, *CONTACT_EVENTS))
