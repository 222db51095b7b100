"""Running a path against its reference: warm-up, alternating rounds, medians, the ratio.

On a small shared machine the absolute figures drift from minute to minute, so a path and its
reference run in many short alternating rounds (reference first in even rounds, the path first
in odd ones). The result's ratio is the median of the per-round ratios; its value and reference
are the medians of each side, so ``value / reference`` may differ a little from the ratio. The
lowest and highest per-round ratios are kept too, so the spread shows how much to trust it.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Sequence

import msgspec

from .context import BenchContext
from .registry import BenchPath, Measurement

__all__ = ["PathResult", "RoundResult", "Timing", "run_path"]

#: Rounds every path runs whatever its time budget, so a median pairs more than one sample.
_MIN_ROUNDS = 2


class Timing(msgspec.Struct, frozen=True):
    """How long the harness runs each path: warm-up and round durations, number of rounds."""

    warmup_seconds: float
    round_seconds: float
    rounds: int
    #: No new round starts once a path has spent this long in its rounds (at least two run),
    #: so one slow path cannot blow the run's time budget.
    path_budget_seconds: float

    @classmethod
    def for_mode(cls, quick: bool) -> Timing:
        """The ``--quick`` timing (whole bench under a minute) or the full one."""
        if quick:
            return cls(warmup_seconds=0.25, round_seconds=0.5, rounds=3, path_budget_seconds=4)
        # 20 rounds, not 10: on these shared machines a round's ratio spreads widely (for the
        # append at 8 connections, a quartile range of 0.77-0.94 over 30 rounds), and three
        # 10-round runs of it on one afternoon gave 0.76, 0.80 and 0.87, too coarse to tell a
        # 0.8 target met or missed. The budget still caps the long paths.
        return cls(warmup_seconds=2.0, round_seconds=2.0, rounds=20, path_budget_seconds=120)


class RoundResult(msgspec.Struct, frozen=True):
    """One round: the path's and the reference's figures and diagnostics."""

    value: float
    reference: float
    ratio: float
    details: dict[str, float]
    reference_details: dict[str, float]


class PathResult(msgspec.Struct, frozen=True):
    """A path's result: medians over the rounds, the ratio, and whether it meets its target.

    ``ratio`` is the median of the per-round ratios (see the module docstring).
    """

    name: str
    description: str
    reference_description: str
    unit: str
    value: float
    reference: float
    ratio: float
    ratio_min: float
    ratio_max: float
    target: float | None
    met: bool | None
    higher_is_better: bool
    details: dict[str, float]
    reference_details: dict[str, float]
    rounds: list[RoundResult]


def _median_details(runs: Sequence[Measurement]) -> dict[str, float]:
    keys = sorted({key for run in runs for key in run.details})
    return {
        key: statistics.median(run.details[key] for run in runs if key in run.details)
        for key in keys
    }


async def run_path(ctx: BenchContext, path: BenchPath, timing: Timing) -> PathResult:
    """Set up, warm up and measure ``path`` and its reference; return the aggregated result."""
    if path.setup is not None:
        began = time.monotonic()
        await path.setup(ctx)
        print(f"  {path.name}: setup {time.monotonic() - began:.1f}s", file=sys.stderr)
    seconds = math.inf if path.fixed_work else timing.round_seconds * path.duration_factor
    warmup = timing.warmup_seconds * path.duration_factor
    await path.reference(ctx, warmup)
    await path.run(ctx, warmup)
    if not ctx.quick:
        # What earlier paths (and this one's setup) left for autovacuum is done now, not during
        # the rounds (see BenchContext.settle). A quick run's tables are too small to matter,
        # and it must stay under a minute.
        #
        # After the warm-up, not before it: the warm-up prepares the path's statements, and a
        # plan made while a table was empty reads it with a sequential scan, which the prepared
        # statement keeps however large the table grows. The ANALYZE makes the server plan them
        # again. Seen: ``append_c8`` run first on a new database read 21.7M rows of ``streams``
        # in 19.7k sequential scans and measured 0.39 of its reference; settled after the
        # warm-up, 0.68 on the same machine.
        began = time.monotonic()
        await ctx.settle()
        print(f"  {path.name}: settled {time.monotonic() - began:.1f}s", file=sys.stderr)
    values: list[Measurement] = []
    references: list[Measurement] = []
    rounds: list[RoundResult] = []
    started = time.monotonic()
    for index in range(timing.rounds):
        if index >= _MIN_ROUNDS and time.monotonic() - started > timing.path_budget_seconds:
            print(f"  {path.name}: time budget spent after {index} round(s)", file=sys.stderr)
            break
        if index % 2 == 0:
            reference = await path.reference(ctx, seconds)
            value = await path.run(ctx, seconds)
        else:
            value = await path.run(ctx, seconds)
            reference = await path.reference(ctx, seconds)
        if value.unit != reference.unit:
            raise ValueError(f"{path.name}: unit {value.unit!r} vs reference {reference.unit!r}")
        values.append(value)
        references.append(reference)
        rounds.append(
            RoundResult(
                value=value.value,
                reference=reference.value,
                ratio=path.ratio(value.value, reference.value),
                details=dict(value.details),
                reference_details=dict(reference.details),
            )
        )
        print(
            f"  {path.name} round {index + 1}/{timing.rounds}: {value.value:.1f} vs"
            f" {reference.value:.1f} {value.unit} ({rounds[-1].ratio:.2f})",
            file=sys.stderr,
        )
    median_value = statistics.median(v.value for v in values)
    median_reference = statistics.median(r.value for r in references)
    ratios = [r.ratio for r in rounds]
    # Each round pairs the path with its reference measured right next to it, under the same
    # background load; the median of those paired ratios is steadier than the ratio of the two
    # medians (which may come from different rounds) when the machine's load drifts.
    ratio = statistics.median(ratios)
    return PathResult(
        name=path.name,
        description=path.description,
        reference_description=path.reference_description,
        unit=values[0].unit,
        value=median_value,
        reference=median_reference,
        ratio=ratio,
        ratio_min=min(ratios),
        ratio_max=max(ratios),
        target=path.target,
        met=None if path.target is None else ratio >= path.target,
        higher_is_better=path.higher_is_better,
        details=_median_details(values),
        reference_details=_median_details(references),
        rounds=rounds,
    )
