"""The bench's scratch database, its connections, and the probes that explain a figure.

The bench never touches the database it is pointed at beyond creating (and finally dropping)
its own scratch database next to it, migrated with :func:`eventstore.migrations.migrate`. The
reference tables live in that same database, so a path and its reference share the server,
its settings, its caches and its WAL.
"""

from __future__ import annotations

import contextlib
import os
import time
import zlib
from collections.abc import Callable, Iterable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, TypeVar, cast

import psycopg
from psycopg import sql
from psycopg.abc import QueryNoTemplate as Query
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool

from eventstore.database import connect_kwargs, open_pool
from eventstore.migrations import migrate

from .workload import Workload

__all__ = [
    "BenchContext",
    "CostProbe",
    "create_scratch_database",
    "drop_scratch_database",
    "lock_server",
    "with_dbname",
]

T = TypeVar("T")

Pool = AsyncConnectionPool[psycopg.AsyncConnection[Any]]

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def with_dbname(url: str, dbname: str) -> str:
    """The same server as ``url``, another database."""
    params = conninfo_to_dict(url)
    params["dbname"] = dbname
    return make_conninfo("", **params)


def drop_scratch_database(server_url: str, name: str) -> None:
    """Drop the scratch database ``name`` if it exists, ending its sessions."""
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def create_scratch_database(server_url: str, name: str) -> str:
    """Drop and recreate ``name`` on the server of ``server_url``, migrate it, return its URL."""
    drop_scratch_database(server_url, name)
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = with_dbname(server_url, name)
    migrate(url)
    return url


def lock_server(server_url: str, name: str) -> psycopg.Connection[Any]:
    """Hold the server's bench lock for scratch database ``name``; close the result to release.

    Two bench runs on one server would drop each other's scratch database and share the CPU,
    spoiling both; the second one waits here (a session advisory lock) for the first to end.
    """
    conn = psycopg.connect(server_url, autocommit=True)
    key = zlib.crc32(f"convstore bench {name}".encode())
    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
    if not row or not row[0]:
        print(f"bench: another bench run holds {name} on this server; waiting for it to end")
        conn.execute("SELECT pg_advisory_lock(%s)", (key,))
    return conn


def _proc_cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds of a local process, or ``None`` when it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces; the fields after it are plain numbers.
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


class CostProbe:
    """Measures what one timed run cost: client CPU, server backend CPU and WAL, per event.

    Server CPU is read from ``/proc`` for the backends serving the run (found by
    ``pg_backend_pid()``), so it is only known when the server runs on this machine. WAL is the
    whole cluster's, so other activity on a shared server shows up in it.
    """

    def __init__(self, ctx: BenchContext, backend_pids: Iterable[int] = ()) -> None:
        self._ctx = ctx
        self._pids = list(backend_pids)
        self._cpu0 = 0.0
        self._wall0 = 0.0
        self._server0: float | None = None
        self._lsn0: str | None = None

    def _server_cpu(self) -> float | None:
        if not self._pids:
            return None
        total = 0.0
        for pid in self._pids:
            seconds = _proc_cpu_seconds(pid)
            if seconds is None:
                return None
            total += seconds
        return total

    async def start(self) -> None:
        """Take the starting readings (call just before the timed work)."""
        self._lsn0 = await self._ctx.wal_lsn()
        self._server0 = self._server_cpu()
        self._cpu0 = time.process_time()
        self._wall0 = time.perf_counter()

    async def stop(self, events: int) -> dict[str, float]:
        """Per-event costs since :meth:`start` (call just after the timed work)."""
        wall = time.perf_counter() - self._wall0
        cpu = time.process_time() - self._cpu0
        server1 = self._server_cpu()
        details: dict[str, float] = {"client_cpu_util": cpu / wall if wall > 0 else 0.0}
        if events > 0:
            details["client_cpu_us_per_event"] = cpu * 1e6 / events
            if self._server0 is not None and server1 is not None:
                details["server_cpu_us_per_event"] = (server1 - self._server0) * 1e6 / events
            if self._lsn0 is not None:
                wal = await self._ctx.wal_bytes_since(self._lsn0)
                if wal is not None:
                    details["wal_bytes_per_event"] = wal / events
        return details


class BenchContext:
    """What a path needs: the scratch database, pools, the run's scale, and shared state."""

    def __init__(self, url: str, *, quick: bool, admin: psycopg.AsyncConnection[Any]) -> None:
        #: URL of the scratch database (migrated, with the reference tables).
        self.url = url
        #: True under ``--quick``: paths should use :meth:`scale` to size their data sets.
        self.quick = quick
        #: An autocommit connection to the scratch database for setup and probes.
        self.admin = admin
        #: Data shared between paths (for example a loaded log), by key.
        self.state: dict[str, Any] = {}
        self._pools: dict[int, Pool] = {}
        self._kept: dict[str, Any] = {}
        self._stack = contextlib.AsyncExitStack()
        self._workload: Workload | None = None

    @property
    def workload(self) -> Workload:
        """The run's payloads, metadata and stream names (shared by every path)."""
        if self._workload is None:
            self._workload = Workload()
        return self._workload

    def scale(self, quick: T, full: T) -> T:
        """``quick`` under ``--quick``, else ``full``."""
        return quick if self.quick else full

    async def pool(self, size: int) -> Pool:
        """An open pool of ``size`` connections, opened like the application opens them.

        Pools are kept (one per size) until :meth:`release_pools`, which the harness calls
        after each path, so a path and its reference share warm connections.
        """
        pool = self._pools.get(size)
        if pool is None:
            pool = await open_pool(self.url, min_size=size, max_size=size, timeout=30.0)
            self._pools[size] = pool
        return pool

    async def kept(self, key: str, open_: Callable[[], AbstractAsyncContextManager[T]]) -> T:
        """What ``open_()`` yields, entered on first use and kept until :meth:`release_pools`.

        A long-running resource (a served application and its pool) is measured warm, as it
        runs in production: the harness's warm-up round starts it and the rounds reuse it.
        """
        if key not in self._kept:
            self._kept[key] = await self._stack.enter_async_context(open_())
        return cast(T, self._kept[key])

    async def release_pools(self) -> None:
        """Close every pool opened by :meth:`pool`, and everything :meth:`kept`."""
        stack, self._stack, self._kept = self._stack, contextlib.AsyncExitStack(), {}
        await stack.aclose()
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            await pool.close()

    async def connect(self) -> psycopg.AsyncConnection[Any]:
        """One more autocommit connection with the application's session settings."""
        return await psycopg.AsyncConnection.connect(self.url, **connect_kwargs())

    async def wal_lsn(self) -> str | None:
        """The server's current WAL insert position (``None`` when not allowed)."""
        try:
            row = await (await self.admin.execute("SELECT pg_current_wal_lsn()::text")).fetchone()
        except psycopg.Error:
            return None
        return str(row[0]) if row else None

    async def wal_bytes_since(self, lsn: str) -> float | None:
        """Bytes of WAL written by the whole cluster since ``lsn``."""
        try:
            row = await (
                await self.admin.execute(
                    "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s::pg_lsn)::float8", (lsn,)
                )
            ).fetchone()
        except psycopg.Error:
            return None
        return float(row[0]) if row else None

    async def settle(self) -> None:
        """Leave no maintenance due: VACUUM (ANALYZE) the scratch database, then CHECKPOINT.

        A path that appends a million rows makes an insert-triggered autovacuum of its tables
        due, and it then ran during the next path's rounds, on some rounds more than others
        (seen: ``VACUUM ANALYZE public.events`` through the first 35 s of ``ingest_c8``, whose
        rounds ran a third slower until it ended, and the cluster's WAL a delivery tripled).
        Settled, each path measures its own cost. The ANALYZE also makes the server plan the
        statements prepared so far again, with the tables' current sizes. CHECKPOINT needs the
        pg_checkpoint role on a server we do not own; without it the path starts unsettled on
        that count only.
        """
        await self.admin.execute("VACUUM (ANALYZE)")
        try:
            await self.admin.execute("CHECKPOINT")
        except psycopg.errors.InsufficientPrivilege:
            pass

    async def execute(self, statement: Query, *params: Any) -> None:
        """Run a setup statement on the admin connection."""
        await self.admin.execute(statement, params or None)

    async def scalar(self, query: Query, *params: Any) -> Any:
        """The first column of the first row of ``query``."""
        row = await (await self.admin.execute(query, params or None)).fetchone()
        return row[0] if row else None
