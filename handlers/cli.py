"""The ``convstore`` command line.

Every command that touches the database resolves it in one place
(:func:`eventstore.database.resolve_database_url`): ``--database-url``, else ``DATABASE_URL``,
else the embedded PostgreSQL. Long-running commands refuse to start on a schema ``db verify``
would reject, with the same one line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from eventstore.database import resolve_database_url
from eventstore.errors import ConvstoreError, SchemaMismatch
from eventstore.migrations import check_schema, migrate, schema_status

__all__ = ["build_parser", "main", "require_current_schema"]


def _err(line: str) -> None:
    print(line, file=sys.stderr)


def _url(args: argparse.Namespace) -> str:
    data_dir = Path(args.data_dir) if args.data_dir else None
    return resolve_database_url(args.database_url, data_dir=data_dir, announce=_err)


def require_current_schema(url: str) -> None:
    """The start-up check of every long-running command: exit 1 with one line unless current."""
    try:
        check_schema(url)
    except SchemaMismatch as exc:
        _err(f"convstore: {exc.line}")
        raise SystemExit(1) from exc


def _db_migrate(args: argparse.Namespace) -> int:
    applied = migrate(_url(args))
    if applied:
        for migration in applied:
            print(f"applied {migration.label}")
    else:
        print("nothing to apply: the schema is current")
    return 0


def _db_verify(args: argparse.Namespace) -> int:
    status = schema_status(_url(args))
    if status.problem is not None:
        _err(status.problem.line)
        return 1
    last = status.applied[-1].label if status.applied else "none"
    print(f"schema is current (at {last})")
    return 0


def _db_status(args: argparse.Namespace) -> int:
    status = schema_status(_url(args))
    for row in status.applied:
        print(f"applied  {row.label}  {row.applied_at:%Y-%m-%d %H:%M:%S%z}  {row.checksum[:12]}")
    for migration in status.pending:
        print(f"pending  {migration.label}")
    if status.problem is not None:
        print(status.problem.line)
    else:
        print("schema is current")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every ``convstore`` command."""
    parser = argparse.ArgumentParser(
        prog="convstore", description="An event-sourced conversation store on PostgreSQL."
    )
    parser.add_argument(
        "--database-url",
        help="PostgreSQL URL (default: $DATABASE_URL, else the embedded PostgreSQL)",
    )
    parser.add_argument(
        "--data-dir",
        help="data folder of the embedded PostgreSQL (default: $CONVSTORE_DATA_DIR "
        "or .convstore/pgdata)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    db = commands.add_parser("db", help="schema migrations").add_subparsers(
        dest="db_command", required=True
    )
    db.add_parser("migrate", help="apply pending migrations").set_defaults(run=_db_migrate)
    db.add_parser("verify", help="exit 1 unless the schema is current").set_defaults(run=_db_verify)
    db.add_parser("status", help="list applied and pending migrations").set_defaults(run=_db_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``convstore`` command and return its exit code."""
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except ConvstoreError as exc:
        _err(f"convstore: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
