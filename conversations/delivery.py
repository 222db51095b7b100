"""Reply delivery, the domain half: where a reply stands, what to do next, and its record.

An agent reply is a ``MessageSent`` (source ``agent``) in its conversation's stream: *queued*.
Sending it is the delivery daemon's job (``handlers/delivery.py``, the HTTP half); this module
holds what does not depend on HTTP:

- :class:`ReplyState`: the fold of a reply's delivery events (``ReplyAttempted``,
  ``ReplyDelivered``, ``ReplyAttemptFailed``, ``ReplyFailed``, ``ReplyConfirmed``);
- :func:`decide`: given that state, the policy and the clock, what to do now: nothing (settled),
  wait, attempt again, or give up;
- :class:`ReplyLedger`: the decision and its event as one compare-and-set on the conversation
  stream's version, so two daemons (a network partition, a paused process) cannot both begin
  attempt *n*;
- :func:`check_reply`: what the reply command refuses up front (Meta's messaging window, message
  tags, each channel's text limit).

The resend budget
-----------------
A provider call whose answer we never recorded may or may not have sent the message: the daemon
was killed between the call and the record, the call timed out, or the connection dropped after
the request went out. Such an attempt, and a delivered one, *may have sent* the reply. An attempt
is only begun while fewer than :data:`MAX_SENDS` attempts may have sent it, so no reply is sent
more than twice. When the budget is spent the reply fails with reason ``uncertain`` (its error
says it may have been delivered). Attempts the provider answered with an error (a 5xx, a 429, a
refused connection) are taken as not sent and only count against ``max_attempts`` (a provider
that sent the message and still answered an error would see the retry as a new message; on
Meta, the echo confirms the reply first).

Meta echoes every message a page sends, with the ``metadata`` we set (:func:`echo_metadata`).
An echo of a reply is recorded as its ``ReplyConfirmed``, never as a second message, and a
confirmed reply is never sent again. So on Messenger and Instagram an attempt in doubt waits
``in_doubt_after`` seconds for its echo before it is resent.
"""

from __future__ import annotations

import datetime as dt
import random
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Final

import msgspec
import psycopg
from psycopg_pool import AsyncConnectionPool

from eventstore import ANY, Checkpoint, EventStore, NewEvent, WrongExpectedVersion, uuid7
from eventstore.errors import translate_errors

from .connections import Connection
from .errors import InvalidCommand, MessagingWindowClosed, RetriesExhausted
from .events import (
    CODEC,
    MessageSent,
    ReplyAttempted,
    ReplyAttemptFailed,
    ReplyConfirmed,
    ReplyDelivered,
    ReplyFailed,
    conversation_stream,
)

__all__ = [
    "MAX_SENDS",
    "META_CHANNELS",
    "PERMITTED_TAGS",
    "REPLY_EVENT_TYPES",
    "Attempt",
    "Decision",
    "GiveUp",
    "Reply",
    "ReplyLedger",
    "ReplyState",
    "RetryPolicy",
    "Settled",
    "Wait",
    "check_reply",
    "confirm_echo",
    "decide",
    "echo_metadata",
    "reply_in_metadata",
]

#: The most provider calls that may have sent one reply (see the module docstring).
MAX_SENDS: Final = 2
#: Channels sent through Meta's Send API (which echoes our sends).
META_CHANNELS: Final = frozenset({"messenger", "instagram"})
#: Message tags Meta permits outside the standard window, per channel.
PERMITTED_TAGS: Final[Mapping[str, tuple[str, ...]]] = {
    "messenger": (
        "HUMAN_AGENT",
        "CONFIRMED_EVENT_UPDATE",
        "POST_PURCHASE_UPDATE",
        "ACCOUNT_UPDATE",
    ),
    "instagram": ("HUMAN_AGENT",),
}
#: Meta's standard messaging window, and the one ``HUMAN_AGENT`` opens.
STANDARD_WINDOW: Final = dt.timedelta(hours=24)
HUMAN_AGENT_WINDOW: Final = dt.timedelta(days=7)
#: The longest text each provider accepts in one message (characters).
TEXT_LIMITS: Final[Mapping[str, int]] = {"messenger": 2000, "instagram": 1000, "telegram": 4096}
#: The types of a reply's delivery events.
REPLY_EVENT_TYPES: Final = (
    "ReplyAttempted",
    "ReplyDelivered",
    "ReplyAttemptFailed",
    "ReplyFailed",
    "ReplyConfirmed",
)

_METADATA_PREFIX: Final = "convstore:reply:"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def echo_metadata(message_id: uuid.UUID) -> str:
    """The ``metadata`` sent with a reply, which Meta hands back in the reply's echo."""
    return f"{_METADATA_PREFIX}{message_id}"


def reply_in_metadata(metadata: str | None) -> uuid.UUID | None:
    """The reply an echo's ``metadata`` names, if it is one of ours."""
    if not metadata or not metadata.startswith(_METADATA_PREFIX):
        return None
    try:
        return uuid.UUID(metadata[len(_METADATA_PREFIX) :])
    except ValueError:
        return None


def check_reply(
    conversation_id: uuid.UUID,
    channel: str,
    text: str,
    tag: str | None,
    last_customer_message_at: dt.datetime | None,
    now: dt.datetime,
) -> None:
    """Refuse a reply the channel would refuse: too long, an unknown tag, outside the window.

    Tags only mean something to Meta: elsewhere they are ignored.
    """
    limit = TEXT_LIMITS.get(channel)
    if limit is not None and len(text) > limit:
        raise InvalidCommand(f"a {channel} message is at most {limit} characters", field="text")
    permitted = PERMITTED_TAGS.get(channel)
    if permitted is None:
        return
    if tag is not None and tag not in permitted:
        raise InvalidCommand(f"tag {tag!r}: {channel} permits {', '.join(permitted)}", field="tag")
    window = HUMAN_AGENT_WINDOW if tag == "HUMAN_AGENT" else STANDARD_WINDOW
    if tag is not None and tag != "HUMAN_AGENT":
        return  # the other tags are for updates, which have no window
    if last_customer_message_at is None or now - last_customer_message_at > window:
        raise MessagingWindowClosed(
            conversation_id, channel, last_customer_message_at, window, permitted, tag
        )


# --------------------------------------------------------------------------- state and policy


class RetryPolicy(msgspec.Struct, frozen=True):
    """How often and how long a reply is tried.

    The n-th retry waits ``base_delay * 2**(n-1)`` seconds (at most ``max_delay``) with equal
    jitter (between half and all of it), or longer if the provider asked (``Retry-After``). An
    attempt without an outcome is in doubt after ``in_doubt_after`` seconds (it must exceed the
    provider call's timeout); on Meta channels a retry after an attempt that may have sent the
    reply also waits that long, for its echo. A reply still unsent ``max_age`` seconds after
    it was queued fails as ``expired`` instead of reaching the customer out of context.
    """

    max_attempts: int = 6
    base_delay: float = 2.0
    max_delay: float = 300.0
    in_doubt_after: float = 30.0
    max_age: float = 86_400.0

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based), with jitter."""
        full = min(self.max_delay, self.base_delay * 2.0 ** max(0, attempt - 1))
        return full / 2 + (rng or random).uniform(0, full / 2)


class ReplyState(msgspec.Struct):
    """A reply's delivery so far, folded from its events in stream order."""

    attempts: int = 0  # the highest attempt begun
    open_attempt: int | None = None  # begun, no outcome recorded
    last_attempt_at: dt.datetime | None = None
    maybe_sent: int = 0  # closed attempts that may have sent it (see MAX_SENDS)
    delivered: bool = False
    confirmed: bool = False
    failed: bool = False
    retry_at: dt.datetime | None = None
    last_error: str | None = None
    last_status: int | None = None
    #: the conversation is soft-deleted (read with the reply's events, in one snapshot)
    conversation_deleted: bool = False

    @property
    def settled(self) -> bool:
        """Delivered, confirmed by an echo, or failed for good."""
        return self.delivered or self.confirmed or self.failed

    def apply(self, event: Any) -> None:
        """Fold one delivery event of this reply."""
        kind = type(event)
        if kind is ReplyAttempted:
            if self.open_attempt is not None:
                self.maybe_sent += 1  # interrupted: nobody recorded what became of it
            self.attempts = max(self.attempts, event.attempt)
            self.open_attempt = event.attempt
            self.last_attempt_at = event.attempted_at
        elif kind is ReplyDelivered:
            self._close(event.attempt)
            self.maybe_sent += 1
            self.delivered = True
        elif kind is ReplyAttemptFailed:
            self._close(event.attempt)
            self.maybe_sent += int(event.maybe_sent)
            self.retry_at = event.retry_at
            self.last_error, self.last_status = event.error, event.status
        elif kind is ReplyFailed:
            self._close(event.attempt)
            self.failed = True
            self.last_error, self.last_status = event.error, event.status
        elif kind is ReplyConfirmed:
            self.confirmed = True

    def _close(self, attempt: int) -> None:
        if self.open_attempt == attempt:
            self.open_attempt = None


class Reply(msgspec.Struct, frozen=True):
    """A queued reply and where it goes: its connection (with tokens) and customer."""

    message_id: uuid.UUID
    conversation_id: uuid.UUID
    stream_id: str
    stream_version: int  # of its MessageSent: its delivery events come after
    connection: Connection
    psid: str
    text: str | None
    tag: str | None
    queued_at: dt.datetime

    @property
    def channel(self) -> str:
        """The connection's channel."""
        return self.connection.channel


class Settled(msgspec.Struct, frozen=True):
    """Nothing to do: delivered, confirmed or failed."""


class Wait(msgspec.Struct, frozen=True):
    """Not now: an attempt is in flight, or the next one is not due yet."""

    until: dt.datetime


class Attempt(msgspec.Struct, frozen=True):
    """Attempt ``attempt`` is begun (its ``ReplyAttempted`` is committed): call the provider.

    ``local``: a widget reply, delivered by the same record (the guest reads it from the log).
    """

    attempt: int
    local: bool = False


class GiveUp(msgspec.Struct, frozen=True):
    """The reply failed for good (its ``ReplyFailed`` is committed)."""

    reason: str
    error: str


Decision = Settled | Wait | Attempt | GiveUp


def _missing_token(reply: Reply) -> str | None:
    connection = reply.connection
    if reply.channel in META_CHANNELS and not connection.access_token:
        return (
            f"connection {connection.name!r} has no page access token"
            " (connections add --access-token)"
        )
    if reply.channel == "telegram" and not connection.bot_token:
        return f"connection {connection.name!r} has no bot token (connections add --bot-token)"
    if reply.channel == "telegram" and not reply.psid.lstrip("-").isdigit():
        return f"chat id {reply.psid!r} is not a Telegram chat id"
    return None


def decide(reply: Reply, state: ReplyState, policy: RetryPolicy, now: dt.datetime) -> Decision:
    """What to do about ``reply`` now (see the module docstring for the resend budget).

    A reply that may not be attempted again fails at once, not when its retry would be due.
    The widget has no provider and nothing to send late: its replies never expire.
    """
    if state.settled:
        return Settled()
    maybe_sent = state.maybe_sent
    if state.open_attempt is not None:
        assert state.last_attempt_at is not None
        in_doubt = state.last_attempt_at + dt.timedelta(seconds=policy.in_doubt_after)
        if now < in_doubt:
            return Wait(in_doubt)
        maybe_sent += 1
    if maybe_sent >= MAX_SENDS:
        return GiveUp(
            "uncertain",
            f"{maybe_sent} attempts may have reached the provider without a recorded answer;"
            " not sending again (the customer may have received it)",
        )
    if state.attempts >= policy.max_attempts:
        return GiveUp(
            "exhausted", f"{state.attempts} attempts failed; the last: {state.last_error}"
        )
    if state.conversation_deleted:
        # reply() refuses a deleted conversation; one deleted after the reply was queued
        # takes its unsent replies with it.
        return GiveUp("deleted", "the conversation was deleted before the reply was sent")
    local = reply.channel == "widget"
    if not local and (now - reply.queued_at).total_seconds() > policy.max_age:
        # Before any wait: a retry due after the reply expires would only expire then.
        return GiveUp(
            "expired", f"not sent within {policy.max_age:.0f} s of being queued; not sending late"
        )
    if state.open_attempt is None and state.retry_at is not None and now < state.retry_at:
        return Wait(state.retry_at)
    missing = _missing_token(reply)
    if missing is not None:
        return GiveUp("unsendable", missing)
    return Attempt(state.attempts + 1, local=local)


def _record_of(
    reply: Reply, state: ReplyState, decision: Decision, at: dt.datetime
) -> msgspec.Struct | None:
    """The event that records ``decision``, if it needs one."""
    if isinstance(decision, Attempt) and decision.local:
        return ReplyDelivered(reply.conversation_id, reply.message_id, decision.attempt, at)
    if isinstance(decision, Attempt):
        return ReplyAttempted(reply.conversation_id, reply.message_id, decision.attempt, at)
    if isinstance(decision, GiveUp):
        return ReplyFailed(
            reply.conversation_id,
            reply.message_id,
            state.attempts,
            at,
            decision.reason,
            decision.error,
            state.last_status,
        )
    return None


# --------------------------------------------------------------------------- the ledger

#: How often a decision is taken again after the conversation moved on under it.
_BEGIN_TRIES: Final = 30

_LOAD_REPLIES = """
SELECT e.event_id, e.stream_id, e.stream_version, e.data, v.psid,
       c.name, c.channel, c.external_id, c.reopen_policy, c.reopen_window, c.created_at,
       c.app_secret, c.verify_token, c.secret_token, c.access_token, c.bot_token
FROM events e
JOIN conversations v ON v.stream_id = e.stream_id
JOIN connections c ON c.name = v.connection
WHERE e.event_id = ANY(%s) AND e.type = 'MessageSent'
"""

# The stream's version and the reply's delivery events, in one statement (one snapshot).
_REPLY_STATE = """
SELECT s.version, s.deleted, e.type, e.data
FROM (SELECT max(v.stream_version) AS version,
             (SELECT c.deleted FROM conversations c WHERE c.stream_id = %(stream)s) AS deleted
      FROM events v WHERE v.stream_id = %(stream)s) AS s
LEFT JOIN LATERAL (
    SELECT d.type, d.data, d.stream_version FROM events d
    WHERE d.stream_id = %(stream)s AND d.stream_version > %(after)s
      AND d.type = ANY(%(types)s) AND d.data ->> 'message_id' = %(message)s
) AS e ON true
WHERE s.version IS NOT NULL
ORDER BY e.stream_version
"""


async def _read_state(
    conn: psycopg.AsyncConnection[Any], stream_id: str, after: int, message_id: uuid.UUID
) -> tuple[ReplyState, int]:
    """The reply's state and the version of its stream it was read at.

    A decision taken from it is recorded with that version as the expected version, so it is
    recorded only if nothing was appended to the conversation since (else: read and decide
    again). Two daemons deciding at once cannot both begin attempt *n*.
    """
    cur = await conn.execute(
        _REPLY_STATE,
        {
            "stream": stream_id,
            "after": after,
            "types": list(REPLY_EVENT_TYPES),
            "message": str(message_id),
        },
    )
    rows = await cur.fetchall()
    if not rows:
        raise LookupError(f"no stream {stream_id}")
    state = ReplyState(conversation_deleted=bool(rows[0][1]))
    for _, _, type_name, data in rows:
        if type_name is not None:
            state.apply(CODEC.decode(type_name, data))
    return state, int(rows[0][0])


class ReplyLedger:
    """Reads replies and records their delivery (each decision a compare-and-set)."""

    def __init__(self, store: EventStore, policy: RetryPolicy | None = None) -> None:
        self.store = store
        self.pool: AsyncConnectionPool[Any] = store.pool
        self.policy = policy or RetryPolicy()

    async def load(self, message_id: uuid.UUID) -> Reply | None:
        """The reply ``message_id`` with its connection; ``None`` if it is not an agent reply."""
        return (await self.load_many([message_id])).get(message_id)

    async def load_many(self, message_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Reply]:
        """The agent replies among ``message_ids``, with their connections, in one query."""
        with translate_errors():
            async with self.pool.connection() as conn:
                rows = await (await conn.execute(_LOAD_REPLIES, (list(message_ids),))).fetchall()
        replies = {}
        for row in rows:
            sent = CODEC.decode("MessageSent", row[3])
            if not isinstance(sent, MessageSent) or sent.source != "agent":
                continue
            replies[row[0]] = Reply(
                message_id=row[0],
                conversation_id=sent.conversation_id,
                stream_id=row[1],
                stream_version=int(row[2]),
                connection=Connection(*row[5:]),
                psid=row[4],
                text=sent.text,
                tag=sent.tag,
                queued_at=sent.sent_at,
            )
        return replies

    async def state(self, reply: Reply) -> ReplyState:
        """The reply's delivery state now (for tests and status output)."""
        with translate_errors():
            async with self.pool.connection() as conn:
                state, _ = await _read_state(
                    conn, reply.stream_id, reply.stream_version, reply.message_id
                )
        return state

    async def begin(
        self, reply: Reply, now: dt.datetime | None = None
    ) -> tuple[Decision, Checkpoint | None]:
        """Decide what to do about ``reply`` and record it, as one compare-and-set.

        ``Attempt``: its ``ReplyAttempted`` is committed (or, ``local``, its ``ReplyDelivered``);
        ``GiveUp``: its ``ReplyFailed`` is. The event is appended with the stream version the
        state was read at: if the conversation moved on meanwhile (a customer message, another
        daemon's decision), the state is read and the decision taken again. Returns the
        decision and the checkpoint of the event recorded, if any.
        """
        for _ in range(_BEGIN_TRIES):
            with translate_errors():
                async with self.pool.connection() as conn:
                    state, version = await _read_state(
                        conn, reply.stream_id, reply.stream_version, reply.message_id
                    )
                    at = now or _now()
                    decision = decide(reply, state, self.policy, at)
                    payload = _record_of(reply, state, decision, at)
                    if payload is None:
                        return decision, None
                    try:
                        result = await self.store.append(
                            reply.stream_id, [CODEC.new_event(payload)], version, connection=conn
                        )
                    except WrongExpectedVersion:
                        continue
            return decision, result.checkpoints[-1]
        raise RetriesExhausted("begin a reply's attempt", _BEGIN_TRIES)

    def outcome(self, reply: Reply, payload: msgspec.Struct) -> NewEvent:
        """The outcome event of an attempt, built once so a retried append stays idempotent."""
        return CODEC.new_event(payload, event_id=uuid7())

    async def record(self, reply: Reply, event: NewEvent) -> Checkpoint:
        """Append an attempt's outcome (from :meth:`outcome`); safe to retry with the same
        event after an error, it is stored once."""
        result = await self.store.append(reply.stream_id, [event], ANY)
        return result.checkpoints[-1]


async def confirm_echo(
    conn: psycopg.AsyncConnection[Any],
    store: EventStore,
    *,
    connection: str,
    psid: str,
    reply_id: uuid.UUID | None,
    current_stream: str | None,
    provider_message_id: str,
    confirmed_at: dt.datetime,
    event_id: uuid.UUID,
) -> tuple[uuid.UUID, uuid.UUID, int, bool] | None:
    """Record an echo of one of our replies as its ``ReplyConfirmed``, in the caller's
    transaction. The reply is the one ``reply_id`` (from the echo's metadata) names, if it was
    sent to this customer; else the one of ``current_stream`` delivered with this provider
    message id. Returns (conversation id, reply id, stream version, duplicate), or ``None``
    when the echo is not of a reply of ours."""
    target: tuple[str, int, uuid.UUID] | None = None
    if reply_id is not None:
        row = await (
            await conn.execute(
                "SELECT e.stream_id, e.stream_version FROM events e"
                " JOIN conversations v ON v.stream_id = e.stream_id"
                " WHERE e.event_id = %s AND e.type = 'MessageSent'"
                " AND v.connection = %s AND v.psid = %s",
                (reply_id, connection, psid),
            )
        ).fetchone()
        if row is not None:
            target = (row[0], int(row[1]), reply_id)
    if target is None and current_stream is not None:
        row = await (
            await conn.execute(
                "SELECT (d.data ->> 'message_id')::uuid FROM events d"
                " WHERE d.stream_id = %s AND d.type IN ('ReplyDelivered', 'ReplyConfirmed')"
                " AND d.data ->> 'provider_message_id' = %s LIMIT 1",
                (current_stream, provider_message_id),
            )
        ).fetchone()
        if row is not None:
            sent = await (
                await conn.execute(
                    "SELECT stream_version FROM events WHERE event_id = %s", (row[0],)
                )
            ).fetchone()
            if sent is not None:
                target = (current_stream, int(sent[0]), row[0])
    if target is None:
        return None
    stream_id, after, message_id = target
    conversation_id = uuid.UUID(stream_id.removeprefix("conversation-"))
    assert conversation_stream(conversation_id) == stream_id
    state, version = await _read_state(conn, stream_id, after, message_id)
    if state.confirmed:
        return conversation_id, message_id, version, True
    confirmed = ReplyConfirmed(conversation_id, message_id, provider_message_id, confirmed_at)
    result = await store.append(
        stream_id, [CODEC.new_event(confirmed, event_id=event_id)], version, connection=conn
    )
    return conversation_id, message_id, result.version, False


def reply_events(events: Sequence[Any], message_id: uuid.UUID) -> ReplyState:
    """Fold the delivery events of ``message_id`` among ``events`` (payloads, any order of
    other events): the same state :class:`ReplyLedger` decides from."""
    state = ReplyState()
    for event in events:
        if type(event).__name__ in REPLY_EVENT_TYPES and event.message_id == message_id:
            state.apply(event)
    return state
