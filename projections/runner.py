"""The projector: apply the global log to read models, exactly once, one instance at a time.

Exactly once
------------
Every batch is one transaction: lock the schema's checkpoint row, read the events after it
(:meth:`EventStore.read_all`, which applies the snapshot-xmin fence), apply them, move the
checkpoint. A process killed at any instant either committed the batch and its checkpoint or
neither. The row lock also serialises two appliers that both believe they lead (a network
partition), so even then no batch is applied twice.

One active instance
-------------------
Each projection has a session advisory lock. The instance holding it applies; the others are
hot standbys that retry the lock every ``standby_interval`` seconds, so when the leader dies
(its session ends and PostgreSQL releases the lock) one of them carries on within that time.

A leader that hangs but stays connected (a frozen process, a blocked event loop) would keep
the lock for ever: its kernel still answers the server's keepalives. So a leader runs a query
on its lock session every :data:`HEARTBEAT` seconds, and a standby that finds that session
idle for longer than its ``lease`` ends it (``pg_terminate_backend``), which releases the lock.
If the hung leader wakes, its next batch finds its lock gone and it stands by; a batch it had
begun holds the checkpoint row, so the two never apply the same events.

Waking up
---------
One LISTEN connection per process wakes every runner on :data:`eventstore.NOTIFY_CHANNEL`;
each runner also polls every ``poll_interval`` seconds, because a notification can come before
the fence has passed the new event (or be lost with its connection).

Failures
--------
A batch that fails is retried event by event to find the event at fault (at once when the
projection names it with :class:`EventFailed`). That event is retried with exponential
backoff, ``max_attempts`` times in all; then the projection stops and ``projection_status``
records the event, its position and the error. Nothing is skipped, and the other projections
of the process go on. A lost database connection is not an event's fault: the runner waits and
reconnects for as long as it takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
import zlib
from collections.abc import Iterator, Sequence
from typing import Any, Final, Literal, cast

import msgspec
import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool

from eventstore import (
    NOTIFY_CHANNEL,
    Checkpoint,
    DatabaseUnavailable,
    EventStore,
    RecordedEvent,
)

from .base import (
    CHECKPOINT_TABLE,
    EventFailed,
    Projection,
    ProjectionError,
    TolerantCodec,
    checkpoint_ddl,
    live_schema,
    new_instance_id,
)

__all__ = [
    "DEFAULT_LEASE",
    "HEARTBEAT",
    "PROJECTOR_GC_THRESHOLD",
    "Applier",
    "BatchFailed",
    "BatchResult",
    "CatchUp",
    "LeadershipLost",
    "Outcome",
    "ProjectionRunner",
    "VersionMismatch",
    "Waker",
    "advisory_key",
    "catch_up",
    "clear_failure",
    "collecting_less_often",
    "lock_holder",
    "log_head",
    "record_failure",
    "run_projections",
]

log = logging.getLogger("convstore.projections")

#: First half of the advisory lock key of a projection's leader (the second is its name's CRC).
LEADER_LOCK: Final = 0x70726F6A  # "proj"
#: First half of the advisory lock key held by a rebuild of a projection.
REBUILD_LOCK: Final = 0x72626C64  # "rbld"
#: First half of the transaction-level lock that serialises a projection's DDL (create, swap).
DDL_LOCK: Final = 0x64646C30  # "ddl0"

Outcome = Literal["caught-up", "stopped", "failed", "busy"]


#: Allocations of tracked objects between two collections of the youngest generation while a
#: projector runs (Python's default is 700).
PROJECTOR_GC_THRESHOLD: Final = 50_000


@contextlib.contextmanager
def collecting_less_often(threshold: int = PROJECTOR_GC_THRESHOLD) -> Iterator[None]:
    """Run the block with Python's cyclic garbage collector looking at young objects every
    ``threshold`` allocations instead of every 700; restore the setting after.

    A projector's batch decodes a thousand events into objects the collector tracks (each
    ``uuid.UUID`` is one) and drops nearly all of them by reference counting; at the default
    threshold, collections that find nothing, and the promotions that make the full ones long,
    cost 15-20% of a catch-up's CPU (measured: 32-37k events/s at 700, 38-42k at 50,000, the
    same code and data). The setting is the process's: the projector commands (``project``,
    ``projections rebuild``) own their process and use it for their whole run; the web server
    does not.
    """
    before = gc.get_threshold()
    gc.set_threshold(threshold, *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)


def advisory_key(namespace: int, name: str) -> tuple[int, int]:
    """The two-int advisory lock key of ``name`` in ``namespace`` (both positive int4)."""
    return namespace, zlib.crc32(name.encode()) & 0x7FFFFFFF


async def lock_holder(conn: psycopg.AsyncConnection[Any], key: tuple[int, int]) -> int | None:
    """The backend pid of the session holding the advisory lock ``key`` here, if any."""
    row = await (
        await conn.execute(
            "SELECT l.pid FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted"
            " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND l.classid = %s::bigint::oid AND l.objid = %s::bigint::oid AND l.objsubid = 2",
            key,
        )
    ).fetchone()
    return int(row[0]) if row else None


def _ignore_outcome(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


#: SQLSTATE classes of errors that are the server's state, not an event's: connection (08),
#: a rolled-back transaction such as a deadlock (40), operator intervention (57), system
#: errors (58); and a full disk, too many connections, a lock timeout. Retried with backoff,
#: never charged to an event: charging one stopped the projection for good over a lock timeout
#: (found in review). Running out of memory or of temporary file space (53200, 53400) can
#: depend on the batch, so those go the way of an event's error: the batch is narrowed to the
#: event, which is retried, then stops the projection.
_TRANSIENT_CLASSES: Final = frozenset({"08", "40", "57", "58"})
_TRANSIENT_STATES: Final = frozenset({"53100", "53300", "55P03"})


def _unavailable(exc: BaseException) -> bool:
    """True for errors that are the database's (or the network's), not an event's."""
    if isinstance(exc, DatabaseUnavailable | LeadershipLost):
        return True
    if isinstance(exc, psycopg.OperationalError):
        sqlstate = exc.sqlstate
        return (
            sqlstate is None or sqlstate[:2] in _TRANSIENT_CLASSES or sqlstate in _TRANSIENT_STATES
        )
    return isinstance(exc, psycopg.InterfaceError | OSError)


class BatchResult(msgspec.Struct, frozen=True):
    """What one batch did: events read (applied or skipped) and the checkpoint after them."""

    events: int
    checkpoint: Checkpoint
    caught_up: bool


class BatchFailed(ProjectionError):
    """A batch failed; carries the events it read and, when known, which one failed."""

    def __init__(
        self, events: Sequence[RecordedEvent], cause: BaseException, index: int | None = None
    ) -> None:
        super().__init__(str(cause) if index is not None else f"{type(cause).__name__}: {cause}")
        self.events = tuple(events)
        self.cause = cause
        #: the failing event's index in ``events`` (``None``: some event of the batch)
        self.index = index


class LeadershipLost(ProjectionError):
    """The session holding this instance's leader lock is gone: another instance may lead."""


class VersionMismatch(ProjectionError):
    """The read model was built by another version of the projection's code."""

    def __init__(self, name: str, schema: str, found: int, code: int) -> None:
        action = "it will be rebuilt" if found < code else "upgrade convstore"
        super().__init__(
            f"read model {name!r} in {schema} is version {found}, this code is version {code}:"
            f" {action}"
        )
        self.found = found
        self.code = code


#: A batch's statements are planned with sequential scans off (for their transaction only).
#: They are keyed lookups and upserts on tables that a catch-up creates empty and fills
#: fast, and psycopg prepares them: a generic plan made while a table was small (or empty,
#: after a rebuild or a recreated schema on a connection that had run the statement before)
#: seq-scans it, and PostgreSQL keeps that plan until an ANALYZE of the table, which
#: autovacuum may not run for a minute. Measured: a catch-up's messages and conversations
#: tables seq-scanned once per batch, and the server's CPU per event tripled (47 µs against
#: 13). Planning each statement anew instead costs about 0.4 ms a statement for a batch's
#: arrays of ids.
_SEQSCAN_OFF: Final = "set_config('enable_seqscan', 'off', true)"
_KEYED_PLANS: Final = "SELECT " + _SEQSCAN_OFF


class Applier:
    """Applies the log to one schema of one projection, a batch per transaction.

    ``schema`` may be any schema (``rm_<name>`` for the live model, ``rm_<name>_next`` for a
    rebuild, ``pg_temp`` for temporary tables): the projection's code is the same for all.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        projection: Projection,
        schema: str,
        *,
        instance: str | None = None,
        prefetch: bool = True,
    ) -> None:
        self.projection = projection
        self.schema = schema
        self.instance = instance or new_instance_id()
        # The projector's own reader: decodes with the projection's codec, and turns a row it
        # cannot decode into a stand-in instead of failing the batch without naming the row.
        self.store = EventStore(pool, TolerantCodec(projection.codec))
        #: Read the next batch on another pool connection while writing one.
        self.prefetch = prefetch
        # Folding ahead reads the tables on another connection, which sees neither another
        # session's temporary tables nor what a caller's open transaction wrote.
        self._temporary = schema.startswith("pg_temp")
        #: Batches that were folded while the batch before them was written (a statistic).
        self.folded_ahead = 0
        self._prefetch: _ReadAhead | None = None
        # The projection's memory of its rows, valid while the schema's checkpoint table (by
        # oid: a rebuild's swap replaces it) stands at the checkpoint of our last commit.
        self._memory: Any = None
        self._memory_key: tuple[int, Checkpoint] | None = None
        table = sql.Identifier(schema, CHECKPOINT_TABLE)
        # Asynchronous commit: a server crash can lose the last batches, but each batch with
        # its checkpoint, so they are applied again; the model is never torn. It saves a WAL
        # flush per batch. Sequential scans off: see _KEYED_PLANS. Both statements are
        # rendered once (psycopg renders a Composed at every call).
        # The batch's first statement also reads the model's version (a rebuild may have
        # swapped in one this code did not build) and, for a leader, whether its lock's session
        # still holds the lock (else another instance may be leading): the row lock taken here
        # makes that instance wait for this batch, so the check holds until it commits.
        self._lock_checkpoint = (
            sql.SQL(
                "SELECT transaction_id, position, tableoid::bigint, version,"
                " set_config('synchronous_commit', 'off', true), {seqscan_off},"
                " %s::integer IS NULL OR EXISTS (SELECT FROM pg_locks WHERE locktype = 'advisory'"
                " AND granted AND pid = %s AND classid::bigint = %s AND objid::bigint = %s"
                " AND objsubid = 2)"
                " FROM {t} WHERE projection = %s FOR UPDATE"
            )
            .format(t=table, seqscan_off=sql.SQL(_SEQSCAN_OFF))
            .as_bytes(None)
        )
        #: (pid of the session holding the leader lock, the lock's two keys) while leading.
        self.fence: tuple[int, int, int] | None = None
        self._move_checkpoint = (
            sql.SQL(
                "UPDATE {t} SET transaction_id = %s, position = %s, events = events + %s,"
                " applied_by = %s, updated_at = now() WHERE projection = %s"
            )
            .format(t=table)
            .as_bytes(None)
        )
        self._read_checkpoint = sql.SQL(
            "SELECT transaction_id, position, version, indexed FROM {t} WHERE projection = %s"
        ).format(t=table)

    async def state(
        self, conn: psycopg.AsyncConnection[Any]
    ) -> tuple[Checkpoint, int, bool] | None:
        """(checkpoint, version, indexed) of the schema; ``None`` when it has no tables."""
        exists = await (
            await conn.execute(
                "SELECT to_regclass(%s) IS NOT NULL",
                (sql.Identifier(self.schema, CHECKPOINT_TABLE).as_string(conn),),
            )
        ).fetchone()
        if not exists or not exists[0]:
            return None
        row = await (await conn.execute(self._read_checkpoint, (self.projection.name,))).fetchone()
        if row is None:
            return None
        return Checkpoint(row[0], row[1]), int(row[2]), bool(row[3])

    async def create(
        self, conn: psycopg.AsyncConnection[Any], *, defer_indexes: bool = False
    ) -> None:
        """Create the schema (unless ``pg_temp``), the tables and a checkpoint at the start.

        Runs in the caller's transaction if there is one. With ``defer_indexes`` the query
        indexes wait for :meth:`create_indexes` (a rebuild loads faster without them).
        """
        async with conn.transaction():
            if self.schema != "pg_temp":
                await conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(self.schema)))
            await conn.execute(checkpoint_ddl(self.schema))
            for statement in self.projection.table_ddl(self.schema):
                await conn.execute(statement)
            if not defer_indexes:
                for statement in self.projection.index_ddl(self.schema):
                    await conn.execute(statement)
            await conn.execute(
                sql.SQL(
                    "INSERT INTO {t} (projection, version, indexed, applied_by)"
                    " VALUES (%s, %s, %s, %s)"
                ).format(t=sql.Identifier(self.schema, CHECKPOINT_TABLE)),
                (self.projection.name, self.projection.version, not defer_indexes, self.instance),
            )

    async def create_indexes(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Create the deferred query indexes and refresh the planner's statistics.

        Outside a transaction: each index is built ``CONCURRENTLY``, on its own. A plain
        ``CREATE INDEX`` holds a transaction id for the whole build, and with it the log's
        fence, so every reader of the log (the live projectors too) stood still while it ran:
        7.4 s for an index of 3M rows measured here, against no transaction id at any time for
        a concurrent build. Such a build waits for older snapshots instead, so the rebuild
        waits for them and nobody waits for it. Temporary tables (``pg_temp``) are private,
        and their builds are never concurrent.
        """
        state = await self.state(conn)
        if state is not None and not state[2]:
            concurrently = self.schema != "pg_temp"
            if concurrently:
                await self._drop_invalid_indexes(conn)
            for statement in self.projection.index_ddl(self.schema, concurrently=concurrently):
                await conn.execute(statement)
            await conn.execute(
                sql.SQL("UPDATE {t} SET indexed = true").format(
                    t=sql.Identifier(self.schema, CHECKPOINT_TABLE)
                )
            )
        for table in self.projection.tables:
            await conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(self.schema, table)))

    async def _drop_invalid_indexes(self, conn: psycopg.AsyncConnection[Any]) -> None:
        # An interrupted concurrent build leaves its index behind, invalid; IF NOT EXISTS would
        # then skip it, so a resumed rebuild drops it and builds it again.
        rows = await (
            await conn.execute(
                "SELECT ci.relname FROM pg_index i"
                " JOIN pg_class ci ON ci.oid = i.indexrelid"
                " JOIN pg_namespace n ON n.oid = ci.relnamespace"
                " WHERE n.nspname = %s AND NOT i.indisvalid",
                (self.schema,),
            )
        ).fetchall()
        for (name,) in rows:
            log.info("%s: dropping %s, left invalid by an interrupted build", self.schema, name)
            await conn.execute(
                sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(self.schema, name))
            )

    # ------------------------------------------------------------------ read-ahead
    #
    # While a batch is written, the next one is read on another connection, and (for a
    # projection that says it may, see Projection.remember) also folded against the memory
    # of this batch, so PostgreSQL executes the writes while Python decodes and folds the next
    # events (two cores instead of one). Safe because the fence makes a read a stable prefix of
    # the log: the events after a checkpoint, once returned, are the first ones after it for
    # ever; and because the memory holds every row the batch being written changes, so what the
    # fold loads from the tables is the same before and after that batch commits. A read-ahead
    # is used only if the locked checkpoint is the one it started from, and only when it filled
    # a batch (a short one may have missed events that arrived since); a fold ahead only if the
    # memory is still the one it folded against. One that is still waiting for a pool
    # connection when it is wanted is dropped, so a busy pool never stalls the batch. A memory
    # that a dropped fold ahead may have changed is dropped with it.

    def _start_prefetch(
        self, after: Checkpoint, limit: int, until: Checkpoint | None, memory: Any
    ) -> None:
        self._cancel_prefetch()
        ahead = _ReadAhead(after, limit, until, memory)
        ahead.task = asyncio.ensure_future(self._read_ahead(ahead))
        self._prefetch = ahead

    async def _read_ahead(self, ahead: _ReadAhead) -> tuple[list[RecordedEvent], Any]:
        async with self.store.pool.connection() as conn:
            ahead.reading = True
            events = await self.store.read_all(ahead.after, ahead.limit, connection=conn)
            if ahead.memory is None or len(events) != ahead.limit:
                return events, None
            relevant = self._relevant(events, ahead.until)
            if not relevant:
                return events, None
            ahead.folding = True
            try:
                async with conn.transaction():
                    await conn.execute(_KEYED_PLANS)
                    prepared = await self.projection.prepare(
                        conn, self.schema, relevant, ahead.memory
                    )
            except Exception:  # the batch is applied the usual way, and fails there if it must
                return events, None
            return events, prepared

    def _relevant(
        self, events: list[RecordedEvent], until: Checkpoint | None
    ) -> list[RecordedEvent]:
        """The events of a batch the projection applies (up to ``until``)."""
        handles = self.projection.handles
        if until is not None and events and events[-1].checkpoint > until:
            return [e for e in events if e.checkpoint <= until and e.type in handles]
        return [e for e in events if e.type in handles]

    def _cancel_prefetch(self) -> None:
        if self._prefetch is not None:
            task = self._prefetch.task
            self._prefetch = None
            if task is not None:
                task.cancel()
                # The task's outcome (often a cancellation) is not needed; silence it.
                task.add_done_callback(_ignore_outcome)

    async def _prefetched(
        self, checkpoint: Checkpoint, limit: int, until: Checkpoint | None, memory: Any
    ) -> tuple[list[RecordedEvent] | None, Any, bool]:
        """(events read ahead, the batch folded ahead, whether ``memory`` is still good)."""
        ahead = self._prefetch
        if ahead is None or ahead.task is None:
            return None, None, True
        if not (ahead.after == checkpoint and ahead.limit == limit and ahead.reading):
            self._cancel_prefetch()
            return None, None, not self._touched(ahead, memory)
        self._prefetch = None
        try:
            events, prepared = await ahead.task
        except Exception:  # a failed read-ahead is only a missed optimisation
            return None, None, not self._touched(ahead, memory)
        # Read only now: the task may have begun its fold while it was awaited.
        touched = self._touched(ahead, memory)
        if len(events) != limit:  # (never folded ahead: see _read_ahead)
            return None, None, not touched
        if touched and prepared is not None and ahead.until == until:
            return events, prepared, True
        return events, None, not touched

    @staticmethod
    def _touched(ahead: _ReadAhead, memory: Any) -> bool:
        """Whether ``ahead`` began a fold against ``memory``, changing it: that memory is no
        longer good unless the batch it folded is used."""
        return ahead.folding and ahead.memory is memory

    async def close(self) -> None:
        """Cancel a pending read-ahead (call when done with the applier)."""
        if self._prefetch is not None:
            task = self._prefetch.task
            self._cancel_prefetch()
            if task is not None:
                with contextlib.suppress(BaseException):
                    await task

    async def apply_batch(
        self,
        conn: psycopg.AsyncConnection[Any],
        limit: int,
        *,
        until: Checkpoint | None = None,
    ) -> BatchResult:
        """Apply up to ``limit`` events after the checkpoint, with the checkpoint, atomically.

        ``until`` stops at that checkpoint (inclusive): a build of the model as of a place in
        the log. Raises :class:`BatchFailed` when it cannot (nothing is written then).
        """
        try:
            return await self._apply_batch(conn, limit, until)
        except BaseException:
            self._cancel_prefetch()
            raise

    async def _apply_batch(
        self, conn: psycopg.AsyncConnection[Any], limit: int, until: Checkpoint | None
    ) -> BatchResult:
        # The memory is taken out while the batch runs: only its commit makes it valid again.
        memory, key = self._memory, self._memory_key
        self._memory = self._memory_key = None
        commits = conn.info.transaction_status == TransactionStatus.IDLE
        async with conn.transaction():
            pid, key1, key2 = self.fence or (None, None, None)
            row = await (
                await conn.execute(
                    self._lock_checkpoint, (pid, pid, key1, key2, self.projection.name)
                )
            ).fetchone()
            if row is None:
                raise ProjectionError(f"{self.schema} has no checkpoint for {self.projection}")
            if row[3] != self.projection.version:
                raise VersionMismatch(
                    self.projection.name, self.schema, int(row[3]), self.projection.version
                )
            if not row[6]:
                raise LeadershipLost(
                    f"{self.projection.name} ({self.schema}): the session holding this"
                    " instance's lock is gone, so another instance may hold it now"
                )
            checkpoint = Checkpoint(row[0], row[1])
            table = int(row[2])
            events, prepared, memory_good = await self._prefetched(checkpoint, limit, until, memory)
            if key != (table, checkpoint) or not memory_good:
                memory, prepared = self.projection.new_memory(), None
            elif prepared is not None:
                self.folded_ahead += 1
            result = await self._apply_events(
                conn, limit, until, checkpoint, memory, events, prepared, commits
            )
        self._memory, self._memory_key = memory, (table, result.checkpoint)
        return result

    async def _apply_events(
        self,
        conn: psycopg.AsyncConnection[Any],
        limit: int,
        until: Checkpoint | None,
        checkpoint: Checkpoint,
        memory: Any,
        events: list[RecordedEvent] | None,
        prepared: Any,
        commits: bool,
    ) -> BatchResult:
        if until is not None and checkpoint >= until:
            return BatchResult(0, checkpoint, True)
        if events is None:
            events = await self.store.read_all(checkpoint, limit, connection=conn)
        full = len(events) == limit
        ahead = self.prefetch and full and (until is None or events[-1].checkpoint < until)
        if ahead and memory is None:
            self._start_prefetch(events[-1].checkpoint, limit, until, None)
        relevant = self._relevant(events, until)
        if until is not None and events and events[-1].checkpoint > until:
            events = [e for e in events if e.checkpoint <= until]
            full = False
        if not events:
            return BatchResult(0, checkpoint, True)
        if relevant:
            try:
                if memory is None:
                    await self.projection.apply(conn, self.schema, relevant)
                else:
                    if prepared is None:
                        prepared = await self.projection.prepare(
                            conn, self.schema, relevant, memory
                        )
                    fold_ahead = self.projection.remember(memory, prepared)
                    fold_ahead = fold_ahead and commits and not self._temporary
                    if ahead:
                        self._start_prefetch(
                            events[-1].checkpoint, limit, until, memory if fold_ahead else None
                        )
                    await self.projection.write(conn, self.schema, prepared, memory)
            except EventFailed as exc:
                index = next(
                    (i for i, e in enumerate(events) if e.checkpoint == exc.event.checkpoint),
                    None,
                )
                raise BatchFailed(events, exc, index) from exc
            except Exception as exc:
                if _unavailable(exc):
                    raise
                raise BatchFailed(events, exc) from exc
        elif ahead and memory is not None:
            self._start_prefetch(events[-1].checkpoint, limit, until, None)
        last = events[-1].checkpoint
        await conn.execute(
            self._move_checkpoint,
            (
                last.transaction_id,
                last.position,
                len(events),
                self.instance,
                self.projection.name,
            ),
        )
        return BatchResult(len(events), last, not full)


class _ReadAhead:
    """The next batch being read on another connection from ``after``, and folded ahead
    against ``memory`` unless that is ``None``."""

    __slots__ = ("after", "folding", "limit", "memory", "reading", "task", "until")

    def __init__(
        self, after: Checkpoint, limit: int, until: Checkpoint | None, memory: Any
    ) -> None:
        self.after = after
        self.limit = limit
        self.until = until
        self.memory = memory
        #: True once it holds a connection (before that, reading directly is no slower)
        self.reading = False
        #: True once the fold ahead began: from then on it may have changed ``memory``
        self.folding = False
        self.task: asyncio.Future[tuple[list[RecordedEvent], Any]] | None = None


class _Failure(msgspec.Struct, frozen=True):
    """An event that failed ``attempts`` times in a row."""

    event: RecordedEvent
    error: str
    attempts: int


class CatchUp:
    """Drives an :class:`Applier` batch after batch, isolating and retrying failing events.

    Shared by the live runner and the rebuild, so both treat a bad event the same way.
    """

    def __init__(
        self,
        applier: Applier,
        *,
        batch_size: int = 1000,
        max_attempts: int = 5,
        retry_delay: float = 0.5,
        max_retry_delay: float = 30.0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be positive, not {batch_size}")
        self.applier = applier
        self.batch_size = batch_size
        self.max_attempts = max(1, max_attempts)
        self.retry_delay = retry_delay
        self.max_retry_delay = max_retry_delay
        self._careful = 0  # events still to apply one by one after a failed batch
        self._prefix = 0  # events known good before a failing one
        self._attempts = 0
        self.last_error: str | None = None

    async def step(
        self,
        conn: psycopg.AsyncConnection[Any],
        *,
        until: Checkpoint | None = None,
    ) -> BatchResult | _Failure | float:
        """Apply one batch. Returns its result; a delay to wait before the next try; or the
        failure that should stop the projection."""
        if self._prefix:
            limit = self._prefix
        elif self._careful:
            limit = 1
        else:
            limit = self.batch_size
        try:
            result = await self.applier.apply_batch(conn, limit, until=until)
        except BatchFailed as exc:
            return self._failed(exc)
        self._attempts = 0
        self._prefix = 0
        self._careful = max(0, self._careful - result.events)
        return result

    def _failed(self, exc: BatchFailed) -> _Failure | float:
        self.last_error = str(exc)
        self._prefix = 0
        if exc.index is None and len(exc.events) > 1:
            # Find the culprit: the events of this batch again, one transaction each.
            self._careful = len(exc.events)
            log.warning("%s: batch failed (%s); retrying it event by event", self._label, exc)
            return 0.0
        index = exc.index or 0
        if index > 0:
            # The projection named the event: apply the good ones before it as one batch,
            # then the failing one alone.
            self._prefix = index
            self._careful = max(self._careful, 1)
            return 0.0
        event = exc.events[index]
        self._careful = max(self._careful, 1)
        self._attempts += 1
        if self._attempts >= self.max_attempts:
            return _Failure(event, str(exc), self._attempts)
        delay = min(self.retry_delay * 2.0 ** (self._attempts - 1), self.max_retry_delay)
        log.warning(
            "%s: event %s at %s failed (attempt %d of %d, next in %.1fs): %s",
            self._label,
            event.event_id,
            event.checkpoint,
            self._attempts,
            self.max_attempts,
            delay,
            exc,
        )
        return delay

    @property
    def _label(self) -> str:
        return f"{self.applier.projection.name} ({self.applier.schema})"


class Waker:
    """One LISTEN connection per process; wakes every registered runner on a notification."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self.pool = pool
        self._events: list[asyncio.Event] = []

    def register(self) -> asyncio.Event:
        """An event set whenever new appends are announced."""
        event = asyncio.Event()
        self._events.append(event)
        return event

    async def run(self, stop: asyncio.Event) -> None:
        """Listen until ``stop``; reconnect after a lost connection (runners poll meanwhile)."""
        while not stop.is_set():
            try:
                conn = await _connect(self.pool, "convstore projector listener")
                try:
                    await conn.execute("LISTEN " + NOTIFY_CHANNEL)
                    while not stop.is_set():
                        async for _ in conn.notifies(timeout=0.5, stop_after=1):
                            for event in self._events:
                                event.set()
                finally:
                    await conn.close()
            except Exception as exc:
                if not _unavailable(exc):
                    raise
                log.warning("wake-up listener lost its connection (%s); reconnecting", exc)
                await _sleep(stop, None, 1.0)


#: Server-side probes of a lock-holding session's client (seconds; the timeout in ms).
_KEEPALIVE_OPTIONS: Final = (
    "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3"
    " -c tcp_user_timeout=30000"
)
#: libpq's probes of the server, on the same connections.
_CLIENT_KEEPALIVES: Final = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30000,
}


async def _connect(
    pool: AsyncConnectionPool[Any], application_name: str
) -> psycopg.AsyncConnection[Any]:
    """A connection of its own (not from the pool), with the pool's settings.

    These connections hold locks (a leader's, a rebuild's) that a standby waits for, so a
    vanished peer is noticed in about half a minute rather than the systems' default two
    hours: the server probes and drops a silent client (which releases its locks), and libpq
    probes the server. Over a Unix socket there is no peer host to lose, and both are unused.
    """
    kwargs = dict(cast(dict[str, Any], pool.kwargs))
    kwargs["application_name"] = application_name
    kwargs["options"] = (kwargs.get("options", "") + " " + _KEEPALIVE_OPTIONS).strip()
    kwargs.update(_CLIENT_KEEPALIVES)
    try:
        return await psycopg.AsyncConnection.connect(cast(str, pool.conninfo), **kwargs)
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(f"PostgreSQL is unavailable: {type(exc).__name__}") from exc


async def _sleep(stop: asyncio.Event, wake: asyncio.Event | None, timeout: float) -> None:
    """Wait ``timeout`` seconds, or less if ``stop`` (or ``wake``) is set first."""
    if timeout <= 0 or stop.is_set():
        return
    waiters = [asyncio.ensure_future(stop.wait())]
    if wake is not None:
        waiters.append(asyncio.ensure_future(wake.wait()))
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    if wake is not None:
        wake.clear()


#: Seconds between a leader's queries on its lock session, which show the standbys it is alive.
HEARTBEAT: Final = 1.0
#: Seconds a leader's lock session may stay idle before a standby ends it (the default lease).
DEFAULT_LEASE: Final = 60.0

# A session that has run nothing for longer than the lease. Only an idle session: one running
# a query is not hung. A session of another role, whose activity this role may not see, shows
# a NULL state and is never picked.
_IDLE_PAST_LEASE: Final = """
SELECT application_name, extract(epoch FROM now() - state_change)::float8
FROM pg_stat_activity
WHERE pid = %s AND state = 'idle' AND state_change < now() - make_interval(secs => %s)
"""


async def _heartbeat(lock: psycopg.AsyncConnection[Any]) -> None:
    """Run a query on the leader's lock session every :data:`HEARTBEAT` seconds, for ever."""
    while True:
        await asyncio.sleep(HEARTBEAT)
        # A broken session is the leader loop's to notice (its batches check the lock).
        with contextlib.suppress(psycopg.Error):
            await lock.execute("SELECT 1")


class ProjectionRunner:
    """Runs one projection: wins (or waits for) leadership, catches up, follows the log."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        projection: Projection,
        *,
        batch_size: int = 1000,
        poll_interval: float = 0.5,
        standby_interval: float = 1.0,
        max_attempts: int = 5,
        retry_delay: float = 0.5,
        instance: str | None = None,
        lease: float | None = DEFAULT_LEASE,
    ) -> None:
        """``lease``: seconds after which a standby ends a leader session that has stopped
        showing signs of life (None: never)."""
        if lease is not None and not lease > 2 * HEARTBEAT:
            raise ValueError(f"the lease must be longer than {2 * HEARTBEAT:g}s, not {lease!r}")
        self.pool = pool
        self.projection = projection
        self.schema = live_schema(projection.name)
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.standby_interval = standby_interval
        self.max_attempts = max_attempts
        self.retry_delay = retry_delay
        self.lease = lease
        self.instance = instance or new_instance_id()
        self.applier = Applier(pool, projection, self.schema, instance=self.instance)
        #: True while this instance holds the projection's leader lock.
        self.is_leader = False

    @property
    def _app_name(self) -> str:
        return f"convstore projector {self.projection.name}"

    async def run(
        self,
        stop: asyncio.Event,
        *,
        once: bool = False,
        wake: asyncio.Event | None = None,
    ) -> Outcome:
        """Run until ``stop`` is set (or, with ``once``, until caught up with the log).

        Returns ``caught-up`` (once), ``stopped``, ``failed`` (the projection stopped; see
        ``projection_status``) or ``busy`` (once, and another instance leads).
        """
        try:
            return await self._run(stop, once, wake)
        except Exception as exc:
            # Whatever went wrong stops this projection only; the process's others go on.
            log.error(
                "%s: stopped: %s",
                self.projection.name,
                exc,
                exc_info=not isinstance(exc, ProjectionError),
            )
            from .rebuild import RebuildFailed

            with contextlib.suppress(Exception):
                async with self.pool.connection() as conn:
                    if isinstance(exc, RebuildFailed):
                        # An event stopped the upgrade's rebuild: the projection is failed on
                        # it, as when the live model stops on one (status and alerts say so).
                        await record_failure(
                            conn, self.projection.name, exc.event, exc.error, exc.attempts
                        )
                        return "failed"
                    # 'halted', not 'stopped': status must tell this from a clean shutdown.
                    await conn.execute(
                        "INSERT INTO projection_status AS s (name, state, last_error,"
                        " last_error_at) VALUES (%s, 'halted', %s, now())"
                        " ON CONFLICT (name) DO UPDATE SET state = CASE WHEN"
                        " s.failed_checkpoint IS NULL THEN 'halted' ELSE 'failed' END,"
                        " last_error = EXCLUDED.last_error, last_error_at = now(),"
                        " updated_at = now()",
                        (self.projection.name, str(exc)[:4000]),
                    )
            return "failed"

    async def _run(self, stop: asyncio.Event, once: bool, wake: asyncio.Event | None) -> Outcome:
        delay = 0.5
        while not stop.is_set():
            lock: psycopg.AsyncConnection[Any] | None = None
            connected_at: float | None = None
            try:
                lock = await _connect(self.pool, self._app_name + " standby")
                connected_at = time.monotonic()
                if not await self._lead(lock, stop, once):
                    return "busy" if once and not stop.is_set() else "stopped"
                return await self._serve(lock, stop, once, wake)
            except Exception as exc:
                if not _unavailable(exc):
                    raise
                if connected_at is not None and time.monotonic() - connected_at > 30.0:
                    # A new outage after a good while connected starts the backoff afresh.
                    delay = 0.5
                log.warning(
                    "%s: database unavailable (%s); retrying in %.1fs",
                    self.projection.name,
                    exc,
                    delay,
                )
                await _sleep(stop, None, delay)
                delay = min(delay * 2, 10.0)
            finally:
                self.is_leader = False
                self.applier.fence = None
                if lock is not None:
                    # Ending the session releases the advisory lock for a standby.
                    with contextlib.suppress(Exception):
                        await lock.close()
        return "stopped"

    async def _lead(
        self, lock: psycopg.AsyncConnection[Any], stop: asyncio.Event, once: bool
    ) -> bool:
        """Take the leader lock, waiting as a standby; False if stopped (or busy, once)."""
        key = advisory_key(LEADER_LOCK, self.projection.name)
        announced = False
        while not stop.is_set():
            # The server's own pid: behind a pooler, the one libpq reports is not the backend's.
            row = await (
                await lock.execute("SELECT pg_try_advisory_lock(%s, %s), pg_backend_pid()", key)
            ).fetchone()
            if row is not None and row[0]:
                await lock.execute(
                    sql.SQL("SET application_name = {}").format(
                        sql.Literal(self._app_name + " leader")
                    )
                )
                self.is_leader = True
                self.applier.fence = (int(row[1]), *key)
                log.info("%s: leading as %s", self.projection.name, self.instance)
                return True
            if once:
                log.info("%s: another instance is active; nothing to do", self.projection.name)
                return False
            if not announced:
                log.info("%s: standing by (another instance leads)", self.projection.name)
                announced = True
            if self.lease is not None and await self._end_stale_leader(lock, key):
                continue
            await _sleep(stop, None, self.standby_interval)
        return False

    async def _end_stale_leader(
        self, lock: psycopg.AsyncConnection[Any], key: tuple[int, int]
    ) -> bool:
        """End the leader's session if it has been idle past the lease; True if it was ended."""
        pid = await lock_holder(lock, key)
        if pid is None:
            return False
        row = await (await lock.execute(_IDLE_PAST_LEASE, (pid, self.lease))).fetchone()
        if row is None:
            return False
        name, idle = row
        log.warning(
            "%s: the leader's session (backend pid %s, %s) has run nothing for %.0fs, past the"
            " %gs lease: ending it so this instance can lead",
            self.projection.name,
            pid,
            name,
            idle,
            self.lease,
        )
        try:
            ended = await (
                await lock.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
            ).fetchone()
        except pg_errors.InsufficientPrivilege as exc:
            log.warning("%s: cannot end the leader's session: %s", self.projection.name, exc)
            return False
        return bool(ended and ended[0])

    async def _serve(
        self,
        lock: psycopg.AsyncConnection[Any],
        stop: asyncio.Event,
        once: bool,
        wake: asyncio.Event | None,
    ) -> Outcome:
        heartbeat = asyncio.create_task(_heartbeat(lock))
        try:
            return await self._serve_on(lock, stop, once, wake)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            await self.applier.close()

    async def _serve_on(
        self,
        lock: psycopg.AsyncConnection[Any],
        stop: asyncio.Event,
        once: bool,
        wake: asyncio.Event | None,
    ) -> Outcome:
        async with self.pool.connection() as conn:
            await self._set_state(conn, "running")
            failed_at = await self._recorded_failure(conn)
            if not await self._prepare(conn, stop):
                return "stopped"
            catch = CatchUp(
                self.applier,
                batch_size=self.batch_size,
                max_attempts=self.max_attempts,
                retry_delay=self.retry_delay,
            )
            loop = asyncio.get_running_loop()
            checked = loop.time()
            # Once: everything committed before now. A batch can come back short before it,
            # while a transaction elsewhere holds the fence back.
            head = await log_head(conn) if once else None
            waited = loop.time()
            while not stop.is_set():
                result = await catch.step(conn)
                if isinstance(result, _Failure):
                    await self._record_failure(conn, result)
                    return "failed"
                if isinstance(result, float):
                    await _sleep(stop, None, result)
                    continue
                if failed_at is not None and result.checkpoint >= failed_at:
                    log.info("%s: applied past the event that had failed", self.projection.name)
                    await clear_failure(conn, self.projection.name)
                    failed_at = None
                if not result.caught_up:
                    continue
                if once:
                    if head is None or result.checkpoint >= head:
                        break
                    if loop.time() - waited > 5.0:
                        log.info(
                            "%s: waiting for transactions that hold the log back (at %s of %s)",
                            self.projection.name,
                            result.checkpoint,
                            head,
                        )
                        waited = loop.time()
                    await _sleep(stop, None, min(self.poll_interval, 0.1))
                    continue
                if loop.time() - checked > 5.0:
                    # The lock's session must still be alive, else another instance may lead.
                    await lock.execute("SELECT 1")
                    checked = loop.time()
                await _sleep(stop, wake, self.poll_interval)
            await self._set_state(conn, "stopped")
            return "caught-up" if once and not stop.is_set() else "stopped"

    async def _prepare(self, conn: psycopg.AsyncConnection[Any], stop: asyncio.Event) -> bool:
        """Create the live read model if missing; rebuild it if an older version built it.

        Returns False when stopped during a rebuild.
        """
        state = await self.applier.state(conn)
        if state is None:
            async with conn.transaction():
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(%s, %s)",
                    advisory_key(DDL_LOCK, self.projection.name),
                )
                if await self.applier.state(conn) is None:
                    log.info("%s: creating the read model in %s", self.projection.name, self.schema)
                    await self.applier.create(conn)
            return True
        version = state[1]
        if version == self.projection.version:
            return True
        mismatch = VersionMismatch(
            self.projection.name, self.schema, version, self.projection.version
        )
        if version > self.projection.version:
            raise mismatch
        log.warning("%s", mismatch)
        from .rebuild import rebuild

        # if_outdated: when another instance's rebuild ran meanwhile, it is not done again.
        result = await rebuild(
            self.pool,
            self.projection,
            batch_size=self.batch_size,
            stop=stop,
            wait=True,
            if_outdated=True,
        )
        return result.swapped

    async def _recorded_failure(self, conn: psycopg.AsyncConnection[Any]) -> Checkpoint | None:
        row = await (
            await conn.execute(
                "SELECT failed_checkpoint FROM projection_status"
                " WHERE name = %s AND failed_checkpoint IS NOT NULL",
                (self.projection.name,),
            )
        ).fetchone()
        if row is None:
            return None
        log.info("%s: retrying the event that stopped it at %s", self.projection.name, row[0])
        return Checkpoint.parse(row[0])

    async def _set_state(self, conn: psycopg.AsyncConnection[Any], state: str) -> None:
        # A recorded failure outlives a clean stop: the state goes back to 'failed'.
        await conn.execute(
            """
            INSERT INTO projection_status AS s (name, state, leader, leader_since)
            VALUES (%s, %s, %s, now())
            ON CONFLICT (name) DO UPDATE SET
                state = CASE WHEN EXCLUDED.state = 'stopped' AND s.failed_checkpoint IS NOT NULL
                             THEN 'failed' ELSE EXCLUDED.state END,
                leader = EXCLUDED.leader,
                leader_since = CASE WHEN s.leader IS NOT DISTINCT FROM EXCLUDED.leader
                                    THEN s.leader_since ELSE now() END,
                updated_at = now()
            """,
            (self.projection.name, state, self.instance),
        )

    async def _record_failure(self, conn: psycopg.AsyncConnection[Any], failure: _Failure) -> None:
        event = failure.event
        log.error(
            "%s: stopped: event %s (%s in %s at %s) failed %d times: %s",
            self.projection.name,
            event.event_id,
            event.type,
            event.stream_id,
            event.checkpoint,
            failure.attempts,
            failure.error,
        )
        await record_failure(conn, self.projection.name, event, failure.error, failure.attempts)


async def clear_failure(conn: psycopg.AsyncConnection[Any], name: str) -> None:
    """Forget the failure on record for projection ``name`` (it got past the event)."""
    await conn.execute(
        "UPDATE projection_status SET failed_event_id = NULL, failed_event_type = NULL,"
        " failed_stream_id = NULL, failed_checkpoint = NULL, failed_attempts = NULL,"
        " state = CASE WHEN state = 'failed' THEN 'running' ELSE state END, updated_at = now()"
        " WHERE name = %s",
        (name,),
    )


async def record_failure(
    conn: psycopg.AsyncConnection[Any],
    name: str,
    event: RecordedEvent,
    error: str,
    attempts: int,
) -> None:
    """Record in ``projection_status`` that ``event`` stopped projection ``name``."""
    await conn.execute(
        """
        INSERT INTO projection_status AS s (
            name, state, last_error, last_error_at, failed_event_id, failed_event_type,
            failed_stream_id, failed_checkpoint, failed_attempts)
        VALUES (%s, 'failed', %s, now(), %s, %s, %s, %s, %s)
        ON CONFLICT (name) DO UPDATE SET
            state = 'failed', last_error = EXCLUDED.last_error, last_error_at = now(),
            failed_event_id = EXCLUDED.failed_event_id,
            failed_event_type = EXCLUDED.failed_event_type,
            failed_stream_id = EXCLUDED.failed_stream_id,
            failed_checkpoint = EXCLUDED.failed_checkpoint,
            failed_attempts = EXCLUDED.failed_attempts,
            updated_at = now()
        """,
        (
            name,
            error[:4000],
            event.event_id,
            event.type,
            event.stream_id,
            str(event.checkpoint),
            attempts,
        ),
    )


async def log_head(conn: psycopg.AsyncConnection[Any]) -> Checkpoint | None:
    """The checkpoint of the newest committed event (``None``: the log is empty).

    Unlike :meth:`EventStore.head` this ignores the fence: it is a target to reach, not a
    place to read from.
    """
    row = await (
        await conn.execute(
            "SELECT transaction_id::text::bigint, position FROM events"
            " ORDER BY events.transaction_id DESC, events.position DESC LIMIT 1"
        )
    ).fetchone()
    return Checkpoint(row[0], row[1]) if row else None


async def catch_up(
    pool: AsyncConnectionPool[Any],
    projections: Sequence[Projection],
    *,
    timeout: float = 60.0,
    **options: Any,
) -> dict[str, Outcome]:
    """Bring each projection up to the newest event committed before this call.

    Runs ``once`` passes (leading each projection, or waiting for the instance that leads it)
    until every checkpoint has reached that event: the fence can hold a pass back while a
    transaction elsewhere in the cluster is open. A projection that fails is not run again.
    Returns each projection's last outcome; ``options`` go to :func:`run_projections`.
    """
    async with pool.connection() as conn:
        head = await log_head(conn)
    outcomes: dict[str, Outcome] = {}
    remaining = list(projections)
    async with asyncio.timeout(timeout):
        while True:
            passed = await run_projections(pool, remaining, once=True, **options)
            outcomes.update(passed)
            behind = []
            async with pool.connection() as conn:
                for projection in remaining:
                    if passed[projection.name] == "failed" or head is None:
                        continue
                    applier = Applier(pool, projection, live_schema(projection.name))
                    state = await applier.state(conn)
                    if state is None or state[0] < head:
                        behind.append(projection)
            if not behind:
                return outcomes
            remaining = behind
            await asyncio.sleep(0.02)


async def run_projections(
    pool: AsyncConnectionPool[Any],
    projections: Sequence[Projection],
    *,
    stop: asyncio.Event | None = None,
    once: bool = False,
    batch_size: int = 1000,
    poll_interval: float = 0.5,
    standby_interval: float = 1.0,
    max_attempts: int = 5,
    retry_delay: float = 0.5,
    instance: str | None = None,
    lease: float | None = DEFAULT_LEASE,
) -> dict[str, Outcome]:
    """Run a runner per projection until ``stop`` (or, ``once``, until each caught up).

    A projection that fails stops alone; the others go on. Returns each one's outcome.
    """
    stop = stop or asyncio.Event()
    instance = instance or new_instance_id()
    waker = Waker(pool)
    runners = [
        ProjectionRunner(
            pool,
            projection,
            batch_size=batch_size,
            poll_interval=poll_interval,
            standby_interval=standby_interval,
            max_attempts=max_attempts,
            retry_delay=retry_delay,
            instance=instance,
            lease=lease,
        )
        for projection in projections
    ]
    listener: asyncio.Task[None] | None = None
    if not once:
        listener = asyncio.create_task(waker.run(stop))
    try:
        outcomes = await asyncio.gather(
            *(runner.run(stop, once=once, wake=waker.register()) for runner in runners)
        )
    finally:
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
    return {
        runner.projection.name: outcome for runner, outcome in zip(runners, outcomes, strict=True)
    }
