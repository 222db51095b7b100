"""EXPLAIN checks for the store's hot queries, on the bench's log of at least 100k events.

Each query is explained twice: with its parameters bound (the *custom* plan PostgreSQL makes for
the first executions) and as a prepared statement under ``plan_cache_mode =
force_generic_plan`` (the *generic* plan it may switch to after five executions, since psycopg
prepares statements it sees repeatedly). Both must use the expected index and no Seq Scan of a
table of at least :data:`BIG_TABLE` rows; read_all and head must have no Sort node either (a
sort there means every page reads the whole rest of the log). read_stream may sort: for a
stream of a few hundred events PostgreSQL rightly prefers a bitmap scan of the
(stream_id, stream_version) index and a sort of those rows, which the check reports as a note.
The exact append must read the stream's state through the partial index of inactive streams.

The queries are captured from the store's public methods (a recording stand-in for the pool),
so the checks follow any change to them.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from types import SimpleNamespace
from typing import Any, cast

import msgspec
import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

from eventstore import Checkpoint, EventStore, NewEvent
from eventstore.ids import uuid7

from .context import BenchContext

__all__ = ["BIG_TABLE", "CHECK_NAMES", "CheckResult", "run_explain_checks"]

#: A Seq Scan of a table at least this big fails a check.
BIG_TABLE = 100_000

_PLACEHOLDER = re.compile(r"%\((\w+)\)s|%%")


class CheckResult(msgspec.Struct, frozen=True):
    """One EXPLAIN check: its name, whether it passed, why not, and the plan."""

    name: str
    query: str
    passed: bool
    reason: str
    plan: str


def _nodes(plan: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from _nodes(child)


def _ordered_values(text: str, params: Any) -> list[Any]:
    """The values of the placeholders in the order psycopg numbers them ($1, $2...)."""
    if not isinstance(params, Mapping):
        return list(params or ())
    order: list[str] = []
    for match in _PLACEHOLDER.finditer(text):
        name = match.group(1)
        if name is not None and name not in order:
            order.append(name)
    return [params[name] for name in order]


def _judge(
    plan: Mapping[str, Any], index: str, sizes: Mapping[str, float], forbid_sort: bool
) -> tuple[bool, str]:
    nodes = list(_nodes(plan))
    problems: list[str] = []
    notes: list[str] = []
    if not any(node.get("Index Name") == index for node in nodes):
        problems.append(f"does not use {index}")
    sorts = [n for n in nodes if n["Node Type"] in ("Sort", "Incremental Sort")]
    if sorts:
        sort = f"has a {sorts[0]['Node Type']} node (~{sorts[0].get('Plan Rows', '?')} rows)"
        (problems if forbid_sort else notes).append(sort)
    for node in nodes:
        if node["Node Type"] == "Seq Scan":
            relation = str(node.get("Relation Name"))
            if sizes.get(relation, 0) >= BIG_TABLE:
                problems.append(f"Seq Scan on {relation} ({sizes[relation]:.0f} rows)")
    return (not problems, "; ".join(problems) or "; ".join(["ok", *notes]))


def _plan_json(value: Any) -> Mapping[str, Any]:
    if isinstance(value, bytes | str):
        value = msgspec.json.decode(value)
    plan = value[0]["Plan"]
    assert isinstance(plan, dict)
    return plan


async def _table_sizes(conn: psycopg.AsyncConnection[Any]) -> dict[str, float]:
    rows = await (
        await conn.execute(
            "SELECT c.relname, c.reltuples::float8 FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.relkind = 'r' AND n.nspname = current_schema()"
        )
    ).fetchall()
    return {str(name): float(size) for name, size in rows}


async def _check(
    conn: psycopg.AsyncConnection[Any],
    name: str,
    query: sql.Composed,
    params: Any,
    index: str,
    sizes: Mapping[str, float],
    *,
    forbid_sort: bool = True,
) -> list[CheckResult]:
    text = query.as_string(conn)
    results: list[CheckResult] = []

    # Custom plan: the query with its parameters bound, as the first executions run it.
    explain = sql.SQL("EXPLAIN (FORMAT JSON) ") + query
    row = await (await conn.execute(explain, params)).fetchone()
    assert row is not None
    plan = _plan_json(row[0])
    text_plan = await _text_plan(conn, sql.SQL("EXPLAIN ") + query, params)
    passed, reason = _judge(plan, index, sizes, forbid_sort)
    results.append(CheckResult(f"{name}_custom", text, passed, reason, text_plan))

    # Generic plan: the statement as psycopg prepares it (it does so for any query run five
    # times), explained under force_generic_plan.
    await conn.execute(query, params, prepare=True)
    row = await (
        await conn.execute(
            "SELECT name FROM pg_prepared_statements WHERE name LIKE %s"
            " ORDER BY prepare_time DESC LIMIT 1",
            ("\\_pg3\\_%",),
        )
    ).fetchone()
    assert row is not None, "psycopg did not prepare the statement"
    values = _ordered_values(text, params)
    # EXECUTE's arguments are composed as literals: bound parameters would be untyped there.
    execute = sql.SQL("EXECUTE {}").format(sql.Identifier(str(row[0])))
    if values:
        execute += sql.SQL("({})").format(sql.SQL(", ").join(sql.Literal(v) for v in values))
    await conn.execute("SET plan_cache_mode = force_generic_plan")
    try:
        row = await (await conn.execute(sql.SQL("EXPLAIN (FORMAT JSON) ") + execute)).fetchone()
        assert row is not None
        plan = _plan_json(row[0])
        text_plan = await _text_plan(conn, sql.SQL("EXPLAIN ") + execute, None)
    finally:
        await conn.execute("RESET plan_cache_mode")
    passed, reason = _judge(plan, index, sizes, forbid_sort)
    results.append(CheckResult(f"{name}_generic", text, passed, reason, text_plan))
    return results


async def _text_plan(conn: psycopg.AsyncConnection[Any], explain: sql.Composed, params: Any) -> str:
    rows = await (await conn.execute(explain, params)).fetchall()
    return "\n".join(str(r[0]) for r in rows)


class _Recorder:
    """Stands in for an EventStore's pool: records the statements a store method sends.

    The checks explain exactly what the public methods send, whatever their internals.
    """

    def __init__(self, *, first_only: bool = False) -> None:
        self.statements: list[tuple[Any, Any]] = []
        self.first_only = first_only
        # An append reads the connection's transaction status before its statement.
        self.pgconn = SimpleNamespace(transaction_status=TransactionStatus.IDLE)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[_Recorder]:
        yield self

    async def execute(self, query: Any, params: Any = None, **kwargs: Any) -> _Recorder:
        self.statements.append((query, params))
        if self.first_only:
            # What follows would answer the recorder's empty results (an append that stored
            # nothing goes on to find out why), so the call ends here.
            raise _FirstStatement
        return self

    async def fetchall(self) -> list[Any]:
        return []

    async def fetchone(self) -> None:
        return None


class _FirstStatement(Exception):
    """Ends a recorded call after its first statement."""


async def _captured(
    call: Callable[[EventStore], Awaitable[object]], *, first_only: bool = False
) -> tuple[sql.Composed, Any]:
    """The one statement ``call`` sends through the store (with ``first_only``, the first of
    several), as a composable and its params."""
    recorder = _Recorder(first_only=first_only)
    with contextlib.suppress(_FirstStatement):
        await call(EventStore(cast(Any, recorder)))
    if len(recorder.statements) != 1:
        raise RuntimeError(f"expected one statement, the store sent {len(recorder.statements)}")
    query, params = recorder.statements[0]
    if isinstance(query, bytes):
        query = query.decode()
    if isinstance(query, str):
        query = sql.SQL(query)
    return sql.Composed([query]), params


async def run_explain_checks(ctx: BenchContext) -> list[CheckResult]:
    """Explain read_all (from a mid-log checkpoint, behind the fence), head, read_stream and
    an exact append."""
    from .paths.read_all import ensure_log

    await ensure_log(ctx)
    conn = await ctx.connect()
    try:
        sizes = await _table_sizes(conn)
        row = await (
            await conn.execute(
                "SELECT transaction_id::text::bigint, position, stream_id FROM events"
                " ORDER BY transaction_id, position OFFSET %s LIMIT 1",
                (int(sizes.get("events", 0)) // 2,),
            )
        ).fetchone()
        assert row is not None, "the log is empty"
        checkpoint = Checkpoint(int(row[0]), int(row[1]))
        stream_id = str(row[2])
        results: list[CheckResult] = []
        small = _fail_small_table(sizes)
        if small is not None:
            results.append(small)
        query, params = await _captured(lambda store: store.read_all(checkpoint, 1000))
        results += await _check(conn, "explain_read_all", query, params, "events_pkey", sizes)
        query, params = await _captured(lambda store: store.head())
        results += await _check(conn, "explain_head", query, params, "events_pkey", sizes)
        for direction in ("forwards", "backwards"):

            async def read_stream(store: EventStore, direction: str = direction) -> object:
                return await store.read_stream(stream_id, direction=direction)

            query, params = await _captured(read_stream)
            results += await _check(
                conn,
                f"explain_read_stream_{direction}",
                query,
                params,
                "events_stream_version_key",
                sizes,
                forbid_sort=False,
            )
        # The append with an exact expected version, the bench's hot write. A version far above
        # the stream's never holds, so preparing the statement for its generic plan inserts
        # nothing. Its state probe must take the partial index of inactive streams (sql/0011),
        # not the primary key of streams; its version probe takes events_stream_version_key.
        event = NewEvent(uuid7(), "ExplainCheck", b"{}")
        query, params = await _captured(
            lambda store: store.append(stream_id, [event], 2**40), first_only=True
        )
        results += await _check(
            conn, "explain_append_exact", query, params, "streams_inactive_idx", sizes
        )
        return results
    finally:
        await conn.close()


def _fail_small_table(sizes: Mapping[str, float]) -> CheckResult | None:
    rows = sizes.get("events", 0)
    if rows >= BIG_TABLE:
        return None
    return CheckResult(
        "explain_table_size",
        "",
        False,
        f"events has {rows:.0f} rows (< {BIG_TABLE}): the plans checked are not meaningful",
        "",
    )


#: The names of the checks :func:`run_explain_checks` reports (for ``--only`` and ``--list``).
CHECK_NAMES: tuple[str, ...] = tuple(
    f"explain_{query}_{plan}"
    for query in (
        "read_all",
        "head",
        "read_stream_forwards",
        "read_stream_backwards",
        "append_exact",
    )
    for plan in ("custom", "generic")
)
