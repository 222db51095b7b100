"""Queries on the inbox read model, shared by the HTTP handlers and the command line.

Every list is newest first with an opaque cursor, and each page is one index range scan with
no sort step (the tests check the plans on 100k-row tables):

- :meth:`InboxQueries.inbox`: a connection's conversations by status. A snooze that has run
  out counts as open; the status is decided with ``now`` (the database's clock by default),
  by merging two ranges of the inbox index (``open``, and ``snoozed`` up to ``now``).
- :meth:`InboxQueries.messages`: a conversation's messages.
- :meth:`InboxQueries.contact_conversations`: a contact's conversations, with those of the
  contacts merged into it (a merged contact's id leads to the survivor's list).
- :meth:`InboxQueries.counts`: conversations per connection and status.
"""

from __future__ import annotations

import base64
import contextvars
import datetime as dt
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, Final, Generic, TypeVar

import msgspec
import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from conversations.events import Attachment
from eventstore.errors import translate_errors

from .base import ProjectionError, ReadModelMissing, live_schema

__all__ = [
    "MAX_PAGE",
    "STATUSES",
    "Conversation",
    "InboxQueries",
    "InvalidQuery",
    "Message",
    "Page",
    "StatusCounts",
]

T = TypeVar("T")

#: The statuses a conversation can have, as queries report them.
STATUSES: Final = ("open", "snoozed", "closed")
#: The largest page a query returns.
MAX_PAGE: Final = 500


class InvalidQuery(ProjectionError, ValueError):
    """A query argument is invalid: an unknown status, a bad cursor, a page size out of range."""


class Conversation(msgspec.Struct, frozen=True):
    """An inbox row. ``status`` is effective: a snooze that has run out reads ``open``."""

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
    unread_count: int
    #: the last message's delivery status (an outbound one's; see :class:`Message`)
    last_message_status: str | None
    #: replies whose delivery failed: the inbox's failed marker
    failed_replies: int


class Message(msgspec.Struct, frozen=True):
    """A message of a conversation; ``direction`` is ``in`` (customer) or ``out``.

    ``delivery_status`` (outbound only): ``queued``, ``sending``, ``retrying``, ``delivered``
    or ``failed``; ``delivery_error`` is the provider's last error, ``delivery_attempts`` the
    attempts made, ``delivered_at`` when the provider accepted it (or echoed it back).
    """

    message_id: uuid.UUID
    conversation_id: uuid.UUID
    direction: str
    text: str | None
    attachments: tuple[Attachment, ...]
    sent_at: dt.datetime
    author: str | None
    provider_message_id: str | None
    edited_at: dt.datetime | None
    stream_version: int
    delivery_status: str | None
    delivery_attempts: int
    delivery_error: str | None
    delivered_at: dt.datetime | None


class Page(msgspec.Struct, Generic[T], frozen=True):
    """One page of a list; pass ``next_cursor`` back for the next (``None``: the last page)."""

    items: list[T]
    next_cursor: str | None


class StatusCounts(msgspec.Struct, frozen=True):
    """How many visible (not deleted) conversations a connection has in each status."""

    connection: str
    open: int = 0
    snoozed: int = 0
    closed: int = 0


_ATTACHMENTS = msgspec.json.Decoder(tuple[Attachment, ...])
_CURSOR = msgspec.json.Decoder(list[str])

_NOW: Final = sql.SQL("coalesce(%(now)s::timestamptz, now())")
_ORDER: Final = sql.SQL("ORDER BY last_activity_at DESC, conversation_id DESC")
_AFTER: Final = sql.SQL("AND (last_activity_at, conversation_id) < (%(at)s, %(id)s)")
_CONVERSATION_COLUMNS: Final = sql.SQL(
    "conversation_id, connection, channel, psid, contact_id,"
    " CASE WHEN status = 'snoozed' AND snoozed_until <= {now} THEN 'open' ELSE status END,"
    " opened_at, closed_at, snoozed_until, deleted_at, last_message_at, last_message_id,"
    " last_message_preview, last_message_direction, last_activity_at, message_count,"
    " unread_count, last_message_status, failed_replies"
).format(now=_NOW)

# Each requested status is one or two ranges of the inbox index: (stored status, extra filter).
_RANGES: Final[dict[str, tuple[tuple[str, sql.Composable], ...]]] = {
    "open": (
        ("open", sql.SQL("")),
        ("snoozed", sql.SQL("AND snoozed_until <= {now}").format(now=_NOW)),
    ),
    "snoozed": (
        (
            "snoozed",
            sql.SQL("AND (snoozed_until IS NULL OR snoozed_until > {now})").format(now=_NOW),
        ),
    ),
    "closed": (("closed", sql.SQL("")),),
}


def _encode_cursor(*parts: str) -> str:
    raw = msgspec.json.encode(list(parts))
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _decode_cursor(cursor: str, kind: str, size: int) -> list[str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        parts = _CURSOR.decode(raw)
    except (ValueError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise InvalidQuery(f"not a cursor of this list: {cursor!r}") from exc
    if len(parts) != size or parts[0] != kind:
        raise InvalidQuery(f"not a cursor of this list: {cursor!r}")
    return parts[1:]


def _conversation_cursor(cursor: str) -> tuple[dt.datetime, uuid.UUID]:
    at, cid = _decode_cursor(cursor, "c", 3)
    try:
        when = dt.datetime.fromisoformat(at)
        return when, uuid.UUID(cid)
    except ValueError as exc:
        raise InvalidQuery(f"not a cursor of this list: {cursor!r}") from exc


def _check_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise InvalidQuery(f"limit must be 1-{MAX_PAGE}, not {limit!r}")
    return limit


def _statuses(status: str | Iterable[str] | None) -> tuple[str, ...]:
    if status is None or status == "all":
        return STATUSES
    wanted = (status,) if isinstance(status, str) else tuple(status)
    unknown = [s for s in wanted if s not in STATUSES]
    if unknown or not wanted:
        raise InvalidQuery(f"status must be one of {', '.join(STATUSES)} or all, not {status!r}")
    return tuple(s for s in STATUSES if s in wanted)


def _conversation(row: Sequence[Any]) -> Conversation:
    return Conversation(*row)


# Set by InboxQueries.explain: the next statement is explained instead of run.
_EXPLAIN: contextvars.ContextVar[bool] = contextvars.ContextVar("explain", default=False)
_PLAN = msgspec.json.Decoder(list[dict[str, Any]])


class _Explained(Exception):
    def __init__(self, plan: list[dict[str, Any]]) -> None:
        super().__init__("explained")
        self.plan = plan


class InboxQueries:
    """Queries over one inbox read model (the live one, ``rm_inbox``, unless told otherwise).

    ``schema`` lets the same queries read a model built elsewhere (a time-travel build in
    ``pg_temp``, then also pass that ``connection`` to each query).
    """

    def __init__(self, pool: AsyncConnectionPool[Any], *, schema: str | None = None) -> None:
        self.pool = pool
        self.schema = schema or live_schema("inbox")
        s = self.schema
        self._conversations = sql.Identifier(s, "conversations")
        self._messages = sql.Identifier(s, "messages")
        self._counts = sql.Identifier(s, "counts")
        self._merges = sql.Identifier(s, "contact_merges")
        self._inbox_sql: dict[tuple[tuple[str, ...], bool], sql.Composed] = {}

    async def _fetch(
        self,
        query: sql.Composed,
        params: dict[str, Any],
        connection: psycopg.AsyncConnection[Any] | None,
    ) -> list[tuple[Any, ...]]:
        explain = _EXPLAIN.get()
        if explain:
            query = sql.SQL("EXPLAIN (FORMAT JSON) ") + query
        try:
            with translate_errors():
                rows: list[tuple[Any, ...]]
                if connection is not None:
                    rows = await (await connection.execute(query, params)).fetchall()
                else:
                    async with self.pool.connection() as conn:
                        rows = await (await conn.execute(query, params)).fetchall()
        except (pg_errors.UndefinedTable, pg_errors.InvalidSchemaName) as exc:
            raise ReadModelMissing("inbox", self.schema) from exc
        if explain:
            raise _Explained(_PLAN.decode(rows[0][0]))
        return rows

    async def explain(self, method: str, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        """PostgreSQL's plan (``EXPLAIN (FORMAT JSON)``) of the statement a query method runs
        with these arguments, without running it: ``await q.explain("inbox", "fb")``."""
        if method not in ("inbox", "conversation", "contact_conversations", "messages", "counts"):
            raise ValueError(f"not a query method: {method!r}")
        token = _EXPLAIN.set(True)
        try:
            await getattr(self, method)(*args, **kwargs)
        except _Explained as explained:
            return explained.plan
        finally:
            _EXPLAIN.reset(token)
        raise AssertionError("the query method ran no statement")  # pragma: no cover

    # ---------------------------------------------------------------- inbox

    def _inbox_query(self, statuses: tuple[str, ...], after: bool) -> sql.Composed:
        key = (statuses, after)
        query = self._inbox_sql.get(key)
        if query is None:
            branches = [
                sql.SQL(
                    "(SELECT {cols} FROM {t} WHERE connection = %(connection)s"
                    " AND status = {stored} AND deleted_at IS NULL {extra} {after}"
                    " {order} LIMIT %(limit)s)"
                ).format(
                    cols=_CONVERSATION_COLUMNS,
                    t=self._conversations,
                    stored=sql.Literal(stored),
                    extra=extra,
                    after=_AFTER if after else sql.SQL(""),
                    order=_ORDER,
                )
                for status in statuses
                for stored, extra in _RANGES[status]
            ]
            # Each branch is an ordered range of the index; the outer ORDER BY merges them
            # (Merge Append) without sorting.
            query = self._inbox_sql[key] = sql.SQL(
                "SELECT * FROM ({union}) AS page {order} LIMIT %(limit)s"
            ).format(union=sql.SQL(" UNION ALL ").join(branches), order=_ORDER)
        return query

    async def inbox(
        self,
        connection: str,
        status: str | Iterable[str] | None = "open",
        *,
        limit: int = 50,
        cursor: str | None = None,
        now: dt.datetime | None = None,
        conn: psycopg.AsyncConnection[Any] | None = None,
    ) -> Page[Conversation]:
        """A connection's conversations in ``status`` (one, several, or ``all``), newest
        activity first; deleted ones are hidden."""
        statuses = _statuses(status)
        limit = _check_limit(limit)
        params: dict[str, Any] = {"connection": connection, "limit": limit + 1, "now": now}
        if cursor is not None:
            params["at"], params["id"] = _conversation_cursor(cursor)
        rows = await self._fetch(self._inbox_query(statuses, cursor is not None), params, conn)
        return self._conversation_page(rows, limit)

    @staticmethod
    def _conversation_page(rows: list[tuple[Any, ...]], limit: int) -> Page[Conversation]:
        items = [_conversation(row) for row in rows[:limit]]
        next_cursor = None
        if len(rows) > limit:
            last = items[-1]
            next_cursor = _encode_cursor(
                "c", last.last_activity_at.isoformat(), str(last.conversation_id)
            )
        return Page(items, next_cursor)

    async def conversation(
        self,
        conversation_id: uuid.UUID,
        *,
        now: dt.datetime | None = None,
        conn: psycopg.AsyncConnection[Any] | None = None,
    ) -> Conversation | None:
        """One conversation's row, deleted or not; ``None`` if the model has not seen it."""
        query = sql.SQL("SELECT {cols} FROM {t} WHERE conversation_id = %(id)s").format(
            cols=_CONVERSATION_COLUMNS, t=self._conversations
        )
        rows = await self._fetch(query, {"id": conversation_id, "now": now}, conn)
        return _conversation(rows[0]) if rows else None

    async def contact_conversations(
        self,
        contact_id: uuid.UUID,
        *,
        limit: int = 50,
        cursor: str | None = None,
        now: dt.datetime | None = None,
        conn: psycopg.AsyncConnection[Any] | None = None,
    ) -> Page[Conversation]:
        """A contact's conversations, newest activity first, including those of contacts
        merged into it. A merged contact's id gives its survivor's list."""
        limit = _check_limit(limit)
        params: dict[str, Any] = {"contact": contact_id, "limit": limit + 1, "now": now}
        if cursor is not None:
            params["at"], params["id"] = _conversation_cursor(cursor)
        # The contact id is a plain parameter (not resolved through merges in a subquery), so
        # the planner sees it: a contact with many conversations gets an ordered range of the
        # contact index. A merged contact owns no rows (the merge moved them all): only then is
        # its survivor looked up, and asked instead.
        query = sql.SQL(
            "SELECT {cols} FROM {t} WHERE contact_id = %(contact)s"
            " AND deleted_at IS NULL {after} {order} LIMIT %(limit)s"
        ).format(
            cols=_CONVERSATION_COLUMNS,
            t=self._conversations,
            after=_AFTER if cursor is not None else sql.SQL(""),
            order=_ORDER,
        )
        rows = await self._fetch(query, params, conn)
        if not rows:
            survivor = await self._fetch(
                sql.SQL(
                    "SELECT into_contact_id FROM {m} WHERE from_contact_id = %(contact)s"
                ).format(m=self._merges),
                params,
                conn,
            )
            if survivor:
                params["contact"] = survivor[0][0]
                rows = await self._fetch(query, params, conn)
        return self._conversation_page(rows, limit)

    # ---------------------------------------------------------------- messages

    async def messages(
        self,
        conversation_id: uuid.UUID,
        *,
        limit: int = 50,
        cursor: str | None = None,
        conn: psycopg.AsyncConnection[Any] | None = None,
    ) -> Page[Message]:
        """A conversation's messages, newest first (in the order the conversation got them)."""
        limit = _check_limit(limit)
        params: dict[str, Any] = {"id": conversation_id, "limit": limit + 1}
        after = sql.SQL("")
        if cursor is not None:
            (version,) = _decode_cursor(cursor, "m", 2)
            if not (version.isascii() and version.isdigit()):
                raise InvalidQuery(f"not a cursor of this list: {cursor!r}")
            params["version"] = int(version)
            after = sql.SQL("AND stream_version < %(version)s")
        query = sql.SQL(
            "SELECT message_id, conversation_id, direction, text, attachments, sent_at, author,"
            " provider_message_id, edited_at, stream_version, delivery_status,"
            " delivery_attempts, delivery_error, delivered_at FROM {t}"
            " WHERE conversation_id = %(id)s {after} ORDER BY stream_version DESC LIMIT %(limit)s"
        ).format(t=self._messages, after=after)
        rows = await self._fetch(query, params, conn)
        items = [
            Message(
                row[0],
                row[1],
                row[2],
                row[3],
                _ATTACHMENTS.decode(row[4]) if row[4] is not None else (),
                *row[5:],
            )
            for row in rows[:limit]
        ]
        next_cursor = None
        if len(rows) > limit:
            next_cursor = _encode_cursor("m", str(items[-1].stream_version))
        return Page(items, next_cursor)

    # ---------------------------------------------------------------- counts

    async def counts(
        self,
        connection: str | None = None,
        *,
        now: dt.datetime | None = None,
        conn: psycopg.AsyncConnection[Any] | None = None,
    ) -> list[StatusCounts]:
        """Visible conversations per status, for one connection or every one (by name)."""
        where = (
            sql.SQL("AND c.connection = %(connection)s") if connection is not None else sql.SQL("")
        )
        # Run-out snoozes are counted per connection, each a range of the inbox index.
        query = sql.SQL(
            "SELECT c.connection, c.status, c.conversations FROM {counts} AS c WHERE true {where}"
            " UNION ALL"
            " SELECT c.connection, 'expired', x.n FROM {counts} AS c CROSS JOIN LATERAL"
            " (SELECT count(*) AS n FROM {t} AS v WHERE v.connection = c.connection"
            "  AND v.status = 'snoozed' AND v.deleted_at IS NULL AND v.snoozed_until <= {now}) x"
            " WHERE c.status = 'snoozed' {where}"
        ).format(counts=self._counts, t=self._conversations, where=where, now=_NOW)
        rows = await self._fetch(query, {"connection": connection, "now": now}, conn)
        totals: dict[str, dict[str, int]] = {}
        for name, status, count in rows:
            totals.setdefault(name, {"open": 0, "snoozed": 0, "closed": 0, "expired": 0})
            totals[name][status] += int(count)
        if connection is not None and connection not in totals:
            return [StatusCounts(connection)]
        return [
            StatusCounts(
                name,
                open=t["open"] + t["expired"],
                snoozed=t["snoozed"] - t["expired"],
                closed=t["closed"],
            )
            for name, t in sorted(totals.items())
        ]
