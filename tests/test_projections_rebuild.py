"""Rebuilds: the next version is built beside the live one, which keeps serving, then swapped."""

from __future__ import annotations

import asyncio
import contextlib
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from eventstore import Checkpoint, EventStore, NewEvent, open_pool, uuid7
from projections import (
    PROJECTIONS,
    InboxQueries,
    ProjectionError,
    RebuildBusy,
    build_into,
    catch_up,
    compare_read_models,
    projection_status,
    rebuild,
    run_projections,
)
from projections.progress import LineProgress, TerminalProgress, progress_for
from projections.runner import REBUILD_LOCK, VersionMismatch, advisory_key, log_head
from projections.synthetic import append_all, copy_into_log, traffic

ROOT = Path(__file__).resolve().parent.parent
INBOX = PROJECTIONS["inbox"]
WAIT = 120.0


async def load(pool: AsyncConnectionPool[Any], events: int, seed: int = 0) -> None:
    async with pool.connection() as conn:
        await copy_into_log(conn, list(traffic(events, seed=seed)), per_transaction=1000)


async def assert_live_equals_fresh(pool: AsyncConnectionPool[Any]) -> None:
    async with pool.connection() as conn:
        row = await (
            await conn.execute("SELECT transaction_id, position FROM rm_inbox.checkpoint")
        ).fetchone()
    assert row is not None
    await build_into(pool, INBOX, "fresh", replace=True, until=Checkpoint(row[0], row[1]))
    async with pool.connection() as conn:
        differences = await compare_read_models(conn, INBOX, "rm_inbox", "fresh")
    assert set(differences.values()) == {(0, 0)}, differences


async def schemas(pool: AsyncConnectionPool[Any]) -> set[str]:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'rm\\_%'")
        return {row[0] for row in await cur.fetchall()}


async def test_rebuild_equals_live_while_queries_and_projector_keep_going(
    database_url: str, pool: AsyncConnectionPool[Any], store: EventStore
) -> None:
    await load(pool, 15_000, seed=1)
    assert await catch_up(pool, [INBOX], timeout=WAIT) == {"inbox": "caught-up"}
    q = InboxQueries(pool)
    first = (await q.inbox("conn-1", "all", limit=1)).items[0]

    stop = asyncio.Event()
    answered = 0
    errors: list[BaseException] = []
    rebuilding = asyncio.Event()

    async def ask() -> None:
        nonlocal answered
        while not stop.is_set():
            try:
                page = await q.inbox("conn-1", "all", limit=20)
                assert page.items, "the inbox must not look empty during a rebuild"
                assert (await q.messages(first.conversation_id)).items
                assert (await q.contact_conversations(first.contact_id)).items
                assert await q.counts()
            except Exception as exc:  # collected, so the test reports every failure
                errors.append(exc)
            if rebuilding.is_set():
                answered += 1
            await asyncio.sleep(0.005)

    async def write() -> None:
        # New events keep coming while the rebuild runs (and a little after).
        for item in traffic(5000, seed=2):
            if stop.is_set() or not rebuilding.is_set():
                return
            await append_all(store, [item])
            await asyncio.sleep(0.002)

    projector_pool = await open_pool(database_url, max_size=4)
    live = asyncio.create_task(
        run_projections(projector_pool, [INBOX], stop=stop, poll_interval=0.05)
    )
    rebuilding.set()
    asker = asyncio.create_task(ask())
    writer = asyncio.create_task(write())
    try:
        async with asyncio.timeout(WAIT):
            result = await rebuild(pool, INBOX, batch_size=200)
            rebuilding.clear()
            during = answered
            await writer
            await asyncio.sleep(0.2)  # a few more queries on the swapped-in tables
            async with pool.connection() as conn:
                head = await log_head(conn)
            assert head is not None
            while True:
                async with pool.connection() as conn:
                    cur = await conn.execute(
                        "SELECT transaction_id, position FROM rm_inbox.checkpoint"
                    )
                    row = await cur.fetchone()
                assert row is not None
                if (row[0], row[1]) >= (head.transaction_id, head.position):
                    break
                await asyncio.sleep(0.05)
            stop.set()
            assert await live == {"inbox": "stopped"}
            await asker
    finally:
        stop.set()
        for task in (live, asker, writer):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await projector_pool.close()
    assert errors == []
    assert result.swapped and result.events >= 15_000
    assert during > 0
    assert await schemas(pool) == {"rm_inbox"}
    (status,) = await projection_status(pool, [INBOX])
    assert status.rebuilt_at is not None and status.rebuild is None
    await assert_live_equals_fresh(pool)


async def test_an_older_version_is_rebuilt_and_a_newer_one_refused(
    pool: AsyncConnectionPool[Any],
) -> None:
    await load(pool, 3000, seed=3)
    assert await catch_up(pool, [INBOX], timeout=WAIT) == {"inbox": "caught-up"}
    async with pool.connection() as conn:
        await conn.execute("UPDATE rm_inbox.checkpoint SET version = 0")
        await conn.execute("DELETE FROM rm_inbox.messages")  # what "version 0" looked like
    assert await run_projections(pool, [INBOX], once=True) == {"inbox": "caught-up"}
    (status,) = await projection_status(pool, [INBOX])
    assert (status.version, status.rebuilt_at is not None) == (INBOX.version, True)
    await assert_live_equals_fresh(pool)

    async with pool.connection() as conn:
        await conn.execute("UPDATE rm_inbox.checkpoint SET version = 99")
    assert await run_projections(pool, [INBOX], once=True) == {"inbox": "failed"}
    (status,) = await projection_status(pool, [INBOX])
    assert status.last_error is not None and "upgrade convstore" in status.last_error
    assert status.version == 99


async def test_a_rebuild_never_swaps_in_an_older_version(pool: AsyncConnectionPool[Any]) -> None:
    # Old code's rebuild (an operator running the previous release) would put the newer
    # release's model back a version, under projectors of the newer release.
    await load(pool, 1000, seed=8)
    assert await catch_up(pool, [INBOX], timeout=WAIT) == {"inbox": "caught-up"}
    async with pool.connection() as conn:
        await conn.execute("UPDATE rm_inbox.checkpoint SET version = version + 1")
    with pytest.raises(VersionMismatch, match="upgrade convstore"):
        await rebuild(pool, INBOX)
    assert await schemas(pool) == {"rm_inbox"}  # refused before building anything
    (status,) = await projection_status(pool, [INBOX])
    assert status.version == INBOX.version + 1 and status.rebuilt_at is None


async def test_an_upgrade_that_stops_on_an_event_shows_as_failed(
    pool: AsyncConnectionPool[Any],
) -> None:
    await load(pool, 500, seed=9)
    assert await catch_up(pool, [INBOX], timeout=WAIT) == {"inbox": "caught-up"}
    poison = NewEvent(uuid7(), "MessageReceived", b'{"conversation_id": "not a uuid"}', {})
    await EventStore(pool).append("conversation-poison", [poison])
    async with pool.connection() as conn:
        await conn.execute("UPDATE rm_inbox.checkpoint SET version = version - 1")
    # The projector rebuilds the older model on start, and the rebuild stops on that event.
    outcome = await run_projections(pool, [INBOX], once=True, max_attempts=1, retry_delay=0.01)
    assert outcome == {"inbox": "failed"}
    (status,) = await projection_status(pool, [INBOX])
    assert status.state == "failed" and status.failed_event_id == poison.event_id
    assert status.version == INBOX.version - 1  # the live model was left as it was


async def test_privileges_survive_a_rebuild_and_views_on_it_stop_it_clearly(
    pool: AsyncConnectionPool[Any],
) -> None:
    # Operators grant analysts access to the read model, and analysts build views on it; a
    # rebuild replaces the tables, and dropping the old ones used to drop both silently.
    await load(pool, 1000, seed=10)
    assert await catch_up(pool, [INBOX], timeout=WAIT) == {"inbox": "caught-up"}
    analyst = f"convstore_test_analyst_{uuid7().hex[-12:]}"
    owner = f"convstore_test_projector_{uuid7().hex[-12:]}"
    role, owning = sql.Identifier(analyst), sql.Identifier(owner)
    async with pool.connection() as conn:
        await conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(role))
        await conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(owning))
    try:
        async with pool.connection() as conn:
            await conn.execute(sql.SQL("GRANT USAGE ON SCHEMA rm_inbox TO {}").format(role))
            await conn.execute(sql.SQL("GRANT SELECT ON rm_inbox.conversations TO {}").format(role))
            await conn.execute(
                sql.SQL("GRANT SELECT (text) ON rm_inbox.messages TO {}").format(role)
            )
            # Someone's own table in the model's schema (it goes with the old schema), and the
            # model owned by the projector's role while another role runs the rebuild.
            await conn.execute("CREATE TABLE rm_inbox.notes (note text)")
            await conn.execute(sql.SQL("GRANT SELECT ON rm_inbox.notes TO {}").format(role))
            for table in (*INBOX.tables, "checkpoint"):
                await conn.execute(
                    sql.SQL("ALTER TABLE {} OWNER TO {}").format(
                        sql.Identifier("rm_inbox", table), owning
                    )
                )
            await conn.execute(sql.SQL("ALTER SCHEMA rm_inbox OWNER TO {}").format(owning))
            await conn.execute("CREATE SCHEMA analytics")
            await conn.execute(
                "CREATE VIEW analytics.per_connection AS"
                " SELECT connection, count(*) AS n FROM rm_inbox.conversations GROUP BY 1"
            )
        with pytest.raises(ProjectionError, match=r"analytics\.per_connection read the tables"):
            await rebuild(pool, INBOX)
        async with pool.connection() as conn:
            view = await (
                await conn.execute("SELECT to_regclass('analytics.per_connection') IS NOT NULL")
            ).fetchone()
            assert view == (True,)
            await conn.execute("DROP VIEW analytics.per_connection")
        result = await rebuild(pool, INBOX)
        assert result.swapped and result.resumed
        async with pool.connection() as conn:
            row = await (
                await conn.execute(
                    "SELECT has_schema_privilege(%(r)s, 'rm_inbox', 'USAGE'),"
                    " has_table_privilege(%(r)s, 'rm_inbox.conversations', 'SELECT'),"
                    " has_table_privilege(%(r)s, 'rm_inbox.messages', 'SELECT'),"
                    " has_column_privilege(%(r)s, 'rm_inbox.messages', 'text', 'SELECT'),"
                    " to_regclass('rm_inbox.notes') IS NULL,"
                    " (SELECT array_agg(DISTINCT pg_get_userbyid(relowner)::text) FROM pg_class"
                    "  WHERE relnamespace = 'rm_inbox'::regnamespace AND relkind = 'r'),"
                    " pg_get_userbyid((SELECT nspowner FROM pg_namespace"
                    "                  WHERE nspname = 'rm_inbox'))::text",
                    {"r": analyst},
                )
            ).fetchone()
        assert row == (True, True, False, True, True, [owner], owner)
    finally:
        async with pool.connection() as conn:
            for name in (role, owning):
                await conn.execute(sql.SQL("REASSIGN OWNED BY {} TO CURRENT_USER").format(name))
                await conn.execute(sql.SQL("DROP OWNED BY {}").format(name))
                await conn.execute(sql.SQL("DROP ROLE {}").format(name))
    await assert_live_equals_fresh(pool)


async def test_an_upgrade_rebuild_stopped_by_a_view_is_halted_until_it_runs_again(
    pool: AsyncConnectionPool[Any], database_url: str
) -> None:
    # The daemon's own rebuild on upgrade meets a view on the live tables: it stops, and status
    # must not show that as a clean stop (it did: `stopped`, exit 0, so nothing alerted).
    await load(pool, 1000, seed=9)
    assert await catch_up(pool, [INBOX], timeout=WAIT) == {"inbox": "caught-up"}
    async with pool.connection() as conn:
        await conn.execute("UPDATE rm_inbox.checkpoint SET version = 0")
        await conn.execute("CREATE SCHEMA analytics")
        await conn.execute(
            "CREATE VIEW analytics.open_ones AS SELECT count(*) AS n FROM rm_inbox.conversations"
        )
    assert await run_projections(pool, [INBOX], once=True) == {"inbox": "failed"}
    (status,) = await projection_status(pool, [INBOX])
    assert status.state == "halted" and status.version == 0
    assert "analytics.open_ones read the tables" in (status.last_error or "")
    shown = convstore(database_url, "projections", "status", "--projection", "inbox")
    assert shown.returncode == 1, shown.stderr
    assert "state:       halted" in shown.stdout
    assert "analytics.open_ones" in shown.stdout

    async with pool.connection() as conn:
        await conn.execute("DROP VIEW analytics.open_ones")
    assert await run_projections(pool, [INBOX], once=True) == {"inbox": "caught-up"}
    (status,) = await projection_status(pool, [INBOX])
    assert (status.state, status.version) == ("stopped", INBOX.version)
    shown = convstore(database_url, "projections", "status", "--projection", "inbox")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    await assert_live_equals_fresh(pool)


async def test_a_rebuilds_index_build_does_not_hold_the_log_back(
    pool: AsyncConnectionPool[Any], store: EventStore, database_url: str
) -> None:
    # A plain CREATE INDEX holds a transaction id while it builds, and with it the fence of
    # every reader of the log. A session with an old snapshot (and no transaction id, so it
    # holds no fence) makes the concurrent build wait at its end, long enough to look.
    await load(pool, 2000, seed=12)
    assert await catch_up(pool, [INBOX], timeout=WAIT) == {"inbox": "caught-up"}
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as old:
        await old.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        await old.execute("SELECT count(*) FROM events")
        building = asyncio.create_task(rebuild(pool, INBOX))
        async with asyncio.timeout(WAIT), pool.connection() as conn:
            while True:
                row = await (
                    await conn.execute(
                        "SELECT backend_xid IS NULL FROM pg_stat_activity"
                        " WHERE query ~ '^\\s*CREATE INDEX CONCURRENTLY'"
                        " AND wait_event_type = 'Lock'"
                    )
                ).fetchone()
                if row is not None:
                    break
                assert not building.done(), building.result()
                await asyncio.sleep(0.05)
            assert row == (True,)
            stream = f"probe-{uuid7()}"
            appended = await store.append(stream, [NewEvent(uuid7(), "Probe", b"{}")])
            page = await store.read_all(None, 10, streams=[stream])
            assert [e.checkpoint for e in page] == list(appended.checkpoints)
            assert not building.done()
        await old.execute("COMMIT")
    result = await asyncio.wait_for(building, WAIT)
    assert result.swapped
    await assert_live_equals_fresh(pool)


async def test_a_resumed_rebuild_drops_an_index_an_interrupted_build_left_invalid(
    pool: AsyncConnectionPool[Any],
) -> None:
    # A concurrent build cut off leaves its index, invalid; IF NOT EXISTS would keep it.
    await load(pool, 1000, seed=13)
    stop = asyncio.Event()
    stop.set()
    first = await rebuild(pool, INBOX, batch_size=100, stop=stop)
    assert not first.swapped
    async with pool.connection() as conn:
        await conn.execute(
            "CREATE INDEX conversations_inbox_idx ON rm_inbox_next.conversations (connection)"
        )
        await conn.execute(
            "UPDATE pg_index SET indisvalid = false"
            " WHERE indexrelid = 'rm_inbox_next.conversations_inbox_idx'::regclass"
        )
    second = await rebuild(pool, INBOX)
    assert second.swapped and second.resumed
    async with pool.connection() as conn:
        row = await (
            await conn.execute(
                "SELECT i.indisvalid, pg_get_indexdef(i.indexrelid) FROM pg_index i"
                " WHERE i.indexrelid = 'rm_inbox.conversations_inbox_idx'::regclass"
            )
        ).fetchone()
    assert row is not None and row[0] is True
    assert "WHERE (deleted_at IS NULL)" in row[1]
    await assert_live_equals_fresh(pool)


async def test_an_interrupted_rebuild_resumes(pool: AsyncConnectionPool[Any]) -> None:
    await load(pool, 4000, seed=4)
    assert await catch_up(pool, [INBOX], timeout=WAIT) == {"inbox": "caught-up"}
    stop = asyncio.Event()

    class StopSoon:
        def update(self, done: int, total: int) -> None:
            stop.set()

        def finish(self, done: int) -> None:
            pass

    first = await rebuild(pool, INBOX, batch_size=500, progress=StopSoon(), stop=stop)
    assert not first.swapped and 0 < first.events < 4000
    (status,) = await projection_status(pool, [INBOX])
    assert status.rebuild is not None and not status.rebuild.running
    assert status.rebuild.events == first.events
    second = await rebuild(pool, INBOX, batch_size=500)
    assert second.swapped and second.resumed
    assert first.events + second.events >= 4000
    await assert_live_equals_fresh(pool)


async def test_one_rebuild_at_a_time(database_url: str, pool: AsyncConnectionPool[Any]) -> None:
    with psycopg.connect(database_url, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s, %s)", advisory_key(REBUILD_LOCK, "inbox"))
        with pytest.raises(RebuildBusy):
            await rebuild(pool, INBOX)


def test_progress_is_a_bar_on_a_terminal_and_lines_otherwise() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    bar = progress_for("rebuild inbox", tty)
    assert isinstance(bar, TerminalProgress)
    bar.update(250, 1000)
    bar.finish(1000)
    text = tty.getvalue()
    assert "\r" in text and "events/s" in text and "ETA" in text and "100.0%" in text
    plain = io.StringIO()
    lines = progress_for("rebuild inbox", plain)
    assert isinstance(lines, LineProgress)
    lines.interval = 0.0
    lines.update(250, 1000)
    lines.finish(1000)
    out = plain.getvalue().splitlines()
    assert out[0].startswith("rebuild inbox: 250/1000 events (25.0%)") and "ETA" in out[0]
    assert out[-1].startswith("rebuild inbox: 1000 events") and "\r" not in plain.getvalue()


def convstore(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "handlers.cli", "--database-url", url, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=WAIT,
    )


async def test_the_command_line(database_url: str, pool: AsyncConnectionPool[Any]) -> None:
    await load(pool, 2000, seed=5)
    status = convstore(database_url, "projections", "status")
    assert status.returncode == 0, status.stderr
    assert f"inbox (code version {INBOX.version})" in status.stdout and "not built" in status.stdout
    # The reply delivery daemon's projection runs elsewhere (convstore deliver), yet is
    # reported here too.
    delivery = convstore(database_url, "projections", "status", "--projection", "delivery")
    assert delivery.returncode == 0, delivery.stderr
    assert delivery.stdout.startswith("delivery (code version ")
    assert "delivery (code version " in status.stdout

    once = convstore(database_url, "project", "--once")
    assert once.returncode == 0, once.stderr
    assert "inbox: caught-up" in once.stderr

    rebuilt = convstore(database_url, "projections", "rebuild", "inbox", "--batch-size", "100")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert rebuilt.stdout.startswith(f"rebuilt inbox (version {INBOX.version}): ")
    assert "rebuild inbox: " in rebuilt.stderr and "events/s" in rebuilt.stderr
    assert "\r" not in rebuilt.stderr  # not a terminal: plain lines

    status = convstore(database_url, "projections", "status")
    assert status.returncode == 0, status.stderr
    for expected in (
        f"inbox (version {INBOX.version})",
        "state:       stopped",
        "behind:      0 events",
    ):
        assert expected in status.stdout
    assert "rebuilt:" in status.stdout and "last error:  none" in status.stdout

    as_json = convstore(database_url, "projections", "status", "--json")
    assert as_json.returncode == 0 and '"name":"inbox"' in as_json.stdout

    unknown = convstore(database_url, "projections", "rebuild", "outbox")
    assert unknown.returncode == 1 and "no projection named 'outbox'" in unknown.stderr
    for option, value in (
        ("--batch-size", "abc"),
        ("--poll-interval", "nan"),
        ("--standby-interval", "inf"),
        ("--poll-interval", "-1"),
    ):
        refused = convstore(database_url, "project", "--once", option, value)
        assert refused.returncode == 2 and f"argument {option}: must be" in refused.stderr
        assert "Traceback" not in refused.stderr and "_positive" not in refused.stderr
    alone = subprocess.run(
        [
            sys.executable,
            "-m",
            "projections",
            "--database-url",
            "not a url",
            "projections",
            "status",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=WAIT,
    )
    assert alone.returncode == 2 and "Traceback" not in alone.stderr
    assert "not a PostgreSQL URL" in alone.stderr
