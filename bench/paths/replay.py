"""``convstore replay`` to JSON Lines over 1M events, against the raw log read rate.

Setup makes the log hold the synthetic traffic of :mod:`bench.paths.projector` (1M events;
10k under ``--quick``) and measures the export's peak memory: it runs
``python -m handlers.cli replay --after CHECKPOINT --out FILE`` in a subprocess
(``DATABASE_URL`` pointing at the scratch database) over those events, and again over their
last tenth, and reads the export process's maximum resident set size (``getrusage``). The
goal is flat memory, under 200 MiB whatever the length: both peaks go in the details.

The path is :func:`handlers.export.export` (what the command runs) in this process over the same
events (from the checkpoint before them; later paths may add events after them), writing JSON
Lines to ``/dev/null``, in events per second. The reference is the raw log read rate of the
projector path: :meth:`EventStore.read_all` over the same events in pages of 1000, decoding
every payload.
"""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import tempfile
import time
from typing import IO, Final, LiteralString, cast

from eventstore.replay import ReplayFilter
from handlers.export import export

from ..context import BenchContext
from ..registry import BenchPath, Measurement, register
from .projector import ensure_synthetic, raw_read

__all__ = ["peak_rss_mib"]

_STATE_KEY: Final = "replay_peak_rss"


class _Deadline(Exception):
    """Raised by the sink to end a warm-up export once its time has passed."""


class _Sink(io.RawIOBase):
    """``/dev/null`` for the export: counts bytes, and ends the export after a deadline."""

    def __init__(self, deadline: float) -> None:
        super().__init__()
        self.deadline = deadline
        self.bytes = 0

    def writable(self) -> bool:
        """Always writable."""
        return True

    def write(self, data: object) -> int:
        """Drop ``data``; raise :class:`_Deadline` once the deadline has passed."""
        size = memoryview(cast(bytes, data)).nbytes
        self.bytes += size
        if time.perf_counter() > self.deadline:
            raise _Deadline
        return size


#: Runs its arguments as a child and prints that child's peak RSS (KiB). The export must not be
#: a direct child of the bench: Linux carries a process's peak RSS across exec, so a child
#: spawned by this (large) process would report at least this process's size, not its own.
_MEASURE: LiteralString = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(code)
"""


def peak_rss_mib(url: str, *args: str) -> tuple[float, float]:
    """Run ``python -m handlers.cli replay --out FILE *args`` on ``url``: (peak MiB, seconds).

    The peak is the maximum resident set size of the export's process alone, measured by a
    small intermediate process (see :data:`_MEASURE`).
    """
    env = dict(os.environ, DATABASE_URL=url)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "replay.jsonl")
        command = [sys.executable, "-m", "handlers.cli", "replay", "--out", out, *args]
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", _MEASURE, *command],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
            check=False,
        )
        elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {done.returncode}")
    # Linux reports ru_maxrss in KiB.
    return int(done.stdout.split()[-1]) / 1024, elapsed


async def _setup(ctx: BenchContext) -> None:
    first, last, count = await ensure_synthetic(ctx)
    tenth = last.position - count // 10
    after = ("--after", str(first))
    whole, seconds = await asyncio.to_thread(peak_rss_mib, ctx.url, *after)
    part, _ = await asyncio.to_thread(peak_rss_mib, ctx.url, "--after-position", str(tenth))
    ctx.state[_STATE_KEY] = {
        "peak_rss_mib": whole,
        "peak_rss_mib_last_tenth": part,
        "cli_events_per_s": count / seconds,
        "events": float(count),
    }


async def export_jsonl(ctx: BenchContext, seconds: float) -> Measurement:
    """``handlers.export.export`` of the whole log as JSON Lines to ``/dev/null``.

    Stops early (the warm-up) once ``seconds`` have passed.
    """
    first, last, _ = await ensure_synthetic(ctx)
    where = ReplayFilter(after=first)
    started = time.perf_counter()
    sink = _Sink(started + seconds)
    try:
        count = await export(ctx.url, where, cast(IO[bytes], sink), fmt="jsonl")
    except _Deadline:
        elapsed = time.perf_counter() - started
        return Measurement(1.0 / elapsed, "events/s")  # a warm-up: its figure is not used
    elapsed = time.perf_counter() - started
    details = dict(ctx.state.get(_STATE_KEY, {}))
    details["bytes_per_event"] = sink.bytes / count if count else 0.0
    details["exported"] = float(count)
    return Measurement(count / elapsed, "events/s", details)


register(
    BenchPath(
        name="replay_jsonl",
        description=(
            "handlers.export.export (convstore replay) of the synthetic traffic (1M events; 10k"
            " under --quick) as JSON Lines to /dev/null; peak RSS of `python -m handlers.cli"
            " replay --out FILE` over those events and over their last tenth in details;"
            " goal: flat memory under 200 MiB"
        ),
        run=export_jsonl,
        reference=raw_read,
        reference_description=(
            "raw log read rate: EventStore.read_all over the same events in pages of 1000,"
            " decoding every payload"
        ),
        setup=_setup,
        fixed_work=True,
    )
)
