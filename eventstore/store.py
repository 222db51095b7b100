"""The event store: append with expected versions, read a stream, read and follow the global log.

Global order and the snapshot-xmin fence
----------------------------------------
Positions come from an identity sequence, so they are handed out in the order statements run,
not the order transactions commit: a reader that simply follows ``position`` can pass position 11
(committed) while position 10 (still in flight) later commits, and skip 10 for ever. Readers here
order by ``(transaction_id, position)`` and read only rows whose ``transaction_id`` is below
``pg_snapshot_xmin(pg_current_snapshot())``, the oldest transaction still running. Every
transaction below that bound has ended, so no row can later appear before a checkpoint a reader
has passed: the order is stable and nothing is skipped. The cost is latency: a long transaction
holds every reader back, hence ``idle_in_transaction_session_timeout`` on our sessions and short
append transactions. Nothing shared is locked by appends (no table lock, no counter row, no
NOTIFY inside the transaction), so they scale with connections.

Waking subscribers
------------------
A NOTIFY inside the append transaction takes a cluster-wide lock at commit (measured here: appends
capped at 2-4k/s instead of 10k). The store instead sends one coalesced NOTIFY after commit, at
most every ``notify_interval`` seconds per process; subscribers also poll as a safety net.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import decimal
import json
import random
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any, Final, LiteralString, NamedTuple, cast

import msgspec
import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool

from .codec import EventCodec
from .errors import (
    DuplicateEvent,
    InvalidAppend,
    StreamDeleted,
    WrongExpectedVersion,
    raise_translated,
    translate_errors,
)
from .records import (
    ANY,
    NO_STREAM,
    START,
    STREAM_EXISTS,
    AppendResult,
    Checkpoint,
    ExpectedVersion,
    NewEvent,
    RecordedEvent,
    StreamState,
    category_of,
)

__all__ = ["NOTIFY_CHANNEL", "Direction", "EventStore"]

NOTIFY_CHANNEL: Final = "convstore_events"

Direction = str  # "forwards" | "backwards"

_GENERIC_JSON = msgspec.json.Decoder(dict[str, Any])
_JSON = msgspec.json.Encoder()

# A stream's version is the highest ``stream_version`` of its events, and UNIQUE (stream_id,
# stream_version) is what makes an expected-version check atomic: two appends that read the
# same version both try to insert the next one, and the unique index lets one of them commit.
# The ``streams`` row (category, state) is written once, with the stream's first events, so an
# append to an existing stream writes one row and its index entries, not a second row too
# (measured in quick bench runs: conversation ingest went from 0.32-0.42 of a plain INSERT
# with the version row to 0.34-0.51 without it).
#
# Each variant yields the base version in ``bumped``, or no row when the expected version does
# not hold (or the stream is not active): the INSERT then selects nothing and takes no sequence
# value, so a stale expected version is refused before any position is allocated. Only a writer
# that races another to the same version takes one, and fails on events_stream_version_key.
# The arrays are bound in binary (%b): psycopg's text array dumper escapes every quote of the
# JSON with a regex, which was 85% of a 100-event append's client CPU (profiled).
_INSERT_EVENTS: LiteralString = """
INSERT INTO events (event_id, stream_id, stream_version, category, type, data, metadata)
SELECT e.event_id, %(stream_id)s, bumped.base + e.ord, %(category)s, e.type, e.data, e.metadata
FROM bumped,
     unnest(%(event_ids)b::uuid[], %(types)b::text[], %(data)b::jsonb[], %(metadata)b::jsonb[])
        WITH ORDINALITY AS e(event_id, type, data, metadata, ord)
ORDER BY e.ord
RETURNING position, transaction_id::text::bigint, stream_version
"""

# The stream's state is read through streams_inactive_idx, a partial index of the few streams
# that are not active (sql/0011): an append to an active stream finds nothing there and reads
# no streams row. An exact expected version is at least 1, so a matching version also means
# the stream exists.
_BUMP_EXACT: LiteralString = """
WITH bumped AS (
    SELECT %(expected)s::bigint AS base
    WHERE (SELECT max(stream_version) FROM events WHERE stream_id = %(stream_id)s)
          = %(expected)s
      AND NOT EXISTS (
          SELECT FROM streams WHERE stream_id = %(stream_id)s AND state <> 'active'
      )
)
"""

_BUMP_EXISTS: LiteralString = """
WITH bumped AS (
    SELECT (SELECT COALESCE(max(stream_version), 0) FROM events
            WHERE stream_id = %(stream_id)s) AS base
    FROM streams WHERE stream_id = %(stream_id)s AND state = 'active'
)
"""

_BUMP_NEW: LiteralString = """
WITH bumped AS (
    INSERT INTO streams (stream_id, category) VALUES (%(stream_id)s, %(category)s)
    ON CONFLICT (stream_id) DO NOTHING
    RETURNING 0::bigint AS base
)
"""

# The stream is created, or (when it exists, which the statement's snapshot then shows) read.
# A stream created concurrently by a transaction this snapshot cannot see yields no row: the
# append is retried from a fresh read, as after a race to the same version.
_BUMP_ANY: LiteralString = """
WITH created AS (
    INSERT INTO streams (stream_id, category) VALUES (%(stream_id)s, %(category)s)
    ON CONFLICT (stream_id) DO NOTHING
    RETURNING 0::bigint AS base
),
bumped AS (
    SELECT base FROM created
    UNION ALL
    SELECT (SELECT COALESCE(max(stream_version), 0) FROM events
            WHERE stream_id = %(stream_id)s)
    FROM streams WHERE stream_id = %(stream_id)s AND state = 'active'
)
"""

# One event, the common case, takes scalar parameters: dumping four one-element arrays cost
# more client CPU than the rest of the append (profiled).
_INSERT_ONE: LiteralString = """
INSERT INTO events (event_id, stream_id, stream_version, category, type, data, metadata)
SELECT %(event_id)s, %(stream_id)s, bumped.base + 1, %(category)s, %(type)s,
       %(data)s::jsonb, %(metadata)s::jsonb
FROM bumped
RETURNING position, transaction_id::text::bigint, stream_version
"""

_STREAM_VERSION: LiteralString = (
    "SELECT COALESCE(max(stream_version), 0) FROM events WHERE stream_id = %s"
)

#: PostgreSQL's largest bigint: versions must stay within it, and a larger read limit reads as it.
_MAX_BIGINT: Final = 2**63 - 1


def _require_utf8(text: str, what: str) -> None:
    """Refuse a string PostgreSQL cannot store: with a lone surrogate it is not UTF-8."""
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        raise InvalidAppend(f"{what} is not valid Unicode ({exc.reason}): {text!r}") from exc


def _exact_json(data: bytes | str) -> Any:
    """Any JSON value, every number a Decimal: exact as written, whatever its size.

    Only for the rare comparison below: msgspec refuses integers longer than Python's string
    conversion limit, which jsonb writes out for a number like 1e5000.
    """
    return json.loads(data, parse_int=decimal.Decimal, parse_float=decimal.Decimal)


def _same_json(a: Any, b: Any) -> bool:
    """Whether two decoded JSON values are the same value, as jsonb compares them.

    Python's ``==`` takes ``true`` for ``1`` and ``false`` for ``0``; jsonb does not. Numbers
    compare by value (``1`` and ``1.0`` alike), decoded exactly, so ``0.3`` and
    ``0.30000000000000001`` differ, as the jsonb numerics stored for them do.
    """
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a is b
    if isinstance(a, decimal.Decimal) and isinstance(b, decimal.Decimal):
        return a == b
    if isinstance(a, str) and isinstance(b, str):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_same_json, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(v, b[k]) for k, v in a.items())
    return False


#: How often an ANY or STREAM_EXISTS append tries before it gives up a race to the same version
#: (each try one winner among the racers; losers back off with jitter, so many racers spread).
_RACE_ATTEMPTS: Final = 100

# (mode, single event) -> statement
_APPEND: Final[dict[tuple[str, bool], LiteralString]] = {
    ("exact", False): _BUMP_EXACT + _INSERT_EVENTS,
    ("exists", False): _BUMP_EXISTS + _INSERT_EVENTS,
    ("new", False): _BUMP_NEW + _INSERT_EVENTS,
    ("any", False): _BUMP_ANY + _INSERT_EVENTS,
    ("exact", True): _BUMP_EXACT + _INSERT_ONE,
    ("exists", True): _BUMP_EXISTS + _INSERT_ONE,
    ("new", True): _BUMP_NEW + _INSERT_ONE,
    ("any", True): _BUMP_ANY + _INSERT_ONE,
}

# The column list of every event read, kept literal so no query text is ever assembled.
_READ_STREAM_FORWARDS: LiteralString = """
SELECT position, transaction_id::text::bigint, event_id, stream_id, stream_version,
       type, data, metadata, recorded_at
FROM events
WHERE stream_id = %(stream_id)s AND stream_version >= %(from_version)s
ORDER BY stream_version LIMIT %(limit)s
"""

_READ_STREAM_BACKWARDS: LiteralString = """
SELECT position, transaction_id::text::bigint, event_id, stream_id, stream_version,
       type, data, metadata, recorded_at
FROM events
WHERE stream_id = %(stream_id)s AND stream_version <= %(from_version)s
ORDER BY stream_version DESC LIMIT %(limit)s
"""

# ORDER BY names events.transaction_id: the select list's cast of it is output under the same
# name, and an unqualified ORDER BY would sort by that bigint, which no index serves.
_READ_ALL: LiteralString = """
SELECT position, transaction_id::text::bigint, event_id, stream_id, stream_version,
       type, data, metadata, recorded_at
FROM events
WHERE (transaction_id, position) > (%(tx)s::text::xid8, %(pos)s)
  AND transaction_id < pg_snapshot_xmin(pg_current_snapshot())
  {filters}
ORDER BY events.transaction_id, events.position
LIMIT %(limit)s
"""

_HEAD: LiteralString = """
SELECT transaction_id::text::bigint, position FROM events
WHERE transaction_id < pg_snapshot_xmin(pg_current_snapshot())
ORDER BY events.transaction_id DESC, events.position DESC
LIMIT 1
"""

_EventRow = tuple[int, int, uuid.UUID, str, int, str, bytes, bytes, dt.datetime]


class _LogFilter(NamedTuple):
    categories: Iterable[str] | None
    types: Iterable[str] | None
    streams: Iterable[str] | None
    since: dt.datetime | None
    until: dt.datetime | None
    skip_inactive_streams: bool


class EventStore:
    """An async event store on a psycopg connection pool.

    ``codec`` decodes stored data into payload objects (unregistered types become dicts unless
    the codec is strict). The pool's connections must be in autocommit mode with the raw JSON
    loaders of :func:`eventstore.database.open_pool`.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        codec: EventCodec | None = None,
        *,
        notify_interval: float = 0.02,
    ) -> None:
        self.pool = pool
        self.codec = codec or EventCodec()
        self._notify_interval = notify_interval
        self._notify_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ append

    async def append(
        self,
        stream_id: str,
        events: Sequence[NewEvent | msgspec.Struct],
        expected_version: ExpectedVersion | int = ANY,
        *,
        connection: psycopg.AsyncConnection[Any] | None = None,
    ) -> AppendResult:
        """Append ``events`` to ``stream_id`` if ``expected_version`` holds; one round trip.

        ``expected_version`` is :data:`ANY`, :data:`NO_STREAM`, :data:`STREAM_EXISTS` or the
        exact version of the stream's last event (0 for a stream with no events). Re-appending
        events whose ids are already stored returns the original result when they are the same
        events at the same place; otherwise :class:`DuplicateEvent`. With ``connection=``, the
        append joins the caller's transaction (the caller then commits, and may call
        :meth:`wake_subscribers` afterwards).
        """
        new_events = self._prepare(stream_id, events, expected_version)
        query, params = self._append_query(stream_id, new_events, expected_version)
        if connection is not None:
            # Read before the statement: outside a transaction, in autocommit, it commits on
            # its own, and then the subscribers may be woken.
            autocommitted = (
                connection.autocommit
                and connection.pgconn.transaction_status == TransactionStatus.IDLE
            )
            result = await self._append_on(
                connection, stream_id, new_events, expected_version, query, params
            )
            if autocommitted:
                self.wake_subscribers()
            return result
        with translate_errors():
            async with self.pool.connection() as conn:
                result = await self._append_on(
                    conn, stream_id, new_events, expected_version, query, params
                )
        self.wake_subscribers()
        return result

    def _prepare(
        self,
        stream_id: str,
        events: Sequence[NewEvent | msgspec.Struct],
        expected_version: ExpectedVersion | int,
    ) -> list[NewEvent]:
        if not isinstance(stream_id, str) or not stream_id or len(stream_id) > 500:
            raise InvalidAppend(
                f"stream id must be a non-empty string of at most 500 characters: {stream_id!r}"
            )
        if "\x00" in stream_id:
            raise InvalidAppend("stream id must not contain NUL characters")
        if not stream_id.isascii():
            _require_utf8(stream_id, "stream id")
        if not isinstance(expected_version, ExpectedVersion):
            if isinstance(expected_version, bool) or not isinstance(expected_version, int):
                raise InvalidAppend(
                    "expected version must be ANY, NO_STREAM, STREAM_EXISTS or an int,"
                    f" not {expected_version!r}"
                )
            if expected_version < 0:
                raise InvalidAppend(f"expected version must be >= 0, not {expected_version}")
            if expected_version > _MAX_BIGINT - 1:  # the next version must fit in a bigint
                raise InvalidAppend(f"expected version must be < 2**63 - 1, not {expected_version}")
        if not events:
            raise InvalidAppend(f"append to {stream_id!r} needs at least one event")
        prepared = [e if isinstance(e, NewEvent) else self.codec.new_event(e) for e in events]
        if len(prepared) > 1:
            ids = {e.event_id for e in prepared}
            if len(ids) != len(prepared):
                raise InvalidAppend(f"append to {stream_id!r} repeats an event id within the batch")
        for event in prepared:
            if not event.type:
                raise InvalidAppend("event type must be a non-empty string")
            if not event.type.isascii():
                _require_utf8(event.type, "event type")
        return prepared

    def _append_query(
        self,
        stream_id: str,
        events: Sequence[NewEvent],
        expected_version: ExpectedVersion | int,
    ) -> tuple[LiteralString, dict[str, Any]]:
        single = len(events) == 1
        params: dict[str, Any] = {"stream_id": stream_id, "category": category_of(stream_id)}
        try:
            if single:
                event = events[0]
                params["event_id"] = event.event_id
                params["type"] = event.type
                params["data"] = event.data.decode()
                params["metadata"] = _JSON.encode(event.metadata).decode()
            else:
                params["event_ids"] = [e.event_id for e in events]
                params["types"] = [e.type for e in events]
                params["data"] = [e.data.decode() for e in events]
                params["metadata"] = [_JSON.encode(e.metadata).decode() for e in events]
        except UnicodeDecodeError as exc:
            raise InvalidAppend(
                f"append to {stream_id!r}: event data must be JSON in UTF-8 ({exc.reason})"
            ) from exc
        except (TypeError, ValueError, msgspec.EncodeError) as exc:
            raise InvalidAppend(
                f"append to {stream_id!r}: event metadata cannot be encoded as JSON ({exc})"
            ) from exc
        if expected_version is ANY:
            mode = "any"
        elif expected_version is STREAM_EXISTS:
            mode = "exists"
        elif expected_version is NO_STREAM or expected_version == 0:
            mode = "new"
        else:
            mode = "exact"
            params["expected"] = expected_version
        return _APPEND[mode, single], params

    async def _append_on(
        self,
        conn: psycopg.AsyncConnection[Any],
        stream_id: str,
        events: Sequence[NewEvent],
        expected_version: ExpectedVersion | int,
        query: LiteralString,
        params: dict[str, Any],
    ) -> AppendResult:
        # Inside a caller's transaction a unique violation would abort it; a savepoint keeps it
        # usable so an idempotent retry can still be recognised and ANY can retry a lost race.
        # Exact versions and NO_STREAM fail the version check before inserting, so they need no
        # savepoint: only a race to the same version aborts the caller's transaction, and the
        # caller retries it from a fresh read.
        in_caller_tx = conn.pgconn.transaction_status == TransactionStatus.INTRANS
        retries_races = expected_version is ANY or expected_version is STREAM_EXISTS
        needs_savepoint = in_caller_tx and retries_races
        for attempt in range(_RACE_ATTEMPTS if retries_races else 1):
            last = attempt == _RACE_ATTEMPTS - 1 or not retries_races
            try:
                if needs_savepoint:
                    async with conn.transaction():
                        rows = await (await conn.execute(query, params)).fetchall()
                else:
                    rows = await (await conn.execute(query, params)).fetchall()
            except pg_errors.UniqueViolation as exc:
                if exc.diag.constraint_name == "events_stream_version_key":
                    # Another append took this version between our read and our insert.
                    if not last:
                        await asyncio.sleep(random.uniform(0, min(0.02, 0.001 * (attempt + 1))))
                        continue
                    if in_caller_tx and not needs_savepoint:
                        # The transaction is aborted, so the version cannot be read: the
                        # winner's append made it at least the one we tried to take.
                        actual = expected_version + 1 if isinstance(expected_version, int) else 1
                    else:
                        actual = await self._current_version(conn, stream_id)
                    raise WrongExpectedVersion(stream_id, expected_version, actual) from exc
                if exc.diag.constraint_name != "events_event_id_key":
                    raise_translated(exc)
                if in_caller_tx and not needs_savepoint:
                    # The caller's transaction is aborted, so which ids are stored cannot be
                    # looked up; an idempotent retry never gets here (its version check fails
                    # first).
                    raise DuplicateEvent(
                        stream_id,
                        [e.event_id for e in events],
                        "an event id of the batch is already stored; the transaction is aborted",
                    ) from exc
                return await self._resolve_rejected(conn, stream_id, events, expected_version, exc)
            except pg_errors.DataError as exc:
                # Class 22 (by SQLSTATE): data or metadata that is not valid JSON, or that
                # jsonb cannot store (a \u0000 escape). Nothing was stored.
                raise InvalidAppend(
                    f"append to {stream_id!r}: PostgreSQL refused the event data or metadata"
                    f" (SQLSTATE {exc.sqlstate}): events need valid JSON without \\u0000"
                ) from exc
            if rows:
                break
            try:
                return await self._resolve_rejected(conn, stream_id, events, expected_version, None)
            except WrongExpectedVersion as exc:
                # ANY never conflicts, and STREAM_EXISTS only when there is no stream: a row
                # missing for any other reason was a stream created by a transaction our
                # snapshot could not see yet. Read again.
                if last or exc.actual == 0:
                    raise
        if len(rows) == 1:  # the common case, without the generators below (profiled)
            ((position, transaction_id, version),) = rows
            return AppendResult(
                stream_id, version, (position,), (Checkpoint(transaction_id, position),)
            )
        rows.sort(key=lambda r: r[2])
        return AppendResult(
            stream_id=stream_id,
            version=rows[-1][2],
            positions=tuple(r[0] for r in rows),
            checkpoints=tuple(Checkpoint(r[1], r[0]) for r in rows),
        )

    async def _resolve_rejected(
        self,
        conn: psycopg.AsyncConnection[Any],
        stream_id: str,
        events: Sequence[NewEvent],
        expected_version: ExpectedVersion | int,
        cause: Exception | None,
    ) -> AppendResult:
        """Decide why an append stored nothing: an idempotent retry, a duplicate, or a conflict."""
        ids = [e.event_id for e in events]
        cur = await conn.execute(
            "SELECT event_id, stream_id, stream_version, type, data, position,"
            " transaction_id::text::bigint FROM events WHERE event_id = ANY(%s)",
            (ids,),
        )
        stored = {row[0]: row for row in await cur.fetchall()}
        if stored:
            error = self._idempotency_error(stream_id, events, expected_version, stored)
            if isinstance(error, WrongExpectedVersion):
                # The batch is stored, but after another version: report the stream's version.
                actual = await self._current_version(conn, stream_id)
                error = WrongExpectedVersion(stream_id, expected_version, actual)
            if error is not None:
                raise error from cause
            rows = [stored[i] for i in ids]
            return AppendResult(
                stream_id=stream_id,
                version=rows[-1][2],
                positions=tuple(r[5] for r in rows),
                checkpoints=tuple(Checkpoint(r[6], r[5]) for r in rows),
            )
        state_row = await (
            await conn.execute("SELECT state FROM streams WHERE stream_id = %s", (stream_id,))
        ).fetchone()
        if state_row is not None and state_row[0] != StreamState.ACTIVE:
            raise StreamDeleted(stream_id, state_row[0]) from cause
        actual = await self._current_version(conn, stream_id)
        raise WrongExpectedVersion(stream_id, expected_version, actual) from cause

    @staticmethod
    async def _current_version(conn: psycopg.AsyncConnection[Any], stream_id: str) -> int:
        """The version of the stream's last event as the connection sees it now (0: none)."""
        row = await (await conn.execute(_STREAM_VERSION, (stream_id,))).fetchone()
        return int(row[0]) if row else 0

    @staticmethod
    def _idempotency_error(
        stream_id: str,
        events: Sequence[NewEvent],
        expected_version: ExpectedVersion | int,
        stored: Mapping[uuid.UUID, tuple[Any, ...]],
    ) -> Exception | None:
        ids = [e.event_id for e in events]
        if len(stored) != len(ids):
            return DuplicateEvent(
                stream_id,
                [i for i in ids if i in stored],
                "the batch mixes new and already stored event ids; nothing was appended",
            )
        elsewhere = [i for i in ids if stored[i][1] != stream_id]
        if elsewhere:
            return DuplicateEvent(stream_id, elsewhere, "stored in another stream")
        for event in events:
            row = stored[event.event_id]
            if row[3] != event.type or not _same_json(_exact_json(row[4]), _exact_json(event.data)):
                return DuplicateEvent(stream_id, [event.event_id], "stored with other content")
        versions = [stored[i][2] for i in ids]
        first = versions[0]
        if versions != list(range(first, first + len(ids))):
            return DuplicateEvent(stream_id, ids, "stored, but not as one contiguous batch")
        original_base = first - 1
        if isinstance(expected_version, int) and expected_version != original_base:
            return WrongExpectedVersion(stream_id, expected_version, original_base + len(ids))
        if expected_version is NO_STREAM and original_base != 0:
            return WrongExpectedVersion(stream_id, expected_version, original_base + len(ids))
        return None

    # ------------------------------------------------------------------ streams

    async def read_stream(
        self,
        stream_id: str,
        from_version: int | None = None,
        direction: Direction = "forwards",
        limit: int = 10_000,
    ) -> list[RecordedEvent]:
        """Events of one stream in version order (``backwards``: newest first).

        ``from_version`` is inclusive; by default the start (forwards) or the end (backwards).
        A stream that does not exist reads as empty.
        """
        if direction not in ("forwards", "backwards"):
            raise ValueError(f"direction must be 'forwards' or 'backwards', not {direction!r}")
        if limit < 1:
            raise ValueError(f"limit must be positive, not {limit}")
        limit = min(limit, _MAX_BIGINT)
        forwards = direction == "forwards"
        if from_version is None:
            from_version = 1 if forwards else 2**62
        query = _READ_STREAM_FORWARDS if forwards else _READ_STREAM_BACKWARDS
        params = {"stream_id": stream_id, "from_version": from_version, "limit": limit}
        with translate_errors():
            async with self.pool.connection() as conn:
                rows = await (await conn.execute(query, params)).fetchall()
        return self._records(rows)

    async def stream_version(self, stream_id: str) -> int:
        """The version of the stream's last event; 0 when the stream does not exist."""
        with translate_errors():
            async with self.pool.connection() as conn:
                return await self._current_version(conn, stream_id)

    async def set_stream_state(self, stream_id: str, state: StreamState) -> None:
        """Mark a stream active, soft-deleted or archived (its events stay in the log)."""
        state = StreamState(state)
        with translate_errors():
            async with self.pool.connection() as conn:
                cur = await conn.execute(
                    "UPDATE streams SET state = %s, updated_at = now() WHERE stream_id = %s",
                    (state.value, stream_id),
                )
        if cur.rowcount == 0:
            raise WrongExpectedVersion(stream_id, STREAM_EXISTS, 0)

    # ------------------------------------------------------------------ global log

    async def read_all(
        self,
        after: Checkpoint | str | None = None,
        limit: int = 1000,
        *,
        categories: Iterable[str] | None = None,
        types: Iterable[str] | None = None,
        streams: Iterable[str] | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        skip_inactive_streams: bool = False,
        connection: psycopg.AsyncConnection[Any] | None = None,
    ) -> list[RecordedEvent]:
        """Up to ``limit`` events after ``after`` in the log's one stable order.

        Only events below the snapshot-xmin fence are returned (see the module docstring), so a
        reader that continues from the last event's checkpoint never skips one. Filters narrow
        the page without changing the order: ``categories``, ``types``, ``streams`` (exact
        stream ids), and ``since`` (inclusive) / ``until`` (exclusive) on ``recorded_at``.
        """
        query, params = self._read_all_query(
            after,
            limit,
            _LogFilter(categories, types, streams, since, until, skip_inactive_streams),
        )
        if connection is not None:
            with translate_errors():
                rows = await (await connection.execute(query, params)).fetchall()
        else:
            with translate_errors():
                async with self.pool.connection() as conn:
                    rows = await (await conn.execute(query, params)).fetchall()
        return self._records(rows)

    @staticmethod
    def _read_all_query(
        after: Checkpoint | str | None, limit: int, where: _LogFilter
    ) -> tuple[sql.Composed, dict[str, Any]]:
        if isinstance(after, str):
            after = Checkpoint.parse(after)
        after = after or START
        if limit < 1:
            raise ValueError(f"limit must be positive, not {limit}")
        limit = min(limit, _MAX_BIGINT)
        params: dict[str, Any] = {
            "tx": str(after.transaction_id),
            "pos": after.position,
            "limit": limit,
        }
        filters: list[sql.Composable] = []
        if where.categories is not None:
            params["categories"] = list(where.categories)
            filters.append(sql.SQL("AND category = ANY(%(categories)s::text[])"))
        if where.types is not None:
            params["types"] = list(where.types)
            filters.append(sql.SQL("AND type = ANY(%(types)s::text[])"))
        if where.streams is not None:
            params["streams"] = list(where.streams)
            filters.append(sql.SQL("AND stream_id = ANY(%(streams)s::text[])"))
        for name, value, op in (("since", where.since, ">="), ("until", where.until, "<")):
            if value is not None:
                if value.tzinfo is None:
                    raise ValueError(f"{name} must be a timezone-aware datetime")
                params[name] = value
                filters.append(
                    sql.SQL("AND recorded_at {} {}").format(sql.SQL(op), sql.Placeholder(name))
                )
        if where.skip_inactive_streams:
            filters.append(
                sql.SQL(
                    "AND NOT EXISTS (SELECT 1 FROM streams s"
                    " WHERE s.stream_id = events.stream_id AND s.state <> 'active')"
                )
            )
        query = sql.SQL(_READ_ALL).format(filters=sql.SQL(" ").join(filters))
        return query, params

    async def head(self) -> Checkpoint:
        """The checkpoint of the newest event a reader can see now (``START`` when none)."""
        with translate_errors():
            async with self.pool.connection() as conn:
                row = await (await conn.execute(_HEAD)).fetchone()
        return Checkpoint(row[0], row[1]) if row else START

    async def subscribe(
        self,
        after: Checkpoint | str | None = None,
        *,
        batch_size: int = 1000,
        poll_interval: float = 0.5,
        categories: Iterable[str] | None = None,
        types: Iterable[str] | None = None,
    ) -> AsyncIterator[RecordedEvent]:
        """Catch up from ``after``, then follow new appends for ever (until cancelled).

        Woken by NOTIFY on :data:`NOTIFY_CHANNEL`; polls every ``poll_interval`` seconds as a
        safety net. A notification can arrive while an older transaction still holds the fence
        below the new event: a wake-up that finds nothing is followed by quick re-reads (20 ms,
        doubling) until the event shows or the poll interval is reached.
        """
        checkpoint = Checkpoint.parse(after) if isinstance(after, str) else (after or START)
        cats = list(categories) if categories is not None else None
        typs = list(types) if types is not None else None
        listener = await self._listener()
        recheck: float | None = None  # set after a wake-up that found nothing yet
        try:
            while True:
                batch = await self.read_all(checkpoint, batch_size, categories=cats, types=typs)
                for event in batch:
                    yield event
                    checkpoint = event.checkpoint
                if len(batch) >= batch_size:
                    continue
                if batch:
                    recheck = None
                timeout = poll_interval if recheck is None else min(recheck, poll_interval)
                if await self._wait(listener, timeout) or recheck is not None:
                    recheck = 0.02 if recheck is None else recheck * 2
                    if recheck >= poll_interval:
                        recheck = None
        finally:
            await listener.close()

    async def _listener(self) -> psycopg.AsyncConnection[Any]:
        # The pool is built by open_pool with a plain conninfo string and a kwargs dict.
        conninfo = cast(str, self.pool.conninfo)
        kwargs = dict(cast(dict[str, Any], self.pool.kwargs))
        with translate_errors():
            conn = await psycopg.AsyncConnection.connect(conninfo, **kwargs)
            await conn.execute("LISTEN " + NOTIFY_CHANNEL)
        return conn

    @staticmethod
    async def _wait(listener: psycopg.AsyncConnection[Any], timeout: float) -> bool:
        """Wait for a notification or the timeout; True when a notification came."""
        came = False
        with translate_errors():
            # stop_after=1 ends the generator after one notification: let it finish cleanly.
            async for _ in listener.notifies(timeout=timeout, stop_after=1):
                came = True
        return came

    # ------------------------------------------------------------------ wake-ups

    def wake_subscribers(self) -> None:
        """Schedule one coalesced NOTIFY after the current appends (outside their transaction)."""
        if self._notify_task is not None and not self._notify_task.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._notify_task = loop.create_task(self._notify_soon())

    async def _notify_soon(self) -> None:
        await asyncio.sleep(self._notify_interval)
        # A lost wake-up only delays subscribers until their next poll, so errors are dropped.
        with contextlib.suppress(psycopg.Error, OSError):
            async with self.pool.connection() as conn:
                await conn.execute("NOTIFY " + NOTIFY_CHANNEL)

    async def close(self) -> None:
        """Wait for a pending wake-up to be sent (the pool is the caller's to close)."""
        task = self._notify_task
        if task is not None and not task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ------------------------------------------------------------------ decoding

    def _records(self, rows: list[_EventRow]) -> list[RecordedEvent]:
        """Rows as records. Most types decode with one msgspec call, made inline here: a
        Python call per row to :meth:`_record` and the codec was a tenth of a page read's
        CPU (profiled). When a row fails that way, the page is decoded again row by row
        through the codec's own ``decode``, which raises or stands in as the codec does."""
        direct = self.codec.direct_decoders
        decode = self.codec.decode
        try:
            return [
                RecordedEvent(
                    pos,
                    tx,
                    eid,
                    sid,
                    ver,
                    typ,
                    fn(data) if (fn := direct.get(typ)) is not None else decode(typ, data),
                    meta,
                    at,
                )
                for pos, tx, eid, sid, ver, typ, data, meta, at in rows
            ]
        except Exception:
            return [self._record(row) for row in rows]

    def _record(self, row: _EventRow) -> RecordedEvent:
        position, tx, event_id, stream_id, version, type_name, data, metadata, recorded_at = row
        return RecordedEvent(
            position,
            tx,
            event_id,
            stream_id,
            version,
            type_name,
            self.codec.decode(type_name, data),
            metadata,
            recorded_at,
        )
