"""The conversation domain's errors, under the project's one root :class:`ConvstoreError`."""

from __future__ import annotations

import datetime as dt
import uuid

from eventstore.errors import ConvstoreError

__all__ = [
    "ConnectionExists",
    "ConnectionNotFound",
    "ContactNotFound",
    "ConversationNotFound",
    "InvalidCommand",
    "InvalidTransition",
    "MessagingWindowClosed",
    "RetriesExhausted",
]


class InvalidCommand(ConvstoreError, ValueError):
    """A command's input is malformed; nothing was stored. ``field`` names the culprit."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ConnectionNotFound(ConvstoreError, LookupError):
    """No connection is registered under that name (or channel and external id)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no connection named {name!r}")
        self.name = name


class ConnectionExists(ConvstoreError):
    """A connection with that name, or that channel and external id, is already registered."""

    def __init__(self, name: str, constraint: str | None) -> None:
        what = (
            "that channel and external id"
            if constraint == "connections_channel_external_id_key"
            else "that name"
        )
        super().__init__(f"connection {name!r}: a connection with {what} already exists")
        self.name = name
        self.constraint = constraint


class ConversationNotFound(ConvstoreError, LookupError):
    """No conversation has that id."""

    def __init__(self, conversation_id: uuid.UUID | str) -> None:
        super().__init__(f"no conversation {conversation_id}")
        self.conversation_id = conversation_id


class ContactNotFound(ConvstoreError, LookupError):
    """No contact has that id."""

    def __init__(self, contact_id: uuid.UUID | str) -> None:
        super().__init__(f"no contact {contact_id}")
        self.contact_id = contact_id


class InvalidTransition(ConvstoreError):
    """The command does not apply to the conversation (or contact) in its current state."""

    def __init__(self, subject: uuid.UUID, command: str, state: str, version: int = 0) -> None:
        super().__init__(f"cannot {command} {subject}: it is {state}")
        self.subject = subject
        self.command = command
        self.state = state
        #: the subject stream's current version, for the caller's next If-Match
        self.version = version


class RetriesExhausted(ConvstoreError):
    """A command kept losing races; it stored nothing and may be retried by the caller."""

    def __init__(self, command: str, attempts: int) -> None:
        super().__init__(f"{command} lost {attempts} races in a row; nothing was stored")
        self.command = command
        self.attempts = attempts


class MessagingWindowClosed(ConvstoreError):
    """Meta refuses a reply outside its messaging window unless a permitted tag is given.

    Messenger and Instagram accept a standard reply up to 24 hours after the customer's last
    message; later ones need a message tag (``HUMAN_AGENT`` extends the window to 7 days).
    """

    def __init__(
        self,
        conversation_id: uuid.UUID,
        channel: str,
        last_customer_message_at: dt.datetime | None,
        window: dt.timedelta,
        permitted_tags: tuple[str, ...],
        tag: str | None = None,
    ) -> None:
        hours = int(window.total_seconds() // 3600)
        when = (
            last_customer_message_at.isoformat()
            if last_customer_message_at is not None
            else "never"
        )
        given = f"with tag {tag}" if tag else "without a message tag"
        super().__init__(
            f"cannot reply to {conversation_id} {given}: the customer's last {channel} message"
            f" ({when}) is more than {hours} hours old; send one of the tags"
            f" {', '.join(permitted_tags)} if one applies"
        )
        self.conversation_id = conversation_id
        self.channel = channel
        self.last_customer_message_at = last_customer_message_at
        self.window = window
        self.permitted_tags = permitted_tags
        self.tag = tag
