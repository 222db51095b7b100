"""Numbered SQL migrations in ``sql/``, applied once each and recorded with checksums.

``migrate`` takes a session advisory lock, so two concurrent runs serialise: one applies, the
other waits and then finds nothing pending. Each migration runs in its own transaction together
with its ``schema_migrations`` row. ``verify`` compares the database with the files and reports
the first problem in one line that says what to run.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import psycopg

from .database import connect_kwargs
from .errors import MigrationFailed, SchemaMismatch, first_line, translate_errors

__all__ = [
    "AppliedMigration",
    "Migration",
    "SchemaStatus",
    "check_schema",
    "load_migrations",
    "migrate",
    "require_current_schema",
    "schema_status",
]

#: Arbitrary but fixed: the advisory lock key migrations serialise on ("convstore" in hex-ish).
MIGRATION_LOCK_KEY = 0x636F6E7673746F72

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer     PRIMARY KEY,
    name        text        NOT NULL,
    checksum    text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


def default_sql_dir() -> Path:
    """``CONVSTORE_SQL_DIR`` if set, else the ``sql/`` folder beside the packages."""
    env = os.environ.get("CONVSTORE_SQL_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "sql"


class Migration(msgspec.Struct, frozen=True):
    """One migration file: its number, name, SQL text and SHA-256 checksum."""

    version: int
    name: str
    sql: str
    checksum: str

    @property
    def label(self) -> str:
        """``0003_name``, as it appears in messages."""
        return f"{self.version:04d}_{self.name}"


class AppliedMigration(msgspec.Struct, frozen=True):
    """A row of ``schema_migrations``."""

    version: int
    name: str
    checksum: str
    applied_at: Any

    @property
    def label(self) -> str:
        """``0003_name``, as it appears in messages."""
        return f"{self.version:04d}_{self.name}"


class SchemaStatus(msgspec.Struct, frozen=True):
    """Applied migrations, pending ones, and the first problem found (``None`` when current)."""

    applied: tuple[AppliedMigration, ...]
    pending: tuple[Migration, ...]
    problem: SchemaMismatch | None

    @property
    def current(self) -> bool:
        """True when every migration is applied unchanged and nothing unknown is applied."""
        return self.problem is None


def load_migrations(sql_dir: Path | None = None) -> tuple[Migration, ...]:
    """Every ``NNNN_name.sql`` in order; raise ``ValueError`` on a gap or a bad file name."""
    sql_dir = sql_dir or default_sql_dir()
    found: list[Migration] = []
    for path in sorted(sql_dir.glob("*.sql")):
        match = _NAME.match(path.name)
        if match is None:
            raise ValueError(f"{path}: migration files are named NNNN_name.sql")
        raw = path.read_bytes()
        found.append(
            Migration(
                version=int(match.group(1)),
                name=match.group(2),
                sql=raw.decode("utf-8"),
                checksum=hashlib.sha256(raw).hexdigest(),
            )
        )
    for expected, migration in enumerate(found, start=1):
        if migration.version != expected:
            raise ValueError(
                f"migrations must be numbered 0001, 0002, ...: found {migration.label}"
            )
    return tuple(found)


def _applied(conn: psycopg.Connection[Any]) -> tuple[AppliedMigration, ...]:
    exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return ()
    rows = conn.execute(
        "SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY version"
    ).fetchall()
    return tuple(AppliedMigration(*row) for row in rows)


def _at(applied: Sequence[AppliedMigration]) -> str:
    return f"{applied[-1].version:04d}" if applied else "none (empty database)"


def _compare(
    applied: Sequence[AppliedMigration], known: Sequence[Migration]
) -> tuple[tuple[Migration, ...], SchemaMismatch | None]:
    by_version = {m.version: m for m in known}
    for row in applied:
        migration = by_version.get(row.version)
        if migration is None:
            return (), SchemaMismatch(
                f"database has migration {row.label}, which this convstore does not know "
                f"(it needs {known[-1].version:04d} at most): upgrade convstore",
                kind="ahead",
            )
        if migration.checksum != row.checksum or migration.name != row.name:
            return (), SchemaMismatch(
                f"migration {migration.label} differs from the one applied as {row.label} "
                f"(checksum {row.checksum[:12]} in the database, {migration.checksum[:12]} in "
                f"sql/): schema drift, restore sql/{migration.label}.sql",
                kind="drift",
            )
    done = {row.version for row in applied}
    pending = tuple(m for m in known if m.version not in done)
    if pending:
        return pending, SchemaMismatch(
            f"database schema is at {_at(applied)}, this convstore needs "
            f"{known[-1].version:04d}: run `convstore db migrate`",
            kind="behind",
        )
    return (), None


def _connect(url: str) -> psycopg.Connection[Any]:
    with translate_errors():
        return psycopg.connect(url, **connect_kwargs())


def schema_status(url: str, migrations: Sequence[Migration] | None = None) -> SchemaStatus:
    """Compare the database at ``url`` with the migration files."""
    known = tuple(migrations) if migrations is not None else load_migrations()
    with _connect(url) as conn, translate_errors():
        applied = _applied(conn)
    pending, problem = _compare(applied, known)
    return SchemaStatus(applied=applied, pending=pending, problem=problem)


def check_schema(url: str, migrations: Sequence[Migration] | None = None) -> None:
    """Raise :class:`SchemaMismatch` unless the schema is exactly current (the start-up check)."""
    status = schema_status(url, migrations)
    if status.problem is not None:
        raise status.problem


def require_current_schema(url: str) -> None:
    """The start-up check of every long-running command: unless the schema is exactly current,
    print the one line ``db verify`` would and exit 1."""
    try:
        check_schema(url)
    except SchemaMismatch as exc:
        print(f"convstore: {exc.line}", file=sys.stderr)
        raise SystemExit(1) from exc


def migrate(url: str, migrations: Sequence[Migration] | None = None) -> tuple[Migration, ...]:
    """Apply pending migrations in order, each in its own transaction; return those applied.

    Refuses (with :class:`SchemaMismatch`) a database that is drifted or ahead.
    """
    known = tuple(migrations) if migrations is not None else load_migrations()
    applied_now: list[Migration] = []
    with _connect(url) as conn, translate_errors():
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        try:
            conn.execute(_CREATE_TABLE)
            pending, problem = _compare(_applied(conn), known)
            if problem is not None and problem.kind != "behind":
                raise problem
            for migration in pending:
                with conn.transaction():
                    try:
                        conn.execute(migration.sql.encode())
                    except psycopg.OperationalError:
                        raise  # the server went away: translated on the way out
                    except psycopg.Error as exc:
                        raise MigrationFailed(
                            migration.label,
                            tuple(m.label for m in applied_now),
                            exc.sqlstate,
                            first_line(exc),
                        ) from exc
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name, checksum)"
                        " VALUES (%s, %s, %s)",
                        (migration.version, migration.name, migration.checksum),
                    )
                applied_now.append(migration)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
    return tuple(applied_now)
