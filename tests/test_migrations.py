"""Migrations: applied once each under a lock, verified for behind, drift and ahead."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import psycopg
import pytest

from eventstore import MigrationFailed, SchemaMismatch, check_schema, migrate, schema_status
from eventstore.migrations import Migration, load_migrations

ROOT = Path(__file__).resolve().parent.parent


def _convstore(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "handlers.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )


def _fake(version: int, name: str, text: str) -> Migration:
    return Migration(
        version=version,
        name=name,
        sql=text,
        checksum=hashlib.sha256(text.encode()).hexdigest(),
    )


def test_files_are_numbered_in_order() -> None:
    migrations = load_migrations()
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))


def test_migrate_then_verify_is_current(empty_database_url: str) -> None:
    status = schema_status(empty_database_url)
    assert status.problem is not None and status.problem.kind == "behind"
    applied = migrate(empty_database_url)
    assert [m.version for m in applied] == [m.version for m in load_migrations()]
    assert migrate(empty_database_url) == ()
    check_schema(empty_database_url)
    done = _convstore("db", "verify", url=empty_database_url)
    assert done.returncode == 0, done.stderr


def test_verify_behind_gives_one_clear_line(empty_database_url: str) -> None:
    known = load_migrations()
    extra = _fake(len(known) + 1, "later", "CREATE TABLE later_table (id int)")
    migrate(empty_database_url, known)
    with pytest.raises(SchemaMismatch) as info:
        check_schema(empty_database_url, (*known, extra))
    assert info.value.kind == "behind"
    at, needs = f"{known[-1].version:04d}", f"{extra.version:04d}"
    assert info.value.line == (
        f"database schema is at {at}, this convstore needs {needs}: run `convstore db migrate`"
    )
    # the command line says the same single line, on an empty database
    done = _convstore("db", "verify", url=_fresh(empty_database_url))
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if not line.startswith("convstore: emb")]
    assert len(lines) == 1 and "run `convstore db migrate`" in lines[0]


def test_a_bad_or_unreachable_database_gives_one_line_saying_why(
    empty_database_url: str,
) -> None:
    bad = _convstore("db", "verify", url="notaurl")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "convstore: DATABASE_URL is not a PostgreSQL URL or connection string:"
        ' missing "=" after "notaurl" in connection info string'
    ]
    params = psycopg.conninfo.conninfo_to_dict(empty_database_url)
    params["dbname"] = "convstore_no_such_database"
    missing = _convstore("db", "verify", url=psycopg.conninfo.make_conninfo("", **params))
    assert missing.returncode == 1
    [line] = missing.stderr.strip().splitlines()
    assert line.startswith("convstore: PostgreSQL is unavailable: ")
    assert "convstore_no_such_database" in line  # libpq's reason, not only a class name


def test_a_failing_migration_is_rolled_back_and_named(empty_database_url: str) -> None:
    known = load_migrations()
    broken = _fake(len(known) + 1, "broken", "CREATE TABLE half_applied (id int); SELECT 1/0")
    with pytest.raises(MigrationFailed) as info:
        migrate(empty_database_url, (*known, broken))
    assert info.value.label == broken.label and info.value.sqlstate == "22012"
    assert info.value.applied == tuple(m.label for m in known)
    assert str(info.value).startswith(f"migration {broken.label} failed and was rolled back")
    with psycopg.connect(empty_database_url) as conn:
        assert conn.execute("SELECT max(version) FROM schema_migrations").fetchone() == (
            known[-1].version,
        )
        assert conn.execute("SELECT to_regclass('half_applied')").fetchone() == (None,)


def test_replay_to_a_path_it_cannot_write_says_so_in_one_line(
    database_url: str, tmp_path: Path
) -> None:
    for target in (tmp_path / "missing" / "x.jsonl", tmp_path):
        done = _convstore("replay", "--out", str(target), url=database_url)
        assert done.returncode == 2
        assert done.stderr.strip().splitlines() == [
            f"convstore: cannot write {target}: "
            + ("No such file or directory" if target != tmp_path else "Is a directory")
        ]


def _fresh(url: str) -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS schema_migrations, events, streams CASCADE")
    return url


def test_verify_detects_drift(database_url: str) -> None:
    known = list(load_migrations())
    changed = known[0]
    known[0] = Migration(
        version=changed.version,
        name=changed.name,
        sql=changed.sql + "\n-- edited after it was applied\n",
        checksum=hashlib.sha256((changed.sql + "x").encode()).hexdigest(),
    )
    with pytest.raises(SchemaMismatch) as info:
        check_schema(database_url, known)
    assert info.value.kind == "drift"
    assert changed.label in info.value.line and "drift" in info.value.line
    # migrate refuses to run on a drifted database rather than guess
    with pytest.raises(SchemaMismatch):
        migrate(database_url, known)


def test_verify_detects_ahead(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES (999, 'future', 'x')"
        )
    with pytest.raises(SchemaMismatch) as info:
        check_schema(database_url)
    assert info.value.kind == "ahead"
    assert "0999_future" in info.value.line and "upgrade convstore" in info.value.line
    done = _convstore("db", "verify", url=database_url)
    assert done.returncode == 1
    assert "0999_future" in done.stderr


def test_concurrent_migrations_apply_each_once(empty_database_url: str) -> None:
    # A slow first migration widens the window in which the second runner must wait.
    known = (
        _fake(1, "slow", "SELECT pg_sleep(0.5); CREATE TABLE t1 (id int)"),
        _fake(2, "second", "CREATE TABLE t2 (id int)"),
    )
    results: list[object] = []
    barrier = threading.Barrier(4)

    def run() -> None:
        barrier.wait()
        try:
            results.append(migrate(empty_database_url, known))
        except Exception as exc:  # collected and asserted below
            results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not [r for r in results if isinstance(r, Exception)], results
    applied_counts = sorted(len(r) for r in results if isinstance(r, tuple))
    assert applied_counts == [0, 0, 0, 2]
    with psycopg.connect(empty_database_url) as conn:
        rows = conn.execute("SELECT version, count(*) FROM schema_migrations GROUP BY 1").fetchall()
    assert sorted(rows) == [(1, 1), (2, 1)]


def test_cli_migrate_twice_concurrently(empty_database_url: str) -> None:
    env = {**os.environ, "DATABASE_URL": empty_database_url}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "handlers.cli", "db", "migrate"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum("applied 0001" in out for out, _ in outs) == 1
    check_schema(empty_database_url)


def test_the_domain_migration_keeps_stored_events_and_refuses_bad_rows(
    empty_database_url: str,
) -> None:
    """0008 moves the append CHECKs into domains without rewriting a table or an index: stored
    rows stay, bad rows are still refused."""
    known = load_migrations()
    before = [m for m in known if m.version < 8]
    migrate(empty_database_url, before)
    insert_event = (
        "INSERT INTO events (event_id, stream_id, stream_version, category, type, data)"
        " VALUES (gen_random_uuid(), 'chat-1', %s, 'chat', %s, '{}')"
    )
    # The files of events, streams and their indexes: the migration must rewrite none.
    files = """
        SELECT c.relname, pg_relation_filenode(c.oid) FROM pg_class c
        WHERE c.relname IN ('events', 'streams')
           OR c.oid IN (SELECT indexrelid FROM pg_index
                        WHERE indrelid IN ('events'::regclass, 'streams'::regclass))
        ORDER BY 1
    """
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO streams (stream_id, category) VALUES ('chat-1', 'chat')")
        for version in (1, 2):
            conn.execute(insert_event, (version, "Said"))
        files_before = conn.execute(files).fetchall()
    through = [m for m in known if m.version <= 8]
    migrate(empty_database_url, through)
    check_schema(empty_database_url, through)
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        assert conn.execute(files).fetchall() == files_before
        rows = conn.execute(
            "SELECT stream_version, type FROM events ORDER BY stream_version"
        ).fetchall()
        assert rows == [(1, "Said"), (2, "Said")]
        refused = {
            "stream_version_check": (insert_event, (0, "Said")),
            "event_type_check": (insert_event, (3, "")),
            "stream_state_check": (
                "UPDATE streams SET state = %s WHERE stream_id = 'chat-1'",
                ("gone",),
            ),
        }
        for constraint, (statement, params) in refused.items():
            with pytest.raises(psycopg.errors.CheckViolation) as caught:
                conn.execute(statement, params)
            assert caught.value.diag.constraint_name == constraint
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (2,)
        assert conn.execute("SELECT state FROM streams").fetchone() == ("active",)
