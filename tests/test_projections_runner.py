"""The projector runner: exactly once under SIGKILL, one leader at a time, poison isolation.

Projector processes are real ``python -m projections project`` processes; everything that
waits does so under ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import os
import random
import signal
import subprocess
import sys
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import psycopg
import pytest
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from conversations.events import (
    CODEC,
    ConversationOpened,
    MessageReceived,
    MessagesRead,
    conversation_stream,
)
from eventstore import (
    Checkpoint,
    EventCodec,
    EventStore,
    NewEvent,
    RecordedEvent,
    open_pool,
    uuid7,
)
from projections import (
    PROJECTIONS,
    Projection,
    build_into,
    catch_up,
    compare_read_models,
    live_schema,
    projection_status,
    run_projections,
)
from projections.runner import (
    LEADER_LOCK,
    PROJECTOR_GC_THRESHOLD,
    Applier,
    LeadershipLost,
    VersionMismatch,
    advisory_key,
    collecting_less_often,
    log_head,
)
from projections.runner import _connect as connect_own
from projections.synthetic import append_all, copy_into_log, traffic

ROOT = Path(__file__).resolve().parent.parent
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
INBOX = PROJECTIONS["inbox"]
WAIT = 120.0


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def projectors(url: str, log: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Started projector processes; whatever is left running is killed at the end."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)


def start(
    started: list[subprocess.Popen[bytes]], url: str, log: Path, *args: str
) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "projections", "--database-url", url, "project", *args],
            cwd=ROOT,
            stdout=out,
            stderr=out,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    started.append(proc)
    return proc


async def exited(proc: subprocess.Popen[bytes]) -> int:
    while proc.poll() is None:
        await asyncio.sleep(0.02)
    return proc.returncode


async def live_checkpoint(pool: AsyncConnectionPool[Any]) -> tuple[Checkpoint, int, str] | None:
    """(checkpoint, events counted, applied_by) of the live inbox model."""
    async with pool.connection() as conn:
        exists = await (
            await conn.execute("SELECT to_regclass('rm_inbox.checkpoint') IS NOT NULL")
        ).fetchone()
        if not exists or not exists[0]:
            return None
        row = await (
            await conn.execute(
                "SELECT transaction_id, position, events, applied_by FROM rm_inbox.checkpoint"
            )
        ).fetchone()
    assert row is not None
    return Checkpoint(row[0], row[1]), int(row[2]), str(row[3])


async def reached_head(pool: AsyncConnectionPool[Any]) -> None:
    """Wait until the live model has applied the newest event (a projector runs elsewhere)."""
    async with pool.connection() as conn:
        head = await log_head(conn)
    assert head is not None
    while True:
        state = await live_checkpoint(pool)
        if state is not None and state[0] >= head:
            return
        await asyncio.sleep(0.05)


async def assert_equals_fresh_build(pool: AsyncConnectionPool[Any]) -> None:
    """The live model equals, row for row, one built from scratch up to its checkpoint."""
    state = await live_checkpoint(pool)
    assert state is not None
    await build_into(pool, INBOX, "fresh", replace=True, until=state[0])
    async with pool.connection() as conn:
        differences = await compare_read_models(conn, INBOX, live_schema("inbox"), "fresh")
        assert set(differences.values()) == {(0, 0)}, differences
        # Each batch adds its size to the checkpoint's count: a batch applied twice shows.
        row = await (
            await conn.execute(
                "SELECT count(*) FROM events WHERE (transaction_id, position)"
                " <= (%s::text::xid8, %s)",
                (str(state[0].transaction_id), state[0].position),
            )
        ).fetchone()
    assert row is not None and state[1] == row[0]


# --------------------------------------------------------------------------- exactly once


async def test_sigkill_during_a_50k_event_load_leaves_an_exact_model(
    database_url: str, pool: AsyncConnectionPool[Any], store: EventStore, tmp_path: Path
) -> None:
    appends = list(traffic(50_000, seed=21, active=300))
    # The load comes two ways at once, split by stream: 90% bulk-copied in transactions of 500
    # events (the projector keeps falling behind), 10% appended through the store by eight
    # concurrent writers (many small transactions, committing out of order).
    copied = [a for a in appends if zlib.crc32(a.stream_id.encode()) % 10 < 9]
    stored = [a for a in appends if zlib.crc32(a.stream_id.encode()) % 10 >= 9]

    async def bulk() -> int:
        async with pool.connection() as conn:
            return await copy_into_log(conn, copied, per_transaction=500)

    rng = random.Random(7)
    kills = progressed = 0
    log = tmp_path / "projector.log"
    with projectors(database_url, log) as started:
        async with asyncio.timeout(WAIT * 2):
            load = asyncio.gather(bulk(), append_all(store, stored, workers=8))
            last = None
            behind = True
            # Kill it while the load lasts, at least eight times, and at least five times in
            # the middle of its work (unless it has caught up with the whole load before).
            while not load.done() or kills < 8 or (progressed < 5 and behind):
                proc = start(started, database_url, log, "--batch-size", "200")
                await asyncio.sleep(rng.uniform(1.0, 2.5))
                proc.send_signal(signal.SIGKILL)
                await exited(proc)
                kills += 1
                state = await live_checkpoint(pool)
                if state is not None and state[0] != last:
                    progressed += 1
                    last = state[0]
                if load.done() and state is not None:
                    behind = state[1] < sum(load.result())
            loaded = sum(await load)
    assert loaded >= 50_000
    assert progressed >= 3, f"the projector made progress between only {progressed} kills"
    outcomes = await catch_up(pool, [INBOX], timeout=WAIT)
    assert outcomes == {"inbox": "caught-up"}
    await assert_equals_fresh_build(pool)


# --------------------------------------------------------------------------- leadership


async def test_one_instance_applies_and_a_standby_takes_over(
    database_url: str, pool: AsyncConnectionPool[Any], store: EventStore, tmp_path: Path
) -> None:
    log = tmp_path / "projectors.log"
    options = ("--standby-interval", "0.2", "--poll-interval", "0.1")
    with projectors(database_url, log) as started:
        first = start(started, database_url, log, *options)
        second = start(started, database_url, log, *options)
        by_pid = {first.pid: first, second.pid: second}
        async with asyncio.timeout(WAIT):
            while True:
                (status,) = await projection_status(pool, [INBOX])
                if status.leader is not None and status.standbys == 1:
                    break
                await asyncio.sleep(0.05)
            leader = by_pid[int(status.leader.split(":")[1])]
            standby = second if leader is first else first

            appends = list(traffic(1500, seed=2))
            load = asyncio.create_task(append_all(store, appends[:300]))
            applied_by = set()
            while not load.done():
                state = await live_checkpoint(pool)
                if state is not None:
                    applied_by.add(state[2])
                await asyncio.sleep(0.01)
            await load
            await reached_head(pool)
            state = await live_checkpoint(pool)
            assert state is not None
            applied_by.add(state[2])
            assert applied_by == {status.leader}, "only the leader applies batches"

            leader.send_signal(signal.SIGKILL)
            await exited(leader)
            await append_all(store, appends[300:])
            while True:
                (status,) = await projection_status(pool, [INBOX])
                if status.leader is not None and int(status.leader.split(":")[1]) == standby.pid:
                    break
                await asyncio.sleep(0.05)
            await reached_head(pool)
            state = await live_checkpoint(pool)
            assert state is not None and state[2] == status.leader
            assert status.standbys == 0

            standby.send_signal(signal.SIGTERM)
            assert await exited(standby) == 0
    (status,) = await projection_status(pool, [INBOX])
    assert (status.state, status.leader) == ("stopped", None)
    await assert_equals_fresh_build(pool)


async def leader_pid_is(pool: AsyncConnectionPool[Any], pid: int, standbys: int) -> None:
    """Wait until the process ``pid`` leads the inbox with ``standbys`` standing by."""
    while True:
        (status,) = await projection_status(pool, [INBOX])
        if (
            status.leader is not None
            and int(status.leader.split(":")[1]) == pid
            and status.standbys == standbys
        ):
            return
        await asyncio.sleep(0.05)


async def test_a_standby_ends_a_hung_leader_after_its_lease_but_never_a_live_one(
    database_url: str, pool: AsyncConnectionPool[Any], store: EventStore, tmp_path: Path
) -> None:
    # A frozen leader (SIGSTOP) keeps its session: the server's keepalives are answered by its
    # kernel. Without a lease no standby would ever take over.
    log = tmp_path / "projectors.log"
    options = ("--projection", "inbox", "--standby-interval", "0.2", "--poll-interval", "0.1")
    refused = subprocess.run(
        [sys.executable, "-m", "projections", "--database-url", database_url, "project"]
        + ["--lease", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert refused.returncode == 2 and "--lease must be more than 2 seconds" in refused.stderr
    appends = list(traffic(600, seed=6))
    with projectors(database_url, log) as started:
        first = start(started, database_url, log, *options, "--lease", "3")
        async with asyncio.timeout(WAIT):
            await leader_pid_is(pool, first.pid, 0)
            second = start(started, database_url, log, *options, "--lease", "3")
            await leader_pid_is(pool, first.pid, 1)
            await append_all(store, appends[:300])
            await reached_head(pool)
            # Idle, but alive for more than two leases: the standby leaves it alone.
            await asyncio.sleep(7)
            await leader_pid_is(pool, first.pid, 1)
            assert "lease" not in log.read_text()

            first.send_signal(signal.SIGSTOP)
            try:
                await append_all(store, appends[300:])
                await leader_pid_is(pool, second.pid, 0)
                await reached_head(pool)
                state = await live_checkpoint(pool)
                (status,) = await projection_status(pool, [INBOX])
                assert state is not None and state[2] == status.leader
            finally:
                first.send_signal(signal.SIGCONT)
            # Woken, the old leader finds its lock session ended and stands by.
            await leader_pid_is(pool, second.pid, 1)
            for proc in (first, second):
                proc.send_signal(signal.SIGTERM)
                assert await exited(proc) == 0
    text = log.read_text()
    assert "past the 3s lease: ending it" in text, text
    await assert_equals_fresh_build(pool)


async def test_sigterm_ends_after_the_batch_with_a_consistent_model(
    database_url: str, pool: AsyncConnectionPool[Any], store: EventStore, tmp_path: Path
) -> None:
    async with pool.connection() as conn:
        await copy_into_log(conn, list(traffic(10_000, seed=4)), per_transaction=100)
    log = tmp_path / "projector.log"
    with projectors(database_url, log) as started:
        proc = start(started, database_url, log, "--batch-size", "50")
        async with asyncio.timeout(WAIT):
            while (state := await live_checkpoint(pool)) is None or state[1] < 500:
                await asyncio.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            assert await exited(proc) == 0
    (status,) = await projection_status(pool, [INBOX])
    assert status.state == "stopped" and status.leader is None
    await assert_equals_fresh_build(pool)


async def test_notifications_wake_a_following_projector(
    pool: AsyncConnectionPool[Any], store: EventStore
) -> None:
    stop = asyncio.Event()
    # A poll interval far beyond the test's patience: only a notification can wake it.
    task = asyncio.create_task(
        run_projections(pool, [INBOX], stop=stop, poll_interval=3600, standby_interval=0.1)
    )
    try:
        async with asyncio.timeout(WAIT):
            while await live_checkpoint(pool) is None:
                await asyncio.sleep(0.02)
            before = await live_checkpoint(pool)
            # Several appends, in case a wake-up lands while the fence is held elsewhere.
            appends = iter(traffic(400, seed=9))
            while (now := await live_checkpoint(pool)) is None or now[1] == (before or now)[1]:
                item = next(appends)
                await store.append(item.stream_id, [CODEC.new_event(e) for e in item.events])
                await asyncio.sleep(0.3)
        stop.set()
        async with asyncio.timeout(WAIT):
            assert await task == {"inbox": "stopped"}
    finally:
        stop.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# --------------------------------------------------------------------------- failures


class Tally(Projection):
    """A test projection: how many events of each type it has seen."""

    name: ClassVar[str] = "tally"
    version: ClassVar[int] = 1
    handles: ClassVar[frozenset[str]] = CODEC.type_names
    tables: ClassVar[tuple[str, ...]] = ("tally",)
    codec: ClassVar[EventCodec] = CODEC
    #: raise (without naming the event) when an event has this id
    fragile: ClassVar[set[Any]] = set()
    #: ... as the server does when a statement outgrows temp_file_limit (SQLSTATE 53400)
    fragile_spills: ClassVar[bool] = False

    def table_ddl(self, schema: str) -> Sequence[sql.Composed]:
        return [
            sql.SQL("CREATE TABLE {} (type text PRIMARY KEY, n bigint NOT NULL)").format(
                sql.Identifier(schema, "tally")
            )
        ]

    def index_ddl(self, schema: str, *, concurrently: bool = False) -> Sequence[sql.Composed]:
        return []

    async def apply(
        self,
        conn: psycopg.AsyncConnection[Any],
        schema: str,
        events: Sequence[RecordedEvent],
    ) -> None:
        if any(e.event_id in self.fragile for e in events):
            if self.fragile_spills:
                await conn.execute(
                    "DO $$ BEGIN RAISE EXCEPTION 'temporary file size exceeds temp_file_limit'"
                    " USING ERRCODE = '53400'; END $$"
                )
            raise RuntimeError("the tally cannot take this one")
        counts: dict[str, int] = {}
        for event in events:
            counts[event.type] = counts.get(event.type, 0) + 1
        await conn.execute(
            sql.SQL(
                "INSERT INTO {} AS t SELECT * FROM unnest(%s::text[], %s::bigint[])"
                " ON CONFLICT (type) DO UPDATE SET n = t.n + EXCLUDED.n"
            ).format(sql.Identifier(schema, "tally")),
            (list(counts), list(counts.values())),
        )


async def tally_total(pool: AsyncConnectionPool[Any]) -> int:
    async with pool.connection() as conn:
        row = await (
            await conn.execute("SELECT coalesce(sum(n), 0) FROM rm_tally.tally")
        ).fetchone()
    assert row is not None
    return int(row[0])


async def event_count(pool: AsyncConnectionPool[Any]) -> int:
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT count(*) FROM events")).fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
async def fast_failures() -> AsyncIterator[dict[str, Any]]:
    yield {"max_attempts": 3, "retry_delay": 0.01}


async def test_a_poison_event_stops_its_projection_and_no_other(
    database_url: str,
    pool: AsyncConnectionPool[Any],
    store: EventStore,
    fast_failures: dict[str, Any],
) -> None:
    appends = list(traffic(1200, seed=8))
    await append_all(store, appends[:300])
    poison = NewEvent(uuid7(), "MessageReceived", b'{"conversation_id": "not a uuid"}')
    result = await store.append(conversation_stream(uuid7()), [poison])
    await append_all(store, appends[300:])
    tally = Tally()
    outcomes = await catch_up(pool, [INBOX, tally], timeout=WAIT, **fast_failures)
    assert outcomes == {"inbox": "failed", "tally": "caught-up"}
    assert await tally_total(pool) == await event_count(pool)

    # The inbox applied everything before the poison event, and nothing after it.
    state = await live_checkpoint(pool)
    assert state is not None and state[0] < result.checkpoints[0]
    async with pool.connection() as conn:
        row = await (
            await conn.execute(
                "SELECT count(*) FROM events WHERE (transaction_id, position)"
                " < (%s::text::xid8, %s)",
                (str(result.checkpoints[0].transaction_id), result.checkpoints[0].position),
            )
        ).fetchone()
    assert row is not None and state[1] == row[0]

    statuses = {s.name: s for s in await projection_status(pool, [INBOX, tally])}
    inbox = statuses["inbox"]
    assert inbox.state == "failed"
    assert inbox.failed_event_id == poison.event_id
    assert inbox.failed_checkpoint == str(result.checkpoints[0])
    assert inbox.failed_attempts == 3
    assert inbox.last_error is not None and "cannot decode" in inbox.last_error
    assert inbox.events_behind == await event_count(pool) - state[1]
    assert statuses["tally"].state == "stopped" and statuses["tally"].events_behind == 0

    shown = subprocess.run(
        [
            sys.executable,
            "-m",
            "handlers.cli",
            "--database-url",
            database_url,
            "projections",
            "status",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert shown.returncode == 1, shown.stderr
    assert "state:       failed" in shown.stdout
    assert str(poison.event_id) in shown.stdout and "cannot decode" in shown.stdout

    # Starting again retries it (a fix may have been deployed); it is never skipped.
    again = await run_projections(pool, [INBOX], once=True, **fast_failures)
    assert again == {"inbox": "failed"}
    assert await live_checkpoint(pool) == state


async def test_the_failing_event_is_found_inside_its_batch(
    pool: AsyncConnectionPool[Any], store: EventStore, fast_failures: dict[str, Any]
) -> None:
    cid = uuid7()
    stream = conversation_stream(cid)
    opened = ConversationOpened(cid, "fb", "messenger", "p", uuid7(), T0)
    good = [MessageReceived(cid, uuid7(), "messenger", f"m{i}", "hi", T0, T0) for i in range(5)]
    # The inbox names the event itself: a read of a message the conversation never had.
    unknown_read = CODEC.new_event(MessagesRead(cid, "ann", uuid7(), T0))
    # The tally fails without naming it: the runner retries the batch event by event.
    fragile = CODEC.new_event(good[4])
    Tally.fragile = {fragile.event_id}
    try:
        events = [CODEC.new_event(e) for e in (opened, *good[:4])]
        await store.append(stream, [*events, unknown_read, fragile])
        outcomes = await catch_up(pool, [INBOX, Tally()], timeout=WAIT, **fast_failures)
    finally:
        Tally.fragile = set()
    assert outcomes == {"inbox": "failed", "tally": "failed"}
    statuses = {s.name: s for s in await projection_status(pool, [INBOX, Tally()])}
    assert statuses["inbox"].failed_event_id == unknown_read.event_id
    assert statuses["inbox"].last_error is not None
    assert "is unknown" in statuses["inbox"].last_error
    assert statuses["tally"].failed_event_id == fragile.event_id
    assert "the tally cannot take this one" in (statuses["tally"].last_error or "")
    # Both applied the events before their failing one.
    assert await tally_total(pool) == 6
    state = await live_checkpoint(pool)
    assert state is not None and state[1] == 5


async def test_an_error_that_depends_on_the_batch_narrows_it_to_the_event(
    pool: AsyncConnectionPool[Any], store: EventStore, fast_failures: dict[str, Any]
) -> None:
    # Running out of memory or temporary file space (SQLSTATE class 53) can depend on the
    # batch: it must not be waited out for ever like a lost connection, but narrowed to the
    # event and charged to it if that event alone still fails.
    await append_all(store, list(traffic(40, seed=11)))
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT event_id FROM events ORDER BY transaction_id, position")
        rows = await cur.fetchall()
    Tally.fragile, Tally.fragile_spills = {rows[25][0]}, True
    try:
        outcomes = await catch_up(pool, [Tally()], timeout=WAIT, **fast_failures)
    finally:
        Tally.fragile, Tally.fragile_spills = set(), False
    assert outcomes == {"tally": "failed"}
    (status,) = await projection_status(pool, [Tally()])
    assert status.failed_event_id == rows[25][0]
    assert "temp_file_limit" in (status.last_error or "")
    assert await tally_total(pool) == 25


async def assert_waited_out(
    database_url: str, pool: AsyncConnectionPool[Any], disturb: Callable[[], Awaitable[None]]
) -> None:
    """A live projector (one attempt per event) runs through ``disturb()``, then stops: it
    must have waited the trouble out, charged no event with it, and built the exact model."""
    stop = asyncio.Event()
    own = await open_pool(database_url, max_size=4, settings={"application_name": "under-test"})
    task = asyncio.create_task(
        run_projections(own, [INBOX], stop=stop, poll_interval=0.05, max_attempts=1)
    )
    try:
        async with asyncio.timeout(WAIT):
            await disturb()
            await reached_head(pool)
        stop.set()
        async with asyncio.timeout(WAIT):
            assert await task == {"inbox": "stopped"}
    finally:
        stop.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await own.close()
    (status,) = await projection_status(pool, [INBOX])
    assert status.failed_event_id is None
    await assert_equals_fresh_build(pool)


async def test_a_lost_connection_is_waited_out_not_blamed_on_an_event(
    database_url: str, pool: AsyncConnectionPool[Any], store: EventStore
) -> None:
    async def cut_every_session() -> None:
        await append_all(store, list(traffic(500, seed=1)))
        await reached_head(pool)
        # Cut every session of the projector (its lock, its batches, its listener).
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database()"
                " AND (application_name = 'under-test'"
                "      OR application_name LIKE 'convstore projector%%')"
            )
        await append_all(store, list(traffic(500, seed=2)))

    await assert_waited_out(database_url, pool, cut_every_session)


def test_the_projector_collects_young_objects_less_often_and_restores_the_setting() -> None:
    before = gc.get_threshold()
    with collecting_less_often(12_345):
        assert gc.get_threshold() == (12_345, *before[1:])
    assert gc.get_threshold() == before
    with pytest.raises(RuntimeError), collecting_less_often():
        assert gc.get_threshold()[0] == PROJECTOR_GC_THRESHOLD
        raise RuntimeError("the setting is restored on the way out")
    assert gc.get_threshold() == before


# --------------------------------------------------------------------------- fences


async def test_a_batch_needs_its_leader_lock_and_the_model_version_of_its_code(
    database_url: str, pool: AsyncConnectionPool[Any], store: EventStore
) -> None:
    # A leader whose lock session died must not go on applying beside the next leader, and
    # old code must not write into a model that a newer version's rebuild swapped in.
    await append_all(store, list(traffic(300, seed=5)))
    applier = Applier(pool, INBOX, "rm_fenced", prefetch=False)
    key = advisory_key(LEADER_LOCK, "inbox")

    async def checkpoint() -> Checkpoint:
        async with pool.connection() as conn:
            state = await applier.state(conn)
        assert state is not None
        return state[0]

    try:
        async with pool.connection() as conn:
            await applier.create(conn)
        start = await checkpoint()
        with psycopg.connect(database_url, autocommit=True) as holder:
            holder.execute("SELECT pg_advisory_lock(%s, %s)", key)
            with psycopg.connect(database_url, autocommit=True) as bystander:
                applier.fence = (bystander.info.backend_pid, *key)  # not the lock's session
                async with pool.connection() as conn:
                    with pytest.raises(LeadershipLost):
                        await applier.apply_batch(conn, 100)
            assert await checkpoint() == start
            applier.fence = (holder.info.backend_pid, *key)
            async with pool.connection() as conn:
                moved = await applier.apply_batch(conn, 100)
            assert moved.events == 100 and await checkpoint() == moved.checkpoint
            async with pool.connection() as conn:
                await conn.execute("UPDATE rm_fenced.checkpoint SET version = version + 1")
                with pytest.raises(VersionMismatch):
                    await applier.apply_batch(conn, 100)
            assert await checkpoint() == moved.checkpoint
    finally:
        await applier.close()


async def test_once_waits_for_a_transaction_that_holds_the_log_back(
    database_url: str, pool: AsyncConnectionPool[Any]
) -> None:
    store = EventStore(pool, CODEC)
    items = list(traffic(200, seed=6))
    await append_all(store, items[:100])
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as open_tx:
        async with open_tx.transaction():
            # A write left open: the events committed after it wait behind the fence.
            await open_tx.execute("SELECT pg_current_xact_id()")
            await append_all(store, items[100:])
            async with pool.connection() as conn:
                head = await log_head(conn)
            # A job that may not wait long says so, with its own exit code.
            cli = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "handlers.cli", "--database-url", database_url]
                + ["project", "--once", "--timeout", "1"],
                capture_output=True,
                text=True,
                cwd=ROOT,
                timeout=WAIT,
            )
            assert cli.returncode == 3, cli.stderr
            assert "not caught up within 1s" in cli.stderr
            task = asyncio.create_task(run_projections(pool, [INBOX], once=True))
            await asyncio.sleep(1.0)
            assert not task.done(), "'caught up' while committed events were held back"
        async with asyncio.timeout(WAIT):
            assert await task == {"inbox": "caught-up"}
    state = await live_checkpoint(pool)
    assert head is not None and state is not None and state[0] >= head
    await store.close()


async def test_a_lock_timeout_is_waited_out_not_blamed_on_an_event(
    database_url: str, pool: AsyncConnectionPool[Any], store: EventStore
) -> None:
    # A policy of short lock timeouts, and an operator's lock on a read-model table (as a
    # CREATE INDEX takes): the projector must wait, not stop on the event it was applying.
    items = list(traffic(400, seed=7))
    await append_all(store, items[:200])
    assert await catch_up(pool, [INBOX], timeout=WAIT) == {"inbox": "caught-up"}
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("ALTER DATABASE {} SET lock_timeout = '200ms'").format(
                sql.Identifier(admin.info.dbname)
            )
        )

    async def lock_a_table() -> None:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as op:
            async with op.transaction():
                await op.execute("LOCK TABLE rm_inbox.messages IN SHARE MODE")
                await append_all(store, items[200:])
                await asyncio.sleep(1.5)

    await assert_waited_out(database_url, pool, lock_a_table)


async def test_lock_sessions_notice_a_vanished_peer_within_a_minute(
    pool: AsyncConnectionPool[Any],
) -> None:
    # A leader's host that vanishes must release the lock long before the systems' default
    # two hours of TCP silence; over a Unix socket there is no host to lose.
    conn = await connect_own(pool, "convstore keepalive test")
    try:
        row = await (
            await conn.execute(
                "SELECT current_setting('tcp_keepalives_idle'),"
                " current_setting('tcp_user_timeout'), inet_client_addr() IS NULL"
            )
        ).fetchone()
    finally:
        await conn.close()
    assert row is not None
    idle, user_timeout, unix_socket = row
    assert (idle, user_timeout) == (("0", "0") if unix_socket else ("10", "30000"))
