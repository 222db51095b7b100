"""Schema drift cannot slip in: migrations applied in order give exactly the checked-in schema.

After an intended schema change, regenerate the snapshot with
``UPDATE_SCHEMA_SNAPSHOT=1 python -m pytest tests/test_schema_snapshot.py`` and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import psycopg
import pytest

SNAPSHOT = Path(__file__).with_name("schema_snapshot.txt")

_QUERIES = {
    "column": """
        SELECT c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
               || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
               || CASE WHEN a.attidentity <> '' THEN ' identity ' || a.attidentity::text ELSE '' END
               || COALESCE(' default ' || pg_get_expr(d.adbin, d.adrelid), '')
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND a.attnum > 0
          AND NOT a.attisdropped
    """,
    "index": """
        SELECT pg_get_indexdef(i.indexrelid)
        FROM pg_index i
        JOIN pg_class c ON c.oid = i.indrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public'
    """,
    "constraint": """
        SELECT c.relname || ' ' || k.conname || ' ' || pg_get_constraintdef(k.oid)
        FROM pg_constraint k
        JOIN pg_class c ON c.oid = k.conrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND k.contype IN ('p', 'u', 'f', 'c', 'x')
    """,
    # Domains carry CHECKs of their own (sql/0008), which the constraint query above, by
    # table, does not see.
    "domain": """
        SELECT t.typname || ' ' || format_type(t.typbasetype, t.typtypmod)
               || CASE WHEN t.typnotnull THEN ' not null' ELSE '' END
               || COALESCE(' ' || k.conname || ' ' || pg_get_constraintdef(k.oid), '')
        FROM pg_type t
        JOIN pg_namespace n ON n.oid = t.typnamespace
        LEFT JOIN pg_constraint k ON k.contypid = t.oid
        WHERE n.nspname = 'public' AND t.typtype = 'd'
    """,
    "function": """
        SELECT p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')'
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'public'
    """,
    "trigger": """
        SELECT pg_get_triggerdef(t.oid)
        FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND NOT t.tgisinternal
    """,
}


def describe_schema(url: str) -> str:
    """Tables, columns and types, indexes, constraints, domains, functions and triggers, sorted."""
    lines: list[str] = []
    with psycopg.connect(url) as conn:
        for kind, query in _QUERIES.items():
            rows = conn.execute(query).fetchall()  # type: ignore[call-overload]
            lines.extend(sorted(f"{kind} {row[0]}" for row in rows))
    return "\n".join(lines) + "\n"


def test_migrations_give_the_snapshot_schema(database_url: str) -> None:
    actual = describe_schema(database_url)
    if os.environ.get("UPDATE_SCHEMA_SNAPSHOT"):
        SNAPSHOT.write_text(actual)
    expected = SNAPSHOT.read_text()
    assert actual == expected, (
        "the migrated schema differs from tests/schema_snapshot.txt; if the change is intended,"
        " regenerate it with UPDATE_SCHEMA_SNAPSHOT=1"
    )


@pytest.mark.parametrize(
    "drift",
    [
        "ALTER TABLE events ADD COLUMN sneaky text",
        "ALTER DOMAIN event_type DROP CONSTRAINT event_type_check",
    ],
    ids=["column", "domain-constraint"],
)
def test_snapshot_check_can_fail(database_url: str, drift: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(drift)
    assert describe_schema(database_url) != SNAPSHOT.read_text()
