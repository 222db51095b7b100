"""The inbox projector catching up over synthetic conversation traffic, against the raw read.

Setup bulk-loads N events of :func:`projections.synthetic.traffic` (conversations opening,
customers writing, agents replying, reading, snoozing, closing, merging contacts...) into the
log with :func:`projections.synthetic.copy_into_log`, the loader of ``projections/bench.py``,
and notes the checkpoints before and after them. Other paths write into the same log, so both
sides start at the checkpoint before the synthetic events and stop at the one after them.

The path is the live projector's loop: an :class:`projections.runner.Applier` on a fresh inbox
schema (query indexes in place, as a running projector has them) applying batches of 1000 with
its read-ahead until it has caught up, with the garbage collector set as the projector commands
set it (:func:`projections.runner.collecting_less_often`). The reference is the raw log read
rate that ``projections/bench.py`` compares with: :meth:`EventStore.read_all` over the same
events in batches of 1000, decoding every payload, under the same collector setting. The
issue's goal is an absolute one (at least 50,000 events/s); the ratio shows what projecting
costs over reading.
"""

from __future__ import annotations

import time
from typing import Any, Final

from psycopg import sql

from conversations.events import CODEC
from eventstore import START, EventStore
from eventstore.records import Checkpoint
from projections.base import CHECKPOINT_TABLE
from projections.registry import PROJECTIONS
from projections.runner import Applier, collecting_less_often, log_head
from projections.synthetic import copy_into_log, traffic

from ..context import BenchContext, CostProbe
from ..registry import BenchPath, Measurement, register
from .read_all import _wait_for_fence

__all__ = ["BATCH", "ensure_synthetic"]

#: Events per batch, for the projector and for the reference.
BATCH: Final = 1000
_SCHEMA: Final = "bench_catch_up"
_STATE_KEY: Final = "synthetic_traffic"


def synthetic_size(ctx: BenchContext) -> int:
    """Events of synthetic traffic the run loads: 1,000,000 (10,000 under ``--quick``)."""
    return int(ctx.scale(10_000, 1_000_000))


async def ensure_synthetic(ctx: BenchContext) -> tuple[Checkpoint, Checkpoint, int]:
    """Load the run's synthetic traffic once; return (checkpoint before, last, events)."""
    loaded = ctx.state.get(_STATE_KEY)
    if loaded is not None:
        first, last, count = loaded
        return Checkpoint(*first), Checkpoint(*last), int(count)
    events = synthetic_size(ctx)
    await _wait_for_fence(ctx)
    async with await ctx.connect() as conn:
        before = await log_head(conn)
        count = await copy_into_log(conn, list(traffic(events, seed=0)))
        after = await log_head(conn)
    await ctx.execute("VACUUM (ANALYZE) events, streams")
    await _wait_for_fence(ctx)
    if after is None:
        raise RuntimeError("the synthetic traffic did not reach the log")
    first = before if before is not None else START
    ctx.state[_STATE_KEY] = (
        (first.transaction_id, first.position),
        (after.transaction_id, after.position),
        count,
    )
    return first, after, count


async def _setup(ctx: BenchContext) -> None:
    await ensure_synthetic(ctx)


async def catch_up(ctx: BenchContext, seconds: float) -> Measurement:
    """The inbox projector catching up from the checkpoint before the synthetic traffic.

    Stops early (the warm-up) once ``seconds`` have passed.
    """
    first, last, _ = await ensure_synthetic(ctx)
    projection = PROJECTIONS["inbox"]
    pool = await ctx.pool(2)  # one to write batches, one for the read-ahead
    applier = Applier(pool, projection, _SCHEMA)
    count = 0
    async with pool.connection() as conn:
        # The read-ahead reads on the pool's other connection: its backend's CPU is the
        # projector's too.
        async with pool.connection() as reader:
            pids = [conn.info.backend_pid, reader.info.backend_pid]
        await conn.execute(
            sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(_SCHEMA))
        )
        await applier.create(conn)
        await conn.execute(
            sql.SQL("UPDATE {} SET transaction_id = %s, position = %s").format(
                sql.Identifier(_SCHEMA, CHECKPOINT_TABLE)
            ),
            (first.transaction_id, first.position),
        )
        probe = CostProbe(ctx, pids)
        await probe.start()
        start = time.perf_counter()
        deadline = start + seconds
        try:
            with collecting_less_often():  # as the projector commands run
                while True:
                    result = await applier.apply_batch(conn, BATCH, until=last)
                    count += result.events
                    if result.caught_up or result.checkpoint >= last:
                        break
                    if time.perf_counter() > deadline:
                        break
        finally:
            await applier.close()
        elapsed = time.perf_counter() - start
    details = await probe.stop(count)
    details["events"] = float(count)
    return Measurement(count / elapsed, "events/s", details)


async def raw_read(ctx: BenchContext, seconds: float) -> Measurement:
    """``EventStore.read_all`` over the same events in batches of 1000, decoding payloads."""
    first, last, _ = await ensure_synthetic(ctx)
    pool = await ctx.pool(2)
    store = EventStore(pool, CODEC)
    count = 0
    async with pool.connection() as conn:
        probe = CostProbe(ctx, [conn.info.backend_pid])
        await probe.start()
        start = time.perf_counter()
        deadline = start + seconds
        after = first
        with collecting_less_often():  # the same process setting as the path
            while True:
                page = await store.read_all(after, BATCH, connection=conn)
                page = [event for event in page if event.checkpoint <= last]
                count += len(page)
                if len(page) < BATCH or time.perf_counter() > deadline:
                    break
                after = page[-1].checkpoint
        elapsed = time.perf_counter() - start
    details: dict[str, Any] = await probe.stop(count)
    details["events"] = float(count)
    return Measurement(count / elapsed, "events/s", details)


register(
    BenchPath(
        name="projector_catchup",
        description=(
            "inbox projector (Applier, batches of 1000, read-ahead and fold ahead, indexes in"
            " place, the collector set as `convstore project` sets it) catching up over"
            " synthetic conversation traffic (1M events; 10k under --quick);"
            " goal: at least 50,000 events/s"
        ),
        run=catch_up,
        reference=raw_read,
        reference_description=(
            "raw log read rate: EventStore.read_all over the same events in batches of 1000,"
            " decoding every payload, the same collector setting"
        ),
        setup=_setup,
        fixed_work=True,
    )
)
