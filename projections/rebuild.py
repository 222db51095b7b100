"""Rebuilding a read model from history while the current one keeps serving.

``rebuild`` fills ``rm_<name>_next`` from the start of the log (query indexes deferred to the
end and built ``CONCURRENTLY``, so the build never holds the log's fence back; statistics
refreshed), then swaps it in with one transaction: lock the live tables, apply
the last few events to the new ones, rename ``rm_<name>`` away and ``rm_<name>_next`` into its
place, drop the old schema. Queries name ``rm_<name>`` and see either the old tables or the new
ones, never a mix; a live projector blocked by the swap resumes on the new tables from their
own checkpoint, which is at least as far as the old one (the swap catches up under the lock).

An interrupted rebuild is resumed by the next one (the next schema keeps its checkpoint).

The privileges granted on the live schema, its tables and their columns are granted again on
the new ones in the swap's transaction, and the new ones get the old ones' owners. A view in
another schema that reads the live tables stops the swap with an error naming it, before
anything changes: dropping the old tables would drop it too (and recreating it would mean
running SQL text read from the catalog). Drop such views before a rebuild and create them
again after it; the next rebuild resumes where this one stopped.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Final

import msgspec
import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from eventstore import START, Checkpoint

from .base import (
    CHECKPOINT_TABLE,
    Projection,
    ProjectionError,
    live_schema,
    new_instance_id,
    next_schema,
)
from .progress import Progress
from .runner import (
    DDL_LOCK,
    REBUILD_LOCK,
    Applier,
    CatchUp,
    VersionMismatch,
    _connect,
    _Failure,
    _sleep,
    advisory_key,
    clear_failure,
    log,
)

__all__ = [
    "RebuildBusy",
    "RebuildFailed",
    "RebuildResult",
    "build_into",
    "compare_read_models",
    "events_after",
    "rebuild",
]

_SWAP_ATTEMPTS: Final = 30


class RebuildResult(msgspec.Struct, frozen=True):
    """What a rebuild did."""

    name: str
    version: int
    events: int
    seconds: float
    checkpoint: Checkpoint
    swapped: bool
    resumed: bool = False


class RebuildBusy(ProjectionError):
    """Another rebuild of the same projection is running."""

    def __init__(self, name: str) -> None:
        super().__init__(f"another rebuild of {name!r} is running")
        self.name = name


class RebuildFailed(ProjectionError):
    """An event stopped the rebuild; the live read model is untouched."""

    def __init__(self, name: str, failure: _Failure) -> None:
        event = failure.event
        super().__init__(
            f"rebuild of {name!r} stopped at event {event.event_id} ({event.type} in"
            f" {event.stream_id} at {event.checkpoint}) after {failure.attempts} attempts:"
            f" {failure.error}"
        )
        self.name = name
        self.event = event
        self.error = failure.error
        self.attempts = failure.attempts


async def events_after(conn: psycopg.AsyncConnection[Any], checkpoint: Checkpoint) -> int:
    """How many events the log holds after ``checkpoint`` (committed, fence or not)."""
    row = await (
        await conn.execute(
            "SELECT count(*) FROM events WHERE (transaction_id, position) > (%s::text::xid8, %s)",
            (str(checkpoint.transaction_id), checkpoint.position),
        )
    ).fetchone()
    return int(row[0]) if row else 0


async def _fence_passed(conn: psycopg.AsyncConnection[Any], checkpoint: Checkpoint) -> bool:
    """True when every transaction up to ``checkpoint``'s has ended (readers see it all)."""
    row = await (
        await conn.execute(
            "SELECT pg_snapshot_xmin(pg_current_snapshot()) > %s::text::xid8",
            (str(checkpoint.transaction_id),),
        )
    ).fetchone()
    return bool(row and row[0])


async def _catch_up(
    conn: psycopg.AsyncConnection[Any],
    catch: CatchUp,
    stop: asyncio.Event,
    *,
    until: Checkpoint | None = None,
    on_batch: Any = None,
) -> tuple[int, Checkpoint | None, bool]:
    """Apply batches until caught up; (events, last checkpoint, finished) — not finished when
    stopped. Raises :class:`RebuildFailed` on an event that keeps failing."""
    done = 0
    last: Checkpoint | None = None
    while True:
        result = await catch.step(conn, until=until)
        if isinstance(result, _Failure):
            raise RebuildFailed(catch.applier.projection.name, result)
        if isinstance(result, float):
            await _sleep(stop, None, result)
        else:
            done += result.events
            last = result.checkpoint
            if on_batch is not None:
                on_batch(done)
            if result.caught_up:
                return done, last, True
        if stop.is_set():
            return done, last, False


async def build_into(
    pool: AsyncConnectionPool[Any],
    projection: Projection,
    schema: str,
    *,
    conn: psycopg.AsyncConnection[Any] | None = None,
    until: Checkpoint | None = None,
    batch_size: int = 1000,
    replace: bool = False,
) -> Checkpoint:
    """Build ``projection`` from the start of the log into ``schema``; return its checkpoint.

    For one-off builds: a check against the live model, a model as of ``until`` (inclusive;
    waits until the fence has passed it, so the build holds every event up to it).
    ``schema="pg_temp"`` builds temporary tables, visible to ``conn`` only (so pass it). With
    ``replace``, an existing schema of that name is dropped first.
    """
    if conn is None:
        async with pool.connection() as own:
            return await build_into(
                pool,
                projection,
                schema,
                conn=own,
                until=until,
                batch_size=batch_size,
                replace=replace,
            )
    applier = Applier(pool, projection, schema)
    try:
        return await _build_into(conn, applier, until, batch_size, replace)
    finally:
        await applier.close()


async def _build_into(
    conn: psycopg.AsyncConnection[Any],
    applier: Applier,
    until: Checkpoint | None,
    batch_size: int,
    replace: bool,
) -> Checkpoint:
    schema = applier.schema
    if replace and schema != "pg_temp":
        await conn.execute(
            sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
        )
    await applier.create(conn, defer_indexes=True)
    catch = CatchUp(applier, batch_size=batch_size, max_attempts=1)
    _, last, _ = await _catch_up(conn, catch, asyncio.Event(), until=until)
    while until is not None and not await _fence_passed(conn, until):
        # A transaction elsewhere holds the fence below ``until``: wait for it, then go on.
        await asyncio.sleep(0.02)
        _, more, _ = await _catch_up(conn, catch, asyncio.Event(), until=until)
        last = more or last
    await applier.create_indexes(conn)
    state = await applier.state(conn)
    return state[0] if state is not None else (last or START)


async def rebuild(
    pool: AsyncConnectionPool[Any],
    projection: Projection,
    *,
    batch_size: int = 1000,
    progress: Progress | None = None,
    stop: asyncio.Event | None = None,
    wait: bool = False,
    if_outdated: bool = False,
    lock_timeout: float = 2.0,
    max_attempts: int = 3,
) -> RebuildResult:
    """Build the projection's next read model from history and swap it in.

    ``wait`` waits for a rebuild already running instead of raising :class:`RebuildBusy`;
    ``if_outdated`` skips the work when the live model already has the code's version (what a
    projector wants after waiting). Returns with ``swapped=False`` when ``stop`` is set first;
    the next rebuild resumes where this one stopped.
    """
    stop = stop or asyncio.Event()
    name = projection.name
    started = time.monotonic()
    lock = await _connect(pool, f"convstore rebuild {name}")
    try:
        key = advisory_key(REBUILD_LOCK, name)
        while True:
            row = await (
                await lock.execute("SELECT pg_try_advisory_lock(%s, %s), pg_backend_pid()", key)
            ).fetchone()
            if row is not None and row[0]:
                lock_pid = int(row[1])  # the server's: behind a pooler libpq's is another
                break
            if not wait:
                raise RebuildBusy(name)
            await _sleep(stop, None, 1.0)
            if stop.is_set():
                return RebuildResult(name, projection.version, 0, 0.0, START, swapped=False)
        async with pool.connection() as conn:
            live = Applier(pool, projection, live_schema(name))
            state = await live.state(conn)
            if state is not None and state[1] > projection.version:
                # Newer code built the live model: refused before building anything.
                raise VersionMismatch(name, live.schema, state[1], projection.version)
            if if_outdated and state is not None and state[1] == projection.version:
                return RebuildResult(name, projection.version, 0, 0.0, state[0], swapped=True)
            target = Applier(pool, projection, next_schema(name), instance=new_instance_id())
            # Its batches check that this session still holds the rebuild lock: once it is
            # gone, a second rebuild may start on the same schema.
            target.fence = (lock_pid, *key)
            try:
                result = await _rebuild(
                    pool, conn, target, batch_size, progress, stop, lock_timeout, max_attempts
                )
            finally:
                await target.close()
        return msgspec.structs.replace(result, seconds=time.monotonic() - started)
    finally:
        await lock.close()


async def _rebuild(
    pool: AsyncConnectionPool[Any],
    conn: psycopg.AsyncConnection[Any],
    target: Applier,
    batch_size: int,
    progress: Progress | None,
    stop: asyncio.Event,
    lock_timeout: float,
    max_attempts: int,
) -> RebuildResult:
    projection = target.projection
    name = projection.name
    state = await target.state(conn)
    resumed = state is not None and state[1] == projection.version
    if resumed and state is not None:
        log.info("%s: resuming the rebuild in %s at %s", name, target.schema, state[0])
        checkpoint = state[0]
    else:
        async with conn.transaction():
            await conn.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(target.schema))
            )
            await target.create(conn, defer_indexes=True)
        checkpoint = START
    total = await events_after(conn, checkpoint)
    catch = CatchUp(target, batch_size=batch_size, max_attempts=max_attempts)

    def report(done: int) -> None:
        if progress is not None:
            progress.update(done, max(total, done))

    done, _, finished = await _catch_up(conn, catch, stop, on_batch=report)
    if not finished:
        return RebuildResult(name, projection.version, done, 0.0, checkpoint, False, resumed)
    # Index builds take a while on big tables; the events that came meanwhile go in after.
    await target.create_indexes(conn)
    more, _, finished = await _catch_up(conn, catch, stop, on_batch=lambda n: report(done + n))
    done += more
    if not finished:
        return RebuildResult(name, projection.version, done, 0.0, checkpoint, False, resumed)
    done += await _swap(conn, projection, target, catch, lock_timeout)
    if progress is not None:
        progress.finish(done)
    await clear_failure(conn, name)
    await conn.execute(
        "INSERT INTO projection_status (name, state, rebuilt_at) VALUES (%s, 'stopped', now())"
        " ON CONFLICT (name) DO UPDATE SET rebuilt_at = now(), updated_at = now()",
        (name,),
    )
    state = await Applier(pool, projection, live_schema(name)).state(conn)
    final = state[0] if state is not None else START
    log.info("%s: rebuilt (%d events) and swapped in at %s", name, done, final)
    return RebuildResult(name, projection.version, done, 0.0, final, True, resumed)


async def _swap(
    conn: psycopg.AsyncConnection[Any],
    projection: Projection,
    target: Applier,
    catch: CatchUp,
    lock_timeout: float,
) -> int:
    """Swap the built schema in, in one transaction; return the events applied meanwhile."""
    live = live_schema(projection.name)
    old = live + "_old"
    for attempt in range(_SWAP_ATTEMPTS):
        try:
            async with conn.transaction():
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(%s, %s)",
                    advisory_key(DDL_LOCK, projection.name),
                )
                # Waiting behind a long query would stall every query queued behind us: give
                # up quickly and try again instead.
                await conn.execute(
                    "SELECT set_config('lock_timeout', %s, true)",
                    (f"{int(lock_timeout * 1000)}ms",),
                )
                cur = await conn.execute(
                    "SELECT tablename FROM pg_tables WHERE schemaname = %s"
                    " ORDER BY tablename <> %s, tablename",
                    (live, CHECKPOINT_TABLE),
                )
                tables = [row[0] for row in await cur.fetchall()]
                if tables:
                    # The checkpoint first: a projector waits there, before touching any row.
                    await conn.execute(
                        sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(
                            sql.SQL(", ").join(sql.Identifier(live, t) for t in tables)
                        )
                    )
                    if CHECKPOINT_TABLE in tables:
                        await _refuse_downgrade(conn, projection, live)
                done, _, _ = await _catch_up(conn, catch, asyncio.Event())
                row = await (
                    await conn.execute("SELECT to_regnamespace(%s) IS NOT NULL", (live,))
                ).fetchone()
                has_live = bool(row and row[0])
                grants: list[tuple[Any, ...]] = []
                if has_live:
                    await _refuse_dependent_views(conn, projection, live)
                    grants = await (
                        await conn.execute(_GRANTS, {"live": live, "next": target.schema})
                    ).fetchall()
                    await conn.execute(
                        sql.SQL("ALTER SCHEMA {} RENAME TO {}").format(
                            sql.Identifier(live), sql.Identifier(old)
                        )
                    )
                await conn.execute(
                    sql.SQL("ALTER SCHEMA {} RENAME TO {}").format(
                        sql.Identifier(target.schema), sql.Identifier(live)
                    )
                )
                if has_live:
                    await conn.execute(
                        sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(old))
                    )
                await _grant_again(conn, live, grants)
            return done
        except (pg_errors.LockNotAvailable, pg_errors.DeadlockDetected):
            # A deadlock too: a projector's fold ahead reads the tables in another order.
            log.info("%s: live tables busy; retrying the swap", projection.name)
            await asyncio.sleep(min(0.1 * (attempt + 1), 2.0))
    raise ProjectionError(
        f"could not swap the rebuilt {projection.name!r} in: its tables stayed busy"
    )


# What was granted on the live schema, its tables and their columns, and who owned them, as
# (kind, table, column, role, privilege, grantable); the role '' is PUBLIC. Only for the tables
# (and columns) the new model has too: a new version may drop one, and the old schema may hold
# a table of someone else's, which goes with it.
_GRANTS: Final = """
WITH kept AS (
    SELECT o.oid, o.relname, o.relowner, o.relacl
    FROM pg_class o JOIN pg_namespace n ON n.oid = o.relnamespace
    WHERE n.nspname = %(live)s AND o.relkind IN ('r', 'p')
      AND EXISTS (SELECT FROM pg_class c JOIN pg_namespace cn ON cn.oid = c.relnamespace
                  WHERE cn.nspname = %(next)s AND c.relname = o.relname)
)
SELECT 'schema', NULL, NULL,
       CASE WHEN a.grantee = 0 THEN '' ELSE pg_get_userbyid(a.grantee)::text END,
       a.privilege_type, a.is_grantable
FROM pg_namespace n, aclexplode(n.nspacl) a
WHERE n.nspname = %(live)s AND a.grantee <> n.nspowner
UNION ALL
SELECT 'table', k.relname, NULL,
       CASE WHEN a.grantee = 0 THEN '' ELSE pg_get_userbyid(a.grantee)::text END,
       a.privilege_type, a.is_grantable
FROM kept k, aclexplode(k.relacl) a
WHERE a.grantee <> k.relowner
UNION ALL
SELECT 'column', k.relname, col.attname::text,
       CASE WHEN a.grantee = 0 THEN '' ELSE pg_get_userbyid(a.grantee)::text END,
       a.privilege_type, a.is_grantable
FROM kept k JOIN pg_attribute col ON col.attrelid = k.oid, aclexplode(col.attacl) a
WHERE col.attacl IS NOT NULL AND NOT col.attisdropped
  AND EXISTS (SELECT FROM pg_attribute c JOIN pg_class t ON t.oid = c.attrelid
              JOIN pg_namespace tn ON tn.oid = t.relnamespace
              WHERE tn.nspname = %(next)s AND t.relname = k.relname
                AND c.attname = col.attname AND NOT c.attisdropped)
UNION ALL
SELECT 'schema owner', NULL, NULL, pg_get_userbyid(n.nspowner)::text, NULL, false
FROM pg_namespace n WHERE n.nspname = %(live)s
UNION ALL
SELECT 'table owner', k.relname, NULL, pg_get_userbyid(k.relowner)::text, NULL, false
FROM kept k
"""

# The views outside the schema that read its tables (dropping the tables would drop them).
_DEPENDENT_VIEWS: Final = """
SELECT DISTINCT format('%%I.%%I', n.nspname, v.relname)
FROM pg_depend d
JOIN pg_rewrite r ON r.oid = d.objid
JOIN pg_class v ON v.oid = r.ev_class
JOIN pg_namespace n ON n.oid = v.relnamespace
WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass
  AND d.refobjid IN (SELECT c.oid FROM pg_class c JOIN pg_namespace s ON s.oid = c.relnamespace
                     WHERE s.nspname = %(live)s)
  AND n.nspname <> %(live)s
ORDER BY 1
"""

#: The privileges a grant may carry, as fixed SQL (aclexplode names them so).
_PRIVILEGES: Final = {
    name: sql.SQL(name)
    for name in (
        "SELECT",
        "INSERT",
        "UPDATE",
        "DELETE",
        "TRUNCATE",
        "REFERENCES",
        "TRIGGER",
        "MAINTAIN",
        "USAGE",
        "CREATE",
    )
}


async def _refuse_dependent_views(
    conn: psycopg.AsyncConnection[Any], projection: Projection, live: str
) -> None:
    rows = await (await conn.execute(_DEPENDENT_VIEWS, {"live": live})).fetchall()
    if rows:
        views = ", ".join(row[0] for row in rows)
        raise ProjectionError(
            f"cannot swap the rebuilt {projection.name!r} in: {views} read the tables of {live}"
            " and would be dropped with them; drop them, run the rebuild again (it resumes),"
            " then create them again"
        )


async def _grant_again(
    conn: psycopg.AsyncConnection[Any], live: str, grants: list[tuple[Any, ...]]
) -> None:
    """Grant on the new schema, tables and columns what was granted on the old ones, then
    give them the old owners (a rebuild run by another role would otherwise own them, and
    the projector's role could no longer write)."""
    for kind, table, column, role, privilege, grantable in grants:
        if kind.endswith("owner"):
            continue
        fixed = _PRIVILEGES.get(privilege)
        if fixed is None:
            log.warning("%s: privilege %s of %r not granted again (unknown)", live, privilege, role)
            continue
        target = sql.Identifier(live) if table is None else sql.Identifier(live, table)
        await conn.execute(
            sql.SQL("GRANT {privilege}{columns} ON {kind} {target} TO {role}{option}").format(
                privilege=fixed,
                columns=sql.SQL(" ({})").format(sql.Identifier(column)) if column else sql.SQL(""),
                kind=sql.SQL("SCHEMA") if kind == "schema" else sql.SQL("TABLE"),
                target=target,
                role=sql.Identifier(role) if role else sql.SQL("PUBLIC"),
                option=sql.SQL(" WITH GRANT OPTION" if grantable else ""),
            )
        )
    for kind, table, _, role, _, _ in grants:
        if kind == "schema owner":
            await conn.execute(
                sql.SQL("ALTER SCHEMA {} OWNER TO {}").format(
                    sql.Identifier(live), sql.Identifier(role)
                )
            )
        elif kind == "table owner":
            await conn.execute(
                sql.SQL("ALTER TABLE {} OWNER TO {}").format(
                    sql.Identifier(live, table), sql.Identifier(role)
                )
            )


async def _refuse_downgrade(
    conn: psycopg.AsyncConnection[Any], projection: Projection, live: str
) -> None:
    """Refuse to replace a live model that newer code built with this code's older one."""
    row = await (
        await conn.execute(
            sql.SQL("SELECT version FROM {} WHERE projection = %s").format(
                sql.Identifier(live, CHECKPOINT_TABLE)
            ),
            (projection.name,),
        )
    ).fetchone()
    if row is not None and int(row[0]) > projection.version:
        raise VersionMismatch(projection.name, live, int(row[0]), projection.version)


async def compare_read_models(
    conn: psycopg.AsyncConnection[Any],
    projection: Projection,
    schema_a: str,
    schema_b: str,
) -> dict[str, tuple[int, int]]:
    """Per table, (rows only in ``schema_a``, rows only in ``schema_b``), as multisets.

    All zeros: the two read models are equal row for row.
    """
    differences: dict[str, tuple[int, int]] = {}
    for table in projection.tables:
        a = sql.Identifier(schema_a, table)
        b = sql.Identifier(schema_b, table)
        row = await (
            await conn.execute(
                sql.SQL(
                    "SELECT (SELECT count(*) FROM (TABLE {a} EXCEPT ALL TABLE {b}) x),"
                    " (SELECT count(*) FROM (TABLE {b} EXCEPT ALL TABLE {a}) y)"
                ).format(a=a, b=b)
            )
        ).fetchone()
        assert row is not None
        differences[table] = (int(row[0]), int(row[1]))
    return differences
