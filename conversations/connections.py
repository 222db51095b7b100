"""The connections registry: a named channel connection (page, account, bot, widget)."""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Collection, Iterable
from typing import Any, Literal, get_args

import msgspec
from psycopg import errors as pg_errors
from psycopg_pool import AsyncConnectionPool

from eventstore.errors import translate_errors

from .errors import ConnectionExists, ConnectionNotFound, InvalidCommand

__all__ = [
    "CHANNELS",
    "Channel",
    "Connection",
    "ConnectionCache",
    "ReopenPolicy",
    "add_connection",
    "find_connection",
    "find_connections",
    "get_connection",
    "is_connection_name",
    "is_storable_text",
    "list_connections",
    "parse_duration",
    "parse_reopen_policy",
]

Channel = Literal["messenger", "instagram", "telegram", "widget"]
CHANNELS: tuple[str, ...] = get_args(Channel)
ReopenPolicy = Literal["new", "reopen-last", "reopen-within"]

# Matched whole (fullmatch): "$" would let a trailing newline through.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_DURATION = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class Connection(msgspec.Struct, frozen=True):
    """A registered channel connection. Secrets are kept out of ``repr``."""

    name: str
    channel: Channel
    external_id: str
    reopen_policy: ReopenPolicy
    reopen_window: dt.timedelta | None
    created_at: dt.datetime
    app_secret: str | None = msgspec.field(default=None)
    verify_token: str | None = None
    secret_token: str | None = None
    access_token: str | None = None
    bot_token: str | None = None

    def __repr__(self) -> str:
        window = f", reopen_window={self.reopen_window}" if self.reopen_window else ""
        return (
            f"Connection(name={self.name!r}, channel={self.channel!r}, "
            f"external_id={self.external_id!r}, reopen_policy={self.reopen_policy!r}{window})"
        )

    __str__ = __repr__

    @property
    def policy_text(self) -> str:
        """The reopen policy as ``connections add`` takes it (``reopen-within=7d``...)."""
        if self.reopen_policy == "reopen-within" and self.reopen_window is not None:
            return f"reopen-within={format_duration(self.reopen_window)}"
        return self.reopen_policy


def parse_duration(text: str) -> dt.timedelta:
    """``30s``, ``15m``, ``12h``, ``7d`` or ``2w`` as a positive timedelta."""
    match = _DURATION.fullmatch(text.strip())
    if match is None or int(match.group(1)) == 0:
        raise InvalidCommand(
            f"not a duration: {text!r} (use a positive number and s, m, h, d or w, e.g. 7d)",
            field="reopen_policy",
        )
    try:
        return dt.timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    except OverflowError as exc:
        raise InvalidCommand(
            f"duration too long: {text!r} (at most 999999999 days)", field="reopen_policy"
        ) from exc


def is_storable_text(value: str) -> bool:
    """Whether PostgreSQL can store the string: no NUL, and UTF-8 (no lone surrogate)."""
    if "\x00" in value:
        return False
    if value.isascii():
        return True
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def is_connection_name(name: object) -> bool:
    """Whether ``name`` could name a connection (so whether it is worth looking up)."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def format_duration(delta: dt.timedelta) -> str:
    """The shortest exact ``NNu`` form of a duration."""
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def parse_reopen_policy(text: str) -> tuple[ReopenPolicy, dt.timedelta | None]:
    """``new``, ``reopen-last`` or ``reopen-within=DURATION``."""
    if text == "new":
        return "new", None
    if text == "reopen-last":
        return "reopen-last", None
    head, sep, tail = text.partition("=")
    if head == "reopen-within" and sep:
        return "reopen-within", parse_duration(tail)
    raise InvalidCommand(
        f"not a reopen policy: {text!r} (use new, reopen-last or reopen-within=DURATION)",
        field="reopen_policy",
    )


_SELECT_ALL = (
    "SELECT name, channel, external_id, reopen_policy, reopen_window, created_at,"
    " app_secret, verify_token, secret_token, access_token, bot_token FROM connections"
)


def _row(row: tuple[Any, ...]) -> Connection:
    return Connection(*row)


async def add_connection(
    pool: AsyncConnectionPool[Any],
    name: str,
    *,
    channel: str,
    external_id: str,
    reopen_policy: str = "new",
    app_secret: str | None = None,
    verify_token: str | None = None,
    secret_token: str | None = None,
    access_token: str | None = None,
    bot_token: str | None = None,
) -> Connection:
    """Register a connection; raise :class:`ConnectionExists` or :class:`InvalidCommand`."""
    if not is_connection_name(name):
        raise InvalidCommand(
            f"connection name {name!r}: use 1-64 letters, digits, '_', '.' or '-'", field="name"
        )
    if channel not in CHANNELS:
        raise InvalidCommand(
            f"channel {channel!r}: use one of {', '.join(CHANNELS)}", field="channel"
        )
    if not external_id or len(external_id) > 200 or not is_storable_text(external_id):
        raise InvalidCommand(
            "external id must be 1-200 characters of valid Unicode, without NUL",
            field="external_id",
        )
    for field, value in (
        ("app_secret", app_secret),
        ("verify_token", verify_token),
        ("secret_token", secret_token),
        ("access_token", access_token),
        ("bot_token", bot_token),
    ):
        if value is not None and (not value or len(value) > 4096 or not is_storable_text(value)):
            raise InvalidCommand(
                f"{field} must be 1-4096 characters of valid Unicode, without NUL", field=field
            )
    policy, window = parse_reopen_policy(reopen_policy)
    with translate_errors():
        async with pool.connection() as conn:
            try:
                cur = await conn.execute(
                    "INSERT INTO connections (name, channel, external_id, reopen_policy,"
                    " reopen_window, app_secret, verify_token, secret_token, access_token,"
                    " bot_token) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                    " RETURNING name, channel, external_id, reopen_policy, reopen_window,"
                    " created_at, app_secret, verify_token, secret_token, access_token,"
                    " bot_token",
                    (
                        name,
                        channel,
                        external_id,
                        policy,
                        window,
                        app_secret,
                        verify_token,
                        secret_token,
                        access_token,
                        bot_token,
                    ),
                )
            except pg_errors.UniqueViolation as exc:
                raise ConnectionExists(name, exc.diag.constraint_name) from exc
            row = await cur.fetchone()
    assert row is not None
    return _row(row)


async def list_connections(pool: AsyncConnectionPool[Any]) -> list[Connection]:
    """Every registered connection, by name."""
    with translate_errors():
        async with pool.connection() as conn:
            rows = await (await conn.execute(_SELECT_ALL + " ORDER BY name")).fetchall()
    return [_row(r) for r in rows]


async def get_connection(pool: AsyncConnectionPool[Any], name: str) -> Connection:
    """The connection named ``name``; raise :class:`ConnectionNotFound`."""
    if not is_connection_name(name):
        # No registered name can look like this (NUL, '/', over 64 characters...): do not
        # send it to PostgreSQL, which refuses NUL in text outright.
        raise ConnectionNotFound(name)
    with translate_errors():
        async with pool.connection() as conn:
            row = await (await conn.execute(_SELECT_ALL + " WHERE name = %s", (name,))).fetchone()
    if row is None:
        raise ConnectionNotFound(name)
    return _row(row)


async def find_connection(
    pool: AsyncConnectionPool[Any], channel: str, external_id: str
) -> Connection | None:
    """The connection of a channel and provider-side id (a page id, a bot id), if registered."""
    with translate_errors():
        async with pool.connection() as conn:
            row = await (
                await conn.execute(
                    _SELECT_ALL + " WHERE channel = %s AND external_id = %s",
                    (channel, external_id),
                )
            ).fetchone()
    return _row(row) if row else None


async def find_connections(
    pool: AsyncConnectionPool[Any], channel: str, external_ids: Collection[str]
) -> dict[str, Connection]:
    """The registered connections of a channel among these provider-side ids, by id; one
    query, whatever the number of ids."""
    with translate_errors():
        async with pool.connection() as conn:
            rows = await (
                await conn.execute(
                    _SELECT_ALL + " WHERE channel = %s AND external_id = ANY(%s)",
                    (channel, list(external_ids)),
                )
            ).fetchall()
    connections = [_row(row) for row in rows]
    return {connection.external_id: connection for connection in connections}


class ConnectionCache:
    """Registered connections by name and by provider id, each kept for ``ttl`` seconds.

    Every webhook delivery needs its connection (to route it and check its signature) before
    anything is stored; reading it from PostgreSQL each time was a round trip per request.
    Connections are only ever added, so a found one is reused for ``ttl`` seconds (an edit
    made by hand in the table shows after at most that long); a miss is not kept, so a
    connection added a moment ago routes at once.
    """

    def __init__(self, pool: AsyncConnectionPool[Any], ttl: float = 5.0) -> None:
        self.pool = pool
        self.ttl = ttl
        self._by_name: dict[str, tuple[float, Connection]] = {}
        self._by_external: dict[tuple[str, str], tuple[float, Connection]] = {}

    def _keep(self, connection: Connection) -> Connection:
        expires = time.monotonic() + self.ttl
        self._by_name[connection.name] = (expires, connection)
        self._by_external[connection.channel, connection.external_id] = (expires, connection)
        return connection

    async def get(self, name: str) -> Connection:
        """:func:`get_connection`, from the cache while fresh."""
        kept = self._by_name.get(name)
        if kept is not None and kept[0] > time.monotonic():
            return kept[1]
        return self._keep(await get_connection(self.pool, name))

    async def find(self, channel: str, external_id: str) -> Connection | None:
        """:func:`find_connection`, from the cache while fresh."""
        kept = self._by_external.get((channel, external_id))
        if kept is not None and kept[0] > time.monotonic():
            return kept[1]
        found = await find_connection(self.pool, channel, external_id)
        return None if found is None else self._keep(found)

    async def find_many(self, channel: str, external_ids: Iterable[str]) -> dict[str, Connection]:
        """:func:`find_connections`, from the cache while fresh: the ones not kept are read in
        one query (a webhook delivery may name a thousand ids before its signature can be
        checked, so a lookup per id let an unsigned request cost a thousand queries)."""
        now = time.monotonic()
        found: dict[str, Connection] = {}
        missing: list[str] = []
        for external_id in external_ids:
            kept = self._by_external.get((channel, external_id))
            if kept is not None and kept[0] > now:
                found[external_id] = kept[1]
            else:
                missing.append(external_id)
        if missing:
            for external_id, connection in (
                await find_connections(self.pool, channel, missing)
            ).items():
                found[external_id] = self._keep(connection)
        return found
