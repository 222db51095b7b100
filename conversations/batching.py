"""Concurrent deliveries share one statement: the first step of ``receive_inbound``, batched.

Under load a delivery's cost is mostly per statement, not per row: the round trip, the
executor's start-up, the commit and its WAL flush. :class:`InboundBatcher` runs at most
``max_in_flight`` of these statements at once (half the pool, at most 8, by default). A
delivery that finds a slot free runs alone at once, exactly as it would unbatched, so a server
that is not saturated adds no latency; deliveries that arrive while every slot is taken wait
together and go as one statement at the next free slot. Each caller still waits for its own
row, and gets it only after the statement committed.

The statement is ``receive_inbound``'s first step for each delivery: read the key (its
connection, current conversation, stream version, contact, and whether the message is already
stored) and, when the conversation is open, insert the message at the stream's next version.
It has two forms: :data:`RECEIVE_ONE` with scalar parameters for a delivery alone, and the
``receive_inbound_batch`` function (``sql/0005``) over arrays for a batch.
They are kept apart because each is cheapest for its case: PostgreSQL re-planned the array
form on every execution as a prepared statement, so it lives in a function pinned to a generic
plan, and that plan with its function call costs a lone delivery about 40% more server time
than the scalar statement.

Deliveries for the same stream in one batch take its next versions in batch order; two of one
message go in once. A delivery that read a version another statement took meanwhile fails on
the ``events_stream_version_key`` unique index, as any lost race does, and its caller retries
from a fresh read. When a batch's statement fails as a whole (such a unique violation, raised
by one delivery), every caller in it is told so with :class:`BatchFailed` and runs its delivery
alone, so an error reaches only the delivery that caused it.

A delivery alone to a key whose last delivery left its conversation open first tries
:data:`RECEIVE_TO_OPEN`, from what the service saw then (:class:`OpenHint`: the conversation,
its contact, its stream's version): one insert at the next version, with no reading of the key.
When it appends nothing, :data:`RECEIVE_ONE` runs next on the same connection and decides. The
hint only picks which statement goes first: the database checks the same things either way, so
a stale hint costs one statement more, never a wrong outcome. In a batch, each key's first
delivery, when hinted, goes in :data:`RECEIVE_TO_OPEN_MANY`, one insert for all of them; the
batch's other deliveries, and the hinted ones it did not append, then go in the reading
statement on the same connection, in batch order. The insert commits first, so when the
reading statement then fails, the deliveries the insert stored get their results; only the
others hear :class:`BatchFailed` (a retry would find their message stored and call it a
duplicate).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from typing import Any, Final, NamedTuple

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import AsyncConnectionPool

from .connections import Channel

__all__ = [
    "RECEIVE_MANY",
    "RECEIVE_ONE",
    "RECEIVE_ONE_CTES",
    "RECEIVE_TO_OPEN",
    "RECEIVE_TO_OPEN_MANY",
    "BatchFailed",
    "BatchResult",
    "FirstStep",
    "InboundBatcher",
    "InboundRow",
    "OpenHint",
    "receive_batch",
    "receive_many",
]

#: One row per delivery that names a registered connection: its index in the batch, then a
#: :class:`FirstStep`'s columns. The statement itself is ``receive_inbound_batch`` in
#: ``sql/0005_receive_inbound_batch.sql``.
RECEIVE_MANY: Final = """
SELECT * FROM receive_inbound_batch(
    %(connections)b::text[], %(psids)b::text[], %(event_ids)b::uuid[],
    %(data)b::text[], %(providers)b::text[], %(metadata)b::text[])
"""


# The insert of a delivery's first step, from the ``found`` row of the key: the message at the
# stream's next version, when the conversation is open (or snoozed, but not until this reply),
# the message is not stored and the stream is active.
_APPEND_FOUND = """
appended AS (
    INSERT INTO events (event_id, stream_id, stream_version, category, type, data, metadata)
    SELECT %(event_id)s, f.stream_id, f.version + 1, 'conversation', 'MessageReceived',
           %(data)s::jsonb || jsonb_build_object(
               'conversation_id', f.conversation_id,
               'provider', COALESCE(%(provider)s::text, f.channel)),
           %(metadata)s::jsonb
    FROM found f
    WHERE f.stored_in IS NULL
      AND (f.status = 'open' OR (f.status = 'snoozed' AND NOT f.snooze_until_reply))
      AND EXISTS (SELECT FROM streams s WHERE s.stream_id = f.stream_id AND s.state = 'active')
    RETURNING 1
)
"""

_FOUND_BY_CONNECTION = """
WITH found AS (
    SELECT c.channel, c.reopen_policy, c.reopen_window,
           r.conversation_id, r.stream_id,
           v.status, v.deleted, v.closed_at, v.snoozed_until, v.snooze_until_reply,
           (SELECT max(m.stream_version) FROM events m WHERE m.stream_id = r.stream_id)
               AS version,
           k.contact_id,
           (SELECT e.stream_id FROM events e WHERE e.event_id = %(event_id)s) AS stored_in
    FROM connections c
    LEFT JOIN stream_reservations r ON r.connection = c.name AND r.psid = %(psid)s
    LEFT JOIN conversations v ON v.conversation_id = r.conversation_id
    LEFT JOIN contact_keys k ON k.connection = c.name AND k.psid = %(psid)s
    WHERE c.name = %(connection)s
),"""

#: The reading and the insert of :data:`RECEIVE_ONE`, as the ``found`` and ``appended``
#: common table expressions, for statements that go on with more of them.
RECEIVE_ONE_CTES: Final = _FOUND_BY_CONNECTION + _APPEND_FOUND

_SELECT_FOUND = "SELECT EXISTS (SELECT FROM appended), f.* FROM found f\n"

#: One delivery's first step, as a :class:`FirstStep` row (none when the connection is not
#: registered): the same statement as the body of ``receive_inbound_batch``, with scalar
#: parameters.
RECEIVE_ONE: Final = RECEIVE_ONE_CTES + _SELECT_FOUND

# A delivery to a key whose conversation the service last saw open, from what it saw: the
# conversation, its contact and its stream's version. One insert at the next version, read from
# three rows by their keys, with no reading of the key: the message's data comes filled in, and
# the stream's previous event stands in for the max() probe, since UNIQUE (stream_id,
# stream_version) refuses a version that is taken, as it does for every append. An open
# conversation is its key's current one: conversations_one_open_per_key allows one per key, and
# every command that opens or reopens one points the reservation at it.
#
# It appends only when the conversation is still open (or snoozed, but not until this reply)
# and still the contact's, and the stream is active and at that version. Otherwise it appends
# nothing, or it fails on events_event_id_key (a redelivery) or events_stream_version_key (a
# version taken since), having taken a position from the sequence: a gap, as after any
# rollback, which readers of the log never wait on. Either way RECEIVE_ONE runs next and
# decides, as without the hint.
#
# The contact is compared with IS NOT DISTINCT FROM, which no index serves, so that the plan
# finds the conversation by its primary key: with "=", PostgreSQL's generic plan may take the
# contact's index and read every conversation the contact ever had.
#
# Measured on one connection, in six interleaved runs of 3000 deliveries each: a median of 158
# us of server CPU a delivery against 190 for the reading form it replaces (reservation and
# conversation read in a common table expression, the max() and event id probes).
#
# The stream's state is read as the store's exact append reads it: through streams_inactive_idx,
# the partial index of the few streams that are not active (sql/0011), which for an active
# stream finds nothing and fetches no row. The stream's previous event shows that it exists.
RECEIVE_TO_OPEN: Final = """
INSERT INTO events (event_id, stream_id, stream_version, category, type, data, metadata)
SELECT %(event_id)s, p.stream_id, p.stream_version + 1, 'conversation', 'MessageReceived',
       %(data)s::jsonb, %(metadata)s::jsonb
FROM events p, conversations v
WHERE p.stream_id = %(stream_id)s AND p.stream_version = %(version)s
  AND v.conversation_id = %(conversation_id)s AND v.contact_id IS NOT DISTINCT FROM %(contact_id)s
  AND (v.status = 'open' OR (v.status = 'snoozed' AND NOT v.snooze_until_reply))
  AND NOT EXISTS (
      SELECT FROM streams s WHERE s.stream_id = %(stream_id)s AND s.state <> 'active'
  )
RETURNING stream_version
"""

# RECEIVE_TO_OPEN for several deliveries in one statement (and one commit), each to a different
# stream: a batch's hinted deliveries. It appends the rows whose checks hold and returns their
# event ids; the others append nothing and go on to the reading statement. A row whose version
# was taken since (by a statement in flight, or committed after this one's snapshot) is skipped
# by ON CONFLICT and goes on to the reading statement too, so one stale hint does not waste the
# others (measured at 32 callers: no cost that runs could tell apart). A redelivery still fails
# the whole statement on events_event_id_key, and then every row goes on to the reading
# statement, which decides for each. The checks sit in a LATERAL subquery that OFFSET 0 keeps
# from being flattened into the join: each delivery's rows are then found by their keys, as
# RECEIVE_TO_OPEN finds them, and never by a hash join over a whole table (which the planner
# chose for a small conversations table, guessing ten deliveries).
RECEIVE_TO_OPEN_MANY: Final = """
INSERT INTO events (event_id, stream_id, stream_version, category, type, data, metadata)
SELECT h.event_id, h.stream_id, next.version, 'conversation', 'MessageReceived',
       h.data::jsonb, h.metadata::jsonb
FROM unnest(%(event_ids)b::uuid[], %(stream_ids)b::text[], %(versions)b::bigint[],
            %(conversation_ids)b::uuid[], %(contact_ids)b::uuid[], %(data)b::text[],
            %(metadata)b::text[]) WITH ORDINALITY
        AS h(event_id, stream_id, version, conversation_id, contact_id, data, metadata, ord),
     LATERAL (
        SELECT p.stream_version + 1 AS version
        FROM events p, conversations v
        WHERE p.stream_id = h.stream_id AND p.stream_version = h.version
          AND v.conversation_id = h.conversation_id
          AND v.contact_id IS NOT DISTINCT FROM h.contact_id
          AND (v.status = 'open' OR (v.status = 'snoozed' AND NOT v.snooze_until_reply))
          AND NOT EXISTS (
              SELECT FROM streams s WHERE s.stream_id = h.stream_id AND s.state <> 'active'
          )
        OFFSET 0
     ) AS next
ORDER BY h.ord
ON CONFLICT (stream_id, stream_version) DO NOTHING
RETURNING event_id
"""

#: The errors of :data:`RECEIVE_TO_OPEN` that only mean "not this way": its message is stored
#: already, or its version was taken since the service saw the stream.
_HINT_REFUSED: Final = frozenset({"events_event_id_key", "events_stream_version_key"})


class FirstStep(NamedTuple):
    """A delivery's first step: whether it appended the message, then its key as read.

    The columns of :data:`RECEIVE_ONE` and of ``receive_inbound_batch`` after ``ord``, in their
    order. After an append by :data:`RECEIVE_TO_OPEN`, which reads nothing, only what the hint
    knew is filled in: the channel, the conversation, its stream, the version before the
    message and the contact; the rest is ``None``.
    """

    appended: bool
    channel: Channel
    reopen_policy: str | None
    reopen_window: dt.timedelta | None
    conversation_id: uuid.UUID | None
    stream_id: str | None
    status: str | None
    deleted: bool | None
    closed_at: dt.datetime | None
    snoozed_until: dt.datetime | None
    snooze_until_reply: bool | None
    version: int | None
    contact_id: uuid.UUID | None
    #: the stream that already holds the message (a redelivery), else ``None``
    stored_in: str | None


class OpenHint(NamedTuple):
    """What a service saw of a key's conversation when its last delivery left it open."""

    channel: Channel
    conversation_id: uuid.UUID
    #: the conversation's stream (kept: formatting a UUID costs more than the rest of a hint)
    stream_id: str
    contact_id: uuid.UUID
    #: the stream's version after that delivery
    version: int


class InboundRow(NamedTuple):
    """One delivery of a batch: the statement's parameters for it."""

    connection: str
    psid: str
    event_id: uuid.UUID
    data: str
    provider: str | None
    metadata: str
    #: what the service saw of the key's conversation when its last delivery left it open
    #: (``data`` then names that conversation): a delivery alone tries
    #: :data:`RECEIVE_TO_OPEN` first
    hint: OpenHint | None = None


class BatchFailed(Exception):
    """The batch's statement failed as a whole; run this delivery alone."""


def _params_of(rows: list[InboundRow]) -> dict[str, list[Any]]:
    """The statement's array parameters for ``rows``."""
    return {
        "connections": [r.connection for r in rows],
        "psids": [r.psid for r in rows],
        "event_ids": [r.event_id for r in rows],
        "data": [r.data for r in rows],
        "providers": [r.provider for r in rows],
        "metadata": [r.metadata for r in rows],
    }


async def receive_many(
    pool: AsyncConnectionPool[Any], rows: list[InboundRow]
) -> list[FirstStep | None]:
    """The first step for ``rows``; per row its result, or ``None`` when the row's connection
    is not registered. One statement for rows without hints; hinted rows go first in one
    insert, and the rest follow in one reading statement. When that statement fails after the
    insert appended some rows, those stay stored and its error is raised: a caller that must
    tell the rows apart uses :func:`receive_batch`."""
    if len(rows) == 1:
        # A delivery alone, the common case, decides as receive_batch would, without its
        # bookkeeping.
        (one,) = rows
        async with pool.connection() as conn:
            if one.hint is not None:
                appended = await _receive_hinted(conn, one, one.hint)
                if appended is not None:
                    return [appended]
            return [await _receive_one(conn, one)]
    batch = await receive_batch(pool, rows)
    if batch.failure is not None:
        raise batch.failure
    return batch.results


class BatchResult(NamedTuple):
    """What :func:`receive_batch` decided: a result per row, except the ``undecided`` rows
    when the reading statement failed (with ``failure``) after the insert appended others."""

    results: list[FirstStep | None]
    failure: Exception | None = None
    undecided: frozenset[int] = frozenset()


async def receive_batch(pool: AsyncConnectionPool[Any], rows: list[InboundRow]) -> BatchResult:
    """The first step for ``rows``: the hinted ones in one insert, then the rest in
    one reading statement, both on one connection, each its own transaction.

    An error of the insert raises: it stored nothing. An error of the reading statement
    raises too when the insert appended nothing; otherwise the rows the insert appended keep
    their results (they are stored, and their callers must hear so, not retry into
    "duplicate") and the error comes back with the rows it left undecided.
    """
    results: list[FirstStep | None] = [None] * len(rows)
    async with pool.connection() as conn:
        # Each key's first delivery, when hinted, goes in one insert; the rest, and those it
        # did not append, are read and decided after it, in batch order.
        first: dict[tuple[str, str], int] = {}
        for i, row in enumerate(rows):
            first.setdefault((row.connection, row.psid), i)
        hinted = [(i, hint) for i in first.values() if (hint := rows[i].hint) is not None]
        if len(hinted) == 1:
            ((i, hint),) = hinted
            results[i] = await _receive_hinted(conn, rows[i], hint)
        elif hinted:
            for i, hint in await _receive_hinted_many(conn, rows, hinted):
                results[i] = _hinted_step(hint)
        rest = [i for i, step in enumerate(results) if step is None]
        try:
            if len(rest) == 1:
                (i,) = rest
                results[i] = await _receive_one(conn, rows[i])
            elif rest:
                cur = await conn.execute(RECEIVE_MANY, _params_of([rows[i] for i in rest]))
                for row in await cur.fetchall():
                    results[rest[row[0] - 1]] = FirstStep(*row[1:])
        except Exception as exc:
            if len(rest) == len(rows):
                raise
            return BatchResult(results, exc, frozenset(rest))
    return BatchResult(results)


async def _receive_one(conn: psycopg.AsyncConnection[Any], row: InboundRow) -> FirstStep | None:
    """:data:`RECEIVE_ONE` for ``row``: its step, or ``None`` when its connection is not
    registered."""
    # The row's field names are the statement's parameter names.
    cur = await conn.execute(RECEIVE_ONE, row._asdict())
    found = await cur.fetchone()
    return None if found is None else FirstStep(*found)


async def _receive_hinted_many(
    conn: psycopg.AsyncConnection[Any],
    rows: list[InboundRow],
    hinted: list[tuple[int, OpenHint]],
) -> list[tuple[int, OpenHint]]:
    """:data:`RECEIVE_TO_OPEN_MANY` for ``rows[i]`` with ``hint``, for each ``(i, hint)`` of
    ``hinted`` (each of a different key): those it appended."""
    params = {
        "event_ids": [rows[i].event_id for i, _ in hinted],
        "stream_ids": [hint.stream_id for _, hint in hinted],
        "versions": [hint.version for _, hint in hinted],
        "conversation_ids": [hint.conversation_id for _, hint in hinted],
        "contact_ids": [hint.contact_id for _, hint in hinted],
        "data": [rows[i].data for i, _ in hinted],
        "metadata": [rows[i].metadata for i, _ in hinted],
    }
    try:
        cur = await conn.execute(RECEIVE_TO_OPEN_MANY, params)
    except pg_errors.UniqueViolation as exc:
        if exc.diag.constraint_name in _HINT_REFUSED:
            return []
        raise
    stored = {event_id for (event_id,) in await cur.fetchall()}
    return [(i, hint) for i, hint in hinted if rows[i].event_id in stored]


async def _receive_hinted(
    conn: psycopg.AsyncConnection[Any], row: InboundRow, hint: OpenHint
) -> FirstStep | None:
    """:data:`RECEIVE_TO_OPEN` for ``row``: the step when it appended (what the hint knew), else
    ``None``."""
    params = {
        "event_id": row.event_id,
        "stream_id": hint.stream_id,
        "version": hint.version,
        "conversation_id": hint.conversation_id,
        "contact_id": hint.contact_id,
        "data": row.data,
        "metadata": row.metadata,
    }
    try:
        cur = await conn.execute(RECEIVE_TO_OPEN, params)
    except pg_errors.UniqueViolation as exc:
        if exc.diag.constraint_name in _HINT_REFUSED:
            return None
        raise
    if await cur.fetchone() is None:
        return None
    return _hinted_step(hint)


def _hinted_step(hint: OpenHint) -> FirstStep:
    """The step of a delivery appended from ``hint``: what the hint knew, the rest ``None``."""
    return FirstStep(
        appended=True,
        channel=hint.channel,
        reopen_policy=None,
        reopen_window=None,
        conversation_id=hint.conversation_id,
        stream_id=hint.stream_id,
        status=None,
        deleted=None,
        closed_at=None,
        snoozed_until=None,
        snooze_until_reply=None,
        version=hint.version,
        contact_id=hint.contact_id,
        stored_in=None,
    )


class InboundBatcher:
    """Runs the first step of concurrent deliveries, at most ``max_in_flight`` statements at once.

    A call that finds a free slot and nobody waiting runs alone at once; otherwise it waits for
    the next free slot with everyone who came meanwhile. ``max_in_flight`` defaults to half the
    pool's size, leaving the rest for the statements that follow (opening conversations) and
    for everything else the pool serves, and to at most 8. More statements in flight than the
    server has cores only queue there, each with its own commit, where waiting here would let
    them share one: with 32 concurrent callers, 10% of them first messages, 8 in flight took
    5,300-6,300 deliveries/s and 32 in flight 3,300-4,800 (2 cores, embedded PostgreSQL 18).
    At 8 callers the cap does not bind, and a lower one measured slower: 4 or 6 in flight gave
    0.45-0.51 of the plain INSERT reference against 0.55-0.59 for 8.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        *,
        max_in_flight: int | None = None,
        max_batch: int = 200,
    ) -> None:
        self.pool = pool
        self.max_in_flight = max_in_flight or max(1, min(8, pool.max_size // 2))
        self.max_batch = max_batch
        self._waiting: list[tuple[InboundRow, asyncio.Future[FirstStep | None]]] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        #: statements run and deliveries they carried (their ratio is the batching achieved)
        self.statements = 0
        self.deliveries = 0

    async def receive(self, row: InboundRow) -> FirstStep | None:
        """The delivery's result row, once its statement committed.

        Raises :class:`BatchFailed` when it went in a batch that failed; alone, its own error.
        """
        if self._in_flight < self.max_in_flight and not self._waiting:
            # A free slot and nobody waiting: run it here, as it would run unbatched (no task,
            # no future); its errors are its own.
            self._in_flight += 1
            self.statements += 1
            self.deliveries += 1
            try:
                return (await receive_many(self.pool, [row]))[0]
            finally:
                self._in_flight -= 1
                self._start()
        future: asyncio.Future[FirstStep | None] = asyncio.get_running_loop().create_future()
        self._waiting.append((row, future))
        self._start()
        return await future

    def _start(self) -> None:
        while self._waiting and self._in_flight < self.max_in_flight:
            batch = self._waiting[: self.max_batch]
            del self._waiting[: self.max_batch]
            self._in_flight += 1
            self.statements += 1
            self.deliveries += len(batch)
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[InboundRow, asyncio.Future[FirstStep | None]]]) -> None:
        try:
            # One row or many: receive_batch raises whenever nothing it stored would be lost.
            done = await receive_batch(self.pool, [row for row, _ in batch])
        except BaseException as exc:
            # Whatever failed, each caller learns it and runs its own delivery alone, where
            # its error (if it is its own) reaches only it. The cause is kept for debugging.
            for _, future in batch:
                if not future.done():
                    failed = BatchFailed(f"a batch of {len(batch)} deliveries failed")
                    failed.__cause__ = exc
                    future.set_exception(failed)
            if not isinstance(exc, Exception):
                raise
        else:
            for i, ((_, future), result) in enumerate(zip(batch, done.results, strict=True)):
                if future.done():  # a cancelled caller no longer waits
                    continue
                if i in done.undecided:
                    failed = BatchFailed(f"a batch of {len(batch)} deliveries failed in part")
                    failed.__cause__ = done.failure
                    future.set_exception(failed)
                else:
                    future.set_result(result)
        finally:
            self._in_flight -= 1
            self._start()
