"""The delivery daemon: agent replies reach the customer, with retries and honest guarantees.

``convstore deliver`` runs it. An agent reply (``POST /api/conversations/{id}/messages``) is
stored as a queued ``MessageSent``; this daemon sends it through the channel's API:

- Messenger and Instagram: the Graph API Send endpoint (``POST {graph}/me/messages``: the
  customer's PSID, the text, ``metadata`` naming the reply; the page access token in the
  ``Authorization`` header, never in a URL);
- Telegram: ``POST {telegram}/bot<token>/sendMessage`` (chat id, text);
- the widget: nothing to call: the guest's ``GET /widget/{connection}/messages`` shows a reply
  once it is delivered, so recording ``ReplyDelivered`` is the delivery.

Provider base URLs come from ``CONVSTORE_GRAPH_API_URL`` (default
``https://graph.facebook.com/v19.0``) and ``CONVSTORE_TELEGRAM_API_URL`` (default
``https://api.telegram.org``): tests, the bench and demos point them at a fake provider on
loopback (:mod:`handlers.fakeprovider`).

Design
------
A handler that calls a provider cannot run inside a projection batch: the batch's transaction
(and its checkpoint) would commit after the call, so a crash in between would send again with
no record of the first send, and a long call would hold the transaction open. So the daemon has
two halves that share one leadership:

1. the ``delivery`` projection (:class:`projections.delivery.DeliveryProjection`), run by the
   ordinary :class:`~projections.runner.ProjectionRunner` (same checkpointing, same
   advisory-lock leadership, same standby takeover as every projector), keeps the work queue:
   replies not yet delivered, confirmed or failed, and when each is due;
2. the sender, which runs only while that runner leads, takes due replies from the queue and,
   for each, decides from the reply's events and records the decision with the conversation
   stream's version as the expected version, a compare-and-set
   (:class:`conversations.delivery.ReplyLedger`):

   - ``ReplyAttempted`` (attempt *n*) is **committed before** the provider is called;
   - after the call: ``ReplyDelivered`` with the provider's message id, ``ReplyAttemptFailed``
     with the provider's error and the time of the next attempt (exponential backoff with
     jitter, or the provider's ``Retry-After``), or ``ReplyFailed`` at once for a permanent
     error (a 4xx such as an invalid recipient) and after the last attempt.

   The queue is only a hint: the decision is taken from the reply's own events and recorded
   only if the stream has not moved since, so a lagging queue, two daemons that both believe
   they lead, or a restart cannot begin the same attempt twice.

The guarantee
-------------
- Every queued reply ends ``delivered`` or ``failed``: the queue is rebuilt from the log, and a
  daemon killed at any instant leaves either nothing or an attempt without an outcome, which
  the next leader picks up.
- Exactly once where the provider lets us know, at most twice where it does not. A daemon killed
  between the provider's answer and our record (or a call that timed out, or a connection lost
  after the request went out) leaves an attempt *in doubt*: it may have been sent. It is resent
  after ``in_doubt_after`` seconds, but never beyond a budget of two attempts that may have
  sent it (:data:`conversations.delivery.MAX_SENDS`): a reply is never sent more than twice;
  when the budget is spent it fails with reason ``uncertain`` and says it may have arrived.
  An error the provider answered (a 5xx, a 429) or a connection it refused is taken as not
  sent: a provider that sends a message and still answers an error would have it repeated by
  the retry (on Meta its echo, which confirms the reply, stops that).
- Meta echoes our sends with the ``metadata`` we set: the echo is recorded as the reply's
  ``ReplyConfirmed`` (never a second outbound message), a confirmed reply is never resent, and
  on Messenger and Instagram an attempt in doubt waits for its echo before a resend. Telegram
  has no echo and no idempotency key, so there an attempt in doubt is resent once.
- A reply still unsent ``max_age`` after it was queued fails as ``expired`` rather than reach
  the customer out of context (a daemon that was down for days); widget replies never expire.
- A reply that may not be attempted again (attempts or budget spent) fails at once.

Tokens are never logged nor stored in events: provider errors are recorded with every token of
the connection replaced by ``***``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import email.utils
import functools
import logging
import os
import random
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Final

import aiohttp
import msgspec
import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import AsyncConnectionPool

from conversations.delivery import (
    META_CHANNELS,
    Attempt,
    GiveUp,
    Reply,
    ReplyLedger,
    RetryPolicy,
    Settled,
    Wait,
    echo_metadata,
)
from conversations.events import (
    CODEC,
    ReplyAttemptFailed,
    ReplyDelivered,
    ReplyFailed,
)
from eventstore import Checkpoint, DatabaseUnavailable, EventStore
from projections.delivery import DeliveryProjection
from projections.runner import Outcome, ProjectionRunner, Waker

from .meta import USER_REF_PREFIX

__all__ = [
    "DEFAULT_GRAPH_API_URL",
    "DEFAULT_TELEGRAM_API_URL",
    "DELIVERY",
    "DeliveryDaemon",
    "DeliverySettings",
    "Providers",
    "SendResult",
    "register",
    "run_delivery",
]

log = logging.getLogger("convstore.delivery")

DEFAULT_GRAPH_API_URL: Final = "https://graph.facebook.com/v19.0"
DEFAULT_TELEGRAM_API_URL: Final = "https://api.telegram.org"
#: The projection that keeps the daemon's queue (and its leadership lock).
DELIVERY: Final = DeliveryProjection()

#: Meta error codes that mean "try again later" (service hiccups and rate limits).
_META_TRANSIENT_CODES: Final = frozenset({1, 2, 4, 17, 32, 613})
_MAX_ERROR: Final = 1000
#: The most of a provider's answer read: its id or its error are a few hundred bytes, and an
#: unbounded read let a broken or hostile endpoint fill the daemon's memory.
_MAX_ANSWER: Final = 64 * 1024
#: The longest wait a provider may ask for (Retry-After, Telegram's retry_after).
_MAX_RETRY_AFTER: Final = 3600.0


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclasses.dataclass(frozen=True)
class DeliverySettings:
    """Where providers are and how the daemon works."""

    graph_api_url: str = DEFAULT_GRAPH_API_URL
    telegram_api_url: str = DEFAULT_TELEGRAM_API_URL
    #: seconds a provider call may take (connect, send, answer)
    timeout: float = 10.0
    #: replies in flight at once
    concurrency: int = 32
    policy: RetryPolicy = dataclasses.field(default_factory=RetryPolicy)
    #: seconds between looks at the queue when nothing wakes the sender
    poll_interval: float = 0.5
    #: seconds between a standby's tries for the leadership
    standby_interval: float = 1.0
    batch_size: int = 500

    def __post_init__(self) -> None:
        for name in ("graph_api_url", "telegram_api_url"):
            url = getattr(self, name)
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{name} must be an http(s) URL, not {url!r}")
        if self.timeout <= 0 or self.concurrency < 1:
            raise ValueError("timeout must be positive and concurrency at least 1")
        if self.policy.in_doubt_after <= self.timeout:
            raise ValueError(
                f"in_doubt_after ({self.policy.in_doubt_after} s) must exceed the provider"
                f" timeout ({self.timeout} s): an attempt still running is not in doubt"
            )

    @classmethod
    def from_env(cls, **overrides: Any) -> DeliverySettings:
        """Settings with ``CONVSTORE_GRAPH_API_URL`` and ``CONVSTORE_TELEGRAM_API_URL``."""
        values: dict[str, Any] = {
            "graph_api_url": os.environ.get("CONVSTORE_GRAPH_API_URL") or DEFAULT_GRAPH_API_URL,
            "telegram_api_url": os.environ.get("CONVSTORE_TELEGRAM_API_URL")
            or DEFAULT_TELEGRAM_API_URL,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


# --------------------------------------------------------------------------- providers


class SendResult(msgspec.Struct, frozen=True):
    """What a provider call came to."""

    ok: bool
    provider_message_id: str | None = None
    error: str | None = None
    status: int | None = None  # the HTTP status, when the provider answered
    permanent: bool = False  # refused: retrying cannot help
    maybe_sent: bool = False  # no answer after the request went out
    retry_after: float | None = None  # the provider asked us to wait this long


class _MetaError(msgspec.Struct):
    message: str = ""
    type: str = ""
    code: int | None = None
    error_subcode: int | None = None
    is_transient: bool = False


class _MetaAnswer(msgspec.Struct):
    message_id: str | None = None
    error: _MetaError | None = None


class _TelegramSent(msgspec.Struct):
    message_id: int


class _TelegramParameters(msgspec.Struct):
    retry_after: float | None = None


class _TelegramAnswer(msgspec.Struct):
    ok: bool = False
    result: _TelegramSent | None = None
    error_code: int | None = None
    description: str = ""
    parameters: _TelegramParameters | None = None


_META_ANSWER = msgspec.json.Decoder(_MetaAnswer)
_TELEGRAM_ANSWER = msgspec.json.Decoder(_TelegramAnswer)


def _storable(text: str) -> str:
    """``text`` as the events can hold it: jsonb refuses NUL, and UTF-8 a lone surrogate.

    Provider answers end up in events; one that could not be stored made the outcome of a
    call go unrecorded, and the reply was sent again.
    """
    return text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


def _redact(text: str, *secrets: str | None) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return _storable(text[:_MAX_ERROR])


def _wait_seconds(seconds: float) -> float:
    """A provider's requested wait, within 0 and :data:`_MAX_RETRY_AFTER` (NaN: 0)."""
    return max(0.0, min(seconds, _MAX_RETRY_AFTER)) if seconds == seconds else 0.0


def _retry_after(headers: Any) -> float | None:
    """``Retry-After`` in seconds: given as seconds, or as an HTTP date."""
    raw = headers.get("Retry-After")
    if raw is None:
        return None
    try:
        return _wait_seconds(float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, OverflowError, IndexError):
        # Not a date either (or one no datetime holds): this runs on every answer, sent ones
        # too, so it must not raise.
        return None
    if when.tzinfo is None:  # an HTTP date is in GMT
        when = when.replace(tzinfo=dt.UTC)
    return _wait_seconds((when - _now()).total_seconds())


async def _answer(response: aiohttp.ClientResponse) -> tuple[bytes, bool]:
    """Up to :data:`_MAX_ANSWER` bytes of the answer's body, and whether it arrived whole.

    Once the status is known the provider has decided: a body that stalls or is cut short
    must not turn a known answer into "maybe sent", and the reply be sent again. What the
    body would have said (a Meta error's code) is then unknown, which callers weigh.
    """
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in response.content.iter_chunked(16 * 1024):
            chunks.append(chunk)
            size += len(chunk)
            if size > _MAX_ANSWER:
                return b"".join(chunks)[:_MAX_ANSWER], False  # cut here: not whole either
    except (TimeoutError, aiohttp.ClientError):
        return b"".join(chunks)[:_MAX_ANSWER], False
    return b"".join(chunks), True


class Providers:
    """Sends a reply through its channel's API on one HTTP session."""

    def __init__(self, session: aiohttp.ClientSession, settings: DeliverySettings) -> None:
        self.session = session
        self.settings = settings
        self.timeout = aiohttp.ClientTimeout(total=settings.timeout)

    async def send(self, reply: Reply) -> SendResult:
        """Call the provider once; every failure is a :class:`SendResult`, never raised."""
        connection = reply.connection
        secrets = (connection.access_token, connection.bot_token, connection.app_secret)
        try:
            if reply.channel in META_CHANNELS:
                return await self._meta(reply)
            if reply.channel == "telegram":
                return await self._telegram(reply)
            return SendResult(False, error=f"no provider for {reply.channel}", permanent=True)
        except aiohttp.ConnectionTimeoutError:
            return SendResult(False, error="connecting to the provider timed out")
        except aiohttp.ClientConnectorError as exc:
            # Nothing was sent: the connection was never made.
            return SendResult(False, error=_redact(f"cannot connect: {exc.os_error}", *secrets))
        except TimeoutError:
            return SendResult(
                False,
                error=f"no answer within {self.settings.timeout:g} s",
                maybe_sent=True,
            )
        except aiohttp.ClientError as exc:
            return SendResult(
                False,
                error=_redact(f"{type(exc).__name__}: {exc}", *secrets),
                maybe_sent=True,
            )

    async def _meta(self, reply: Reply) -> SendResult:
        token = reply.connection.access_token or ""
        # A customer keyed by a plugin's user_ref (see handlers.meta) is addressed by it.
        recipient = (
            {"user_ref": reply.psid.removeprefix(USER_REF_PREFIX)}
            if reply.psid.startswith(USER_REF_PREFIX)
            else {"id": reply.psid}
        )
        body: dict[str, Any] = {
            "recipient": recipient,
            "messaging_type": "RESPONSE",
            "message": {"text": reply.text or "", "metadata": echo_metadata(reply.message_id)},
        }
        if reply.tag:
            body["messaging_type"] = "MESSAGE_TAG"
            body["tag"] = reply.tag
        async with self.session.post(
            f"{self.settings.graph_api_url.rstrip('/')}/me/messages",
            data=msgspec.json.encode(body),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            timeout=self.timeout,
        ) as response:
            status = response.status
            retry_after = _retry_after(response.headers)
            raw, whole = await _answer(response)
        try:
            answer = _META_ANSWER.decode(raw)
        except (msgspec.DecodeError, RecursionError):  # nested too deep: not an answer either
            answer = _MetaAnswer()
        if 200 <= status < 300:
            sent_id = answer.message_id
            if sent_id is not None:
                sent_id = _storable(sent_id[:_MAX_ERROR])
            return SendResult(True, provider_message_id=sent_id, status=status)
        error = answer.error or _MetaError(message=raw[:200].decode("utf-8", "replace"))
        text = _redact(
            f"{status} {error.type or 'error'} {error.code}/{error.error_subcode}: {error.message}",
            token,
        )
        transient = (
            # A refusal whose reason never arrived whole may be a rate limit: not sent, retry.
            (not whole and answer.error is None)
            or status >= 500
            or status in (408, 429)
            or error.is_transient
            or error.code in _META_TRANSIENT_CODES
        )
        return SendResult(
            False, error=text, status=status, permanent=not transient, retry_after=retry_after
        )

    async def _telegram(self, reply: Reply) -> SendResult:
        token = reply.connection.bot_token or ""
        chat = int(reply.psid)
        async with self.session.post(
            f"{self.settings.telegram_api_url.rstrip('/')}/bot{token}/sendMessage",
            data=msgspec.json.encode({"chat_id": chat, "text": reply.text or ""}),
            headers={"Content-Type": "application/json"},
            timeout=self.timeout,
        ) as response:
            status = response.status
            retry_after = _retry_after(response.headers)
            raw, _ = await _answer(response)  # Telegram's status alone says transient or not
        try:
            answer = _TELEGRAM_ANSWER.decode(raw)
        except (msgspec.DecodeError, RecursionError):  # nested too deep: not an answer either
            answer = _TelegramAnswer(description=raw[:200].decode("utf-8", "replace"))
        if 200 <= status < 300 and answer.ok and answer.result is not None:
            return SendResult(
                True, provider_message_id=f"{chat}:{answer.result.message_id}", status=status
            )
        if 200 <= status < 300:
            # Accepted, but not the answer Telegram gives: it was sent, the id is unknown.
            return SendResult(True, status=status)
        if answer.parameters is not None and answer.parameters.retry_after is not None:
            retry_after = _wait_seconds(answer.parameters.retry_after)
        code = answer.error_code or status
        text = _redact(f"{code}: {answer.description}", token)
        transient = status >= 500 or status in (408, 429)
        return SendResult(
            False, error=text, status=status, permanent=not transient, retry_after=retry_after
        )


# --------------------------------------------------------------------------- the daemon


class DeliveryStats(msgspec.Struct):
    """What this process did (the totals across processes are in ``rm_delivery.stats``)."""

    attempts: int = 0
    delivered: int = 0
    retried: int = 0
    failed: int = 0


# Due replies, and the queue's checkpoint (to tell which of our own appends it has applied).
_DUE = """
SELECT c.transaction_id, c.position, o.message_id
FROM rm_delivery.checkpoint AS c
LEFT JOIN LATERAL (
    SELECT message_id, next_attempt_at FROM rm_delivery.outbox
    WHERE ((NOT in_flight AND next_attempt_at <= now())
           OR (in_flight AND next_attempt_at <= now() - make_interval(secs => %(in_doubt)s)))
      AND NOT (message_id = ANY(%(skip)s))
    ORDER BY next_attempt_at
    LIMIT %(limit)s
) AS o ON true
"""


def _database_trouble(exc: BaseException) -> bool:
    if isinstance(exc, DatabaseUnavailable | psycopg.OperationalError | psycopg.InterfaceError):
        return True
    return isinstance(exc, pg_errors.UndefinedTable | pg_errors.InvalidSchemaName)


class DeliveryDaemon:
    """Runs the ``delivery`` projection and, while it leads, sends the due replies."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        settings: DeliverySettings | None = None,
        *,
        instance: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.pool = pool
        self.settings = settings or DeliverySettings.from_env()
        self.store = EventStore(pool, CODEC)
        self.ledger = ReplyLedger(self.store, self.settings.policy)
        self.rng = rng or random.Random()
        self.runner = ProjectionRunner(
            pool,
            DELIVERY,
            batch_size=self.settings.batch_size,
            poll_interval=self.settings.poll_interval,
            standby_interval=self.settings.standby_interval,
            instance=instance,
        )
        self.stats = DeliveryStats()
        self._inflight: dict[uuid.UUID, asyncio.Task[None]] = {}
        # replies this process appended for: skipped until the queue has applied the append
        self._stale: dict[uuid.UUID, Checkpoint] = {}
        # replies that are not due before a time (a wait the ledger decided)
        self._not_before: dict[uuid.UUID, float] = {}
        self._done = asyncio.Event()

    @property
    def is_leader(self) -> bool:
        """True while this instance holds the delivery leadership."""
        return self.runner.is_leader

    async def run(self, stop: asyncio.Event) -> Outcome:
        """Run until ``stop`` is set; finishes the calls in flight (recording their outcome)."""
        halt = asyncio.Event()
        waker = Waker(self.pool)
        runner_wake, sender_wake = waker.register(), waker.register()

        async def runner() -> Outcome:
            try:
                return await self.runner.run(halt, wake=runner_wake)
            finally:
                halt.set()

        async def watch() -> None:
            await stop.wait()
            halt.set()

        watcher = asyncio.create_task(watch())
        listener = asyncio.create_task(waker.run(halt))
        try:
            outcome, _ = await asyncio.gather(runner(), self._send_loop(halt, sender_wake))
        finally:
            halt.set()
            for task in (watcher, listener):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self.store.close()
        return outcome

    async def _send_loop(self, halt: asyncio.Event, wake: asyncio.Event) -> None:
        settings = self.settings
        connector = aiohttp.TCPConnector(limit=settings.concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            providers = Providers(session, settings)
            try:
                while not halt.is_set():
                    if not self.runner.is_leader:
                        await _wait(halt, None, settings.standby_interval / 4)
                        continue
                    free = settings.concurrency - len(self._inflight)
                    if free > 0:
                        try:
                            due = await self._due(free)
                        except Exception as exc:
                            if not _database_trouble(exc):
                                raise
                            await _wait(halt, None, settings.poll_interval)
                            continue
                        try:
                            replies = await self.ledger.load_many(due) if due else {}
                        except Exception as exc:
                            if not _database_trouble(exc):
                                raise
                            await _wait(halt, None, settings.poll_interval)
                            continue
                        for message_id in due:
                            reply = replies.get(message_id)
                            if reply is None:
                                log.error(
                                    "the queue names %s, which is not an agent reply", message_id
                                )
                                self._later(message_id, 3600)
                                continue
                            task = asyncio.create_task(self._deliver(providers, reply))
                            self._inflight[message_id] = task
                            task.add_done_callback(functools.partial(self._finished, message_id))
                        if len(due) == free:
                            continue  # more may be due: look again once a slot frees up
                    await _wait(halt, wake, settings.poll_interval, self._done)
            finally:
                if self._inflight:
                    # Let the calls in flight finish and record what became of them.
                    await asyncio.gather(*self._inflight.values(), return_exceptions=True)

    def _finished(self, message_id: uuid.UUID, _: asyncio.Task[None]) -> None:
        self._inflight.pop(message_id, None)
        self._done.set()

    async def _due(self, limit: int) -> list[uuid.UUID]:
        now = time.monotonic()
        for message_id, until in list(self._not_before.items()):
            if until <= now:
                del self._not_before[message_id]
        skip = list({*self._inflight, *self._not_before})
        stale = dict(self._stale)
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                _DUE,
                {
                    "in_doubt": self.settings.policy.in_doubt_after,
                    "skip": skip,
                    "limit": limit + len(stale),
                },
            )
            rows = await cur.fetchall()
        if not rows:
            return []
        applied = Checkpoint(int(rows[0][0]), int(rows[0][1]))
        for message_id, checkpoint in stale.items():
            if checkpoint <= applied and self._stale.get(message_id) == checkpoint:
                del self._stale[message_id]
        # A row the queue shows from before our last append for it waits for the queue.
        due = [row[2] for row in rows if row[2] is not None and row[2] not in self._stale]
        return due[:limit]

    def _later(self, message_id: uuid.UUID, seconds: float) -> None:
        self._not_before[message_id] = time.monotonic() + max(0.0, seconds)

    async def _deliver(self, providers: Providers, reply: Reply) -> None:
        try:
            await self._attempt(providers, reply)
        except Exception as exc:
            if _database_trouble(exc):
                log.warning("reply %s: database unavailable (%s); later", reply.message_id, exc)
                self._later(reply.message_id, 1.0)
                return
            log.exception("reply %s: unexpected error; retrying later", reply.message_id)
            self._later(reply.message_id, 5.0)

    async def _attempt(self, providers: Providers, reply: Reply) -> None:
        """Decide and act until the reply is settled or must wait: after a transient failure
        the ledger decides again at once (another attempt may already be due, or none may
        come: then the reply's failure is recorded now, not at the next look)."""
        while True:
            decision, checkpoint = await self.ledger.begin(reply)
            if checkpoint is not None:
                self._stale[reply.message_id] = checkpoint
            if isinstance(decision, Settled):
                self._later(reply.message_id, 1.0)  # the queue has not caught up yet
                return
            if isinstance(decision, Wait):
                self._later(reply.message_id, (decision.until - _now()).total_seconds())
                return
            if isinstance(decision, GiveUp):
                self.stats.failed += 1
                log.warning(
                    "reply %s on %s failed (%s): %s",
                    reply.message_id,
                    reply.connection.name,
                    decision.reason,
                    decision.error,
                )
                return
            assert isinstance(decision, Attempt)
            if decision.local:
                self.stats.delivered += 1
                return
            # ReplyAttempted is committed: only now may the provider be called.
            self.stats.attempts += 1
            result = await providers.send(reply)
            payload = self._outcome(reply, decision.attempt, result)
            event = self.ledger.outcome(reply, payload)
            self._stale[reply.message_id] = await self._record(reply, event)
            self._log_outcome(reply, decision.attempt, result)
            if isinstance(payload, ReplyFailed):
                self.stats.failed += 1
                return
            if isinstance(payload, ReplyDelivered):
                self.stats.delivered += 1
                return
            self.stats.retried += 1

    def _outcome(self, reply: Reply, attempt: int, result: SendResult) -> msgspec.Struct:
        now = _now()
        cid, mid = reply.conversation_id, reply.message_id
        if result.ok:
            return ReplyDelivered(cid, mid, attempt, now, result.provider_message_id)
        error = result.error or "unknown error"
        if result.permanent:
            return ReplyFailed(cid, mid, attempt, now, "permanent", error, result.status)
        policy = self.settings.policy
        wait = policy.backoff(attempt, self.rng)
        if result.retry_after is not None:
            wait = max(wait, result.retry_after)
        if result.maybe_sent and reply.channel in META_CHANNELS:
            wait = max(wait, policy.in_doubt_after)  # give its echo the time to arrive
        retry_at = now + dt.timedelta(seconds=wait)
        return ReplyAttemptFailed(
            cid, mid, attempt, now, error, retry_at, result.status, result.maybe_sent
        )

    async def _record(self, reply: Reply, event: Any) -> Checkpoint:
        """Append an attempt's outcome, retrying through database trouble: a provider's answer
        is worth waiting for (the same event is appended, so it is stored once)."""
        delay = 0.1
        while True:
            try:
                return await self.ledger.record(reply, event)
            except Exception as exc:
                if not _database_trouble(exc):
                    raise
                log.warning(
                    "reply %s: cannot record the outcome yet (%s); retrying", reply.message_id, exc
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    @staticmethod
    def _log_outcome(reply: Reply, attempt: int, result: SendResult) -> None:
        if result.ok:
            log.info(
                "reply %s on %s delivered (attempt %d)",
                reply.message_id,
                reply.connection.name,
                attempt,
            )
        else:
            log.warning(
                "reply %s on %s attempt %d failed (%s%s): %s",
                reply.message_id,
                reply.connection.name,
                attempt,
                "permanent" if result.permanent else "transient",
                ", may have been sent" if result.maybe_sent else "",
                result.error,
            )


async def _wait(
    stop: asyncio.Event,
    wake: asyncio.Event | None,
    timeout: float,
    done: asyncio.Event | None = None,
) -> None:
    """Wait ``timeout`` seconds, or less if ``stop``, ``wake`` or ``done`` is set first."""
    if stop.is_set():
        return
    events = [e for e in (stop, wake, done) if e is not None]
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    for event in (wake, done):
        if event is not None:
            event.clear()


async def run_delivery(
    pool: AsyncConnectionPool[Any],
    settings: DeliverySettings | None = None,
    *,
    stop: asyncio.Event | None = None,
) -> Outcome:
    """Run a delivery daemon on ``pool`` until ``stop`` (see :class:`DeliveryDaemon`)."""
    return await DeliveryDaemon(pool, settings).run(stop or asyncio.Event())


# --------------------------------------------------------------------------- command line


def _deliver_command(args: argparse.Namespace) -> int:
    from eventstore import open_pool, require_current_schema, resolve_database_url

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr
    )
    data_dir = getattr(args, "data_dir", None)
    url = resolve_database_url(
        args.database_url,
        data_dir=Path(data_dir) if data_dir else None,
        announce=lambda line: print(line, file=sys.stderr),
    )
    require_current_schema(url)
    policy = RetryPolicy(
        max_attempts=args.max_attempts,
        base_delay=args.base_delay,
        max_delay=args.max_delay,
        in_doubt_after=args.in_doubt_after,
        max_age=args.max_age,
    )
    settings = DeliverySettings.from_env(
        timeout=args.timeout,
        concurrency=args.concurrency,
        policy=policy,
        poll_interval=args.poll_interval,
        standby_interval=args.standby_interval,
    )

    async def work() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        pool = await open_pool(url, min_size=2, max_size=min(32, 6 + settings.concurrency // 2))
        try:
            daemon = DeliveryDaemon(pool, settings)
            outcome = await daemon.run(stop)
        finally:
            await pool.close()
        log.info(
            "delivery: %s (this process: %d attempts, %d delivered, %d failed)",
            outcome,
            daemon.stats.attempts,
            daemon.stats.delivered,
            daemon.stats.failed,
        )
        return 1 if outcome == "failed" else 0

    try:
        return asyncio.run(work())
    except ValueError as exc:
        print(f"convstore: {exc}", file=sys.stderr)
        return 2


def register(commands: Any) -> None:
    """Add ``deliver`` to the ``convstore`` command line (``commands``: its subparsers)."""
    defaults = RetryPolicy()
    deliver = commands.add_parser(
        "deliver",
        help="send queued agent replies to Messenger, Instagram, Telegram and the widget",
        description=(
            "Run the delivery daemon: one instance leads (the others stand by), sends each"
            " queued reply with retries, and records every attempt and outcome as events."
            " Provider URLs: CONVSTORE_GRAPH_API_URL, CONVSTORE_TELEGRAM_API_URL."
        ),
    )
    deliver.add_argument("--concurrency", type=int, default=32, help="replies in flight at once")
    deliver.add_argument("--timeout", type=float, default=10.0, help="seconds per provider call")
    deliver.add_argument("--max-attempts", type=int, default=defaults.max_attempts)
    deliver.add_argument(
        "--base-delay", type=float, default=defaults.base_delay, help="first retry's delay (s)"
    )
    deliver.add_argument(
        "--max-delay", type=float, default=defaults.max_delay, help="longest retry delay (s)"
    )
    deliver.add_argument(
        "--in-doubt-after",
        type=float,
        default=defaults.in_doubt_after,
        help="seconds before an attempt without an outcome is resent (once at most)",
    )
    deliver.add_argument(
        "--max-age",
        type=float,
        default=defaults.max_age,
        help="seconds after which an unsent reply fails as expired",
    )
    deliver.add_argument("--poll-interval", type=float, default=0.5)
    deliver.add_argument("--standby-interval", type=float, default=1.0)
    deliver.set_defaults(run=_deliver_command)
