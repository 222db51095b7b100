"""Replay: filters one by one and combined, always in read_all's order; exports; the CLI."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from psycopg_pool import AsyncConnectionPool

from eventstore import EventCodec, EventStore, RecordedEvent
from eventstore.replay import ReplayFilter, replay, replay_sync
from tests.conftest import wait_for_fence

ROOT = Path(__file__).resolve().parent.parent


class Ping(msgspec.Struct, frozen=True, tag=True):
    n: int


class Pong(msgspec.Struct, frozen=True, tag=True):
    n: int


@pytest.fixture
async def store(pool: AsyncConnectionPool[Any]) -> AsyncIterator[EventStore]:
    """This module's store knows its two event types."""
    store = EventStore(pool, EventCodec([Ping, Pong]))
    yield store
    await store.close()


async def _seed(store: EventStore) -> tuple[list[RecordedEvent], dt.datetime]:
    for i in range(30):
        stream = f"{'alpha' if i % 2 else 'beta'}-{i % 5}"
        await store.append(stream, [Ping(i) if i % 3 else Pong(i)])
        if i == 14:
            await asyncio.sleep(0.05)
            middle = dt.datetime.now(dt.UTC)
            await asyncio.sleep(0.05)
    await wait_for_fence(store.pool)
    everything = await store.read_all(limit=10_000)
    return everything, middle


async def _collect(store: EventStore, where: ReplayFilter, page_size: int = 4) -> list[int]:
    return [e.position async for e in replay(store, where, page_size=page_size)]


async def test_filters_one_by_one_and_combined_keep_log_order(store: EventStore) -> None:
    everything, middle = await _seed(store)
    positions = [e.position for e in everything]
    assert await _collect(store, ReplayFilter()) == positions

    def expect(keep: list[RecordedEvent]) -> list[int]:
        return [e.position for e in keep]

    cases: list[tuple[ReplayFilter, list[RecordedEvent]]] = [
        (ReplayFilter(after=everything[9].checkpoint), everything[10:]),
        (ReplayFilter(after_position=everything[9].position), everything[10:]),
        (ReplayFilter(since=middle), [e for e in everything if e.recorded_at >= middle]),
        (ReplayFilter(until=middle), [e for e in everything if e.recorded_at < middle]),
        (ReplayFilter(streams=("alpha-1",)), [e for e in everything if e.stream_id == "alpha-1"]),
        (ReplayFilter(categories=("beta",)), [e for e in everything if e.category == "beta"]),
        (ReplayFilter(types=("Pong",)), [e for e in everything if e.type == "Pong"]),
        (
            ReplayFilter(categories=("alpha",), types=("Ping",), since=middle),
            [
                e
                for e in everything
                if e.category == "alpha" and e.type == "Ping" and e.recorded_at >= middle
            ],
        ),
        (
            ReplayFilter(
                after=everything[3].checkpoint, until=middle, streams=("beta-0", "alpha-3")
            ),
            [
                e
                for e in everything[4:]
                if e.recorded_at < middle and e.stream_id in ("beta-0", "alpha-3")
            ],
        ),
    ]
    for where, keep in cases:
        got = await _collect(store, where)
        assert got == expect(keep), where
        assert got, f"{where} selects nothing: the case proves nothing"
    with pytest.raises(ValueError):
        await _collect(store, ReplayFilter(after_position=10**9))


def test_replay_sync_matches_and_stops_early(database_url: str) -> None:
    async def seed() -> list[int]:
        from eventstore.database import open_pool

        pool = await open_pool(database_url)
        try:
            everything, _ = await _seed(EventStore(pool, EventCodec([Ping, Pong])))
            return [e.position for e in everything]
        finally:
            await pool.close()

    positions = asyncio.run(seed())
    assert [e.position for e in replay_sync(database_url, page_size=7)] == positions
    iterator = replay_sync(database_url, page_size=2)
    first = [next(iterator).position for _ in range(3)]
    iterator.close()  # must not hang with the producer blocked on a full queue
    assert first == positions[:3]


def _cli(url: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "handlers.cli", "replay", *args],
        env={**os.environ, "DATABASE_URL": url},
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )


async def test_cli_exports_jsonl_and_csv(
    store: EventStore, database_url: str, tmp_path: Path
) -> None:
    everything, _ = await _seed(store)
    done = await asyncio.to_thread(_cli, database_url, "--type", "Pong")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    pongs = [e for e in everything if e.type == "Pong"]
    assert [line["position"] for line in lines] == [e.position for e in pongs]
    assert lines[0]["data"] == {"type": "Pong", "n": 0}
    assert lines[0]["checkpoint"] == str(pongs[0].checkpoint)
    assert set(lines[0]) == {
        "position",
        "checkpoint",
        "event_id",
        "stream",
        "version",
        "type",
        "data",
        "metadata",
        "recorded_at",
    }
    out = tmp_path / "slice.csv"
    done = await asyncio.to_thread(
        _cli, database_url, "--format", "csv", "--category", "alpha", "--out", str(out)
    )
    assert done.returncode == 0, done.stderr
    rows = out.read_text().splitlines()
    assert rows[0] == "position,checkpoint,event_id,stream,version,type,recorded_at,data,metadata"
    assert len(rows) - 1 == sum(e.category == "alpha" for e in everything)
    bad = await asyncio.to_thread(_cli, database_url, "--after", "not-a-checkpoint")
    assert bad.returncode == 2 and b"checkpoint" in bad.stderr


async def test_cli_into_head_ends_quietly(store: EventStore, database_url: str) -> None:
    for i in range(40):
        await store.append(f"bulk-{i}", [Ping(i)])
    await store.append("bulk-x", [Ping(n) for n in range(3000)])

    def run() -> tuple[int, bytes, bytes]:
        replay_proc = subprocess.Popen(
            [sys.executable, "-m", "handlers.cli", "replay"],
            env={**os.environ, "DATABASE_URL": database_url},
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert replay_proc.stdout is not None
        head = subprocess.run(["head", "-n", "2"], stdin=replay_proc.stdout, capture_output=True)
        replay_proc.stdout.close()
        _, err = replay_proc.communicate(timeout=120)
        return replay_proc.returncode, head.stdout, err

    code, first_two, err = await asyncio.to_thread(run)
    assert len(first_two.splitlines()) == 2
    assert code == 0, err
    assert b"Traceback" not in err
