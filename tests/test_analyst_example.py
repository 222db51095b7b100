"""The README's analyst example runs: export with `convstore replay`, answer with DuckDB."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool

from conversations.connections import add_connection
from conversations.events import CODEC, ConversationOpened, MessageReceived, MessageSent
from conversations.service import ConversationService, InboundMessage
from eventstore import EventStore
from tests.conftest import wait_for_fence

ROOT = Path(__file__).resolve().parent.parent
SQL = ROOT / "docs" / "examples" / "first_response.sql"


async def test_median_first_response_per_connection(
    pool: AsyncConnectionPool[Any], database_url: str, tmp_path: Path
) -> None:
    duckdb = pytest.importorskip("duckdb")
    store = EventStore(pool, CODEC)
    service = ConversationService(store)
    base = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    for name in ("fb", "ig"):
        await add_connection(
            pool, name, channel="messenger" if name == "fb" else "instagram", external_id=name
        )
    for n in range(9):
        conn = "fb" if n % 3 else "ig"
        sent = base + dt.timedelta(minutes=n)
        r = await service.receive_inbound(conn, f"c{n}", InboundMessage(f"m{n}", sent, "hello"))
        if n != 4:  # one conversation never gets an answer
            await service.reply(r.conversation_id, by="agent", text="hi!", idempotency_key="1")

    await wait_for_fence(pool)
    done = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "handlers.cli",
            "replay",
            "--category",
            "conversation",
            "--out",
            str(tmp_path / "events.jsonl"),
        ],
        env={**os.environ, "DATABASE_URL": database_url},
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        rows = duckdb.sql(SQL.read_text()).fetchall()
    finally:
        os.chdir(cwd)

    # The same answer computed independently from the store.
    events = await store.read_all(limit=10_000, categories=["conversation"])
    connection: dict[str, str] = {}
    first_in: dict[str, dt.datetime] = {}
    first_out: dict[str, dt.datetime] = {}
    for e in events:
        if isinstance(e.data, ConversationOpened):
            connection[e.stream_id] = e.data.connection
        elif isinstance(e.data, MessageReceived):
            first_in.setdefault(e.stream_id, e.data.sent_at)
        elif isinstance(e.data, MessageSent) and e.data.source == "agent":
            first_out.setdefault(e.stream_id, e.data.sent_at)
    waits: dict[str, list[float]] = {}
    for stream, answered in first_out.items():
        waits.setdefault(connection[stream], []).append(
            (answered - first_in[stream]).total_seconds()
        )
    expected = [(c, len(w), statistics.median(w)) for c, w in sorted(waits.items())]
    assert [(c, n) for c, n, _ in rows] == [(c, n) for c, n, _ in expected]
    assert [(c, n) for c, n, _ in rows] == [("fb", 5), ("ig", 3)]
    for (_, _, got), (_, _, want) in zip(rows, expected, strict=True):
        assert got == pytest.approx(want, abs=0.001)
