"""Timed concurrent work: N coroutines, each on its own pool connection, for a fixed time.

Every worker takes its connection first and waits at the start line, so connecting is never
timed; then all start together and each repeats its operation until the deadline. An operation
started before the deadline finishes and counts, and the elapsed time runs until the last one
ends, so the rate is exact for the work done.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from .context import BenchContext, CostProbe
from .registry import Measurement

__all__ = ["Operation", "timed_workers"]

#: One unit of timed work on a connection; returns how many events it handled.
Operation = Callable[[psycopg.AsyncConnection[Any]], Awaitable[int]]


async def timed_workers(
    ctx: BenchContext,
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]],
    concurrency: int,
    seconds: float,
    make_operation: Callable[[int], Operation],
    *,
    unit: str = "events/s",
    probe_all_backends: bool = False,
) -> Measurement:
    """Run ``make_operation(worker)`` on ``concurrency`` connections for ``seconds``.

    Returns events per second over all workers, with the run's per-event costs. The server CPU
    is that of the workers' own backends, or with ``probe_all_backends`` that of every client
    backend of the scratch database (for work that takes other pool connections).
    """
    counts = [0] * concurrency
    pids = [0] * concurrency
    ready = 0
    all_ready = asyncio.Event()
    go = asyncio.Event()
    deadline = 0.0

    async def worker(index: int) -> None:
        nonlocal ready
        operation = make_operation(index)
        async with pool.connection() as conn:
            row = await (await conn.execute("SELECT pg_backend_pid()")).fetchone()
            pids[index] = int(row[0]) if row else 0
            ready += 1
            if ready == concurrency:
                all_ready.set()
            await go.wait()
            done = 0
            while time.perf_counter() < deadline:
                done += await operation(conn)
            counts[index] = done

    tasks = [asyncio.create_task(worker(i)) for i in range(concurrency)]
    waiter = asyncio.create_task(all_ready.wait())
    try:
        finished, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        if waiter not in finished:  # a worker failed before the start line
            for task in finished:
                task.result()
        if probe_all_backends:
            rows = await (
                await ctx.admin.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                    " AND backend_type = 'client backend'"
                )
            ).fetchall()
            pids = [int(row[0]) for row in rows]
        probe = CostProbe(ctx, pids)
        await probe.start()
        start = time.perf_counter()
        deadline = start + seconds
        go.set()
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    finally:
        waiter.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(waiter, *tasks, return_exceptions=True)
    total = sum(counts)
    details = await probe.stop(total)
    return Measurement(total / elapsed, unit, details)
