"""The registry of benchmark paths: the one extension point of the bench.

A *path* is something convstore does (append, read the log, ingest a webhook...) measured
against a *reference*: the same work done by hand with plain psycopg on equivalent plain tables
in the same database, in the same run. Both are async functions ``(ctx, seconds) -> Measurement``;
the harness warms both up, runs them in alternating rounds and reports the median of the
per-round ratios. A later issue adds a path like this::

    from bench.registry import BenchPath, Measurement, register

    async def inbox_query_p99(ctx: BenchContext, seconds: float) -> Measurement:
        ...  # run for about `seconds`, return Measurement(p99_ms, "ms")

    async def inbox_query_p99_reference(ctx: BenchContext, seconds: float) -> Measurement:
        ...

    register(BenchPath(
        name="inbox_p99",
        description="inbox list query, p99 latency at 8 connections",
        run=inbox_query_p99,
        reference=inbox_query_p99_reference,
        reference_description="the same SELECT on a plain table with the same index",
        higher_is_better=False,
        target=0.8,
    ))

and imports its module in :mod:`bench.paths`. ``setup`` (optional) runs once before the
warm-up, for example to load a data set into the scratch database.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from .context import BenchContext

__all__ = ["REGISTRY", "BenchPath", "Measure", "Measurement", "Setup", "register"]


class Measurement(NamedTuple):
    """One timed run: its figure and unit, plus optional diagnostics (per-event costs...)."""

    value: float
    unit: str
    details: Mapping[str, float] = {}


#: A timed run of a path or of its reference: ``(ctx, seconds) -> Measurement``: work for
#: about ``seconds`` (see :attr:`BenchPath.fixed_work` for paths with a fixed amount of work).
Measure = Callable[["BenchContext", float], Awaitable[Measurement]]

#: Prepares what a path needs, once, before its warm-up.
Setup = Callable[["BenchContext"], Awaitable[None]]


@dataclasses.dataclass(frozen=True)
class BenchPath:
    """A measured path, its reference, and the ratio it must reach.

    The ratio is *relative speed*: ``value / reference`` when higher is better (events/s),
    ``reference / value`` when lower is better (latency), so a ratio of 1.0 always means "as
    good as plain PostgreSQL" and a target is always a minimum ratio.
    """

    name: str
    description: str
    run: Measure
    reference: Measure
    reference_description: str
    target: float | None = None
    higher_is_better: bool = True
    setup: Setup | None = None
    #: Scales the harness's round duration for paths that need longer (or shorter) runs.
    duration_factor: float = 1.0
    #: A fixed-work path (a full scan of the log) does all its work in each measured round,
    #: where the harness passes ``seconds=math.inf``; in the warm-up it gets the warm-up time
    #: and must stop once that has passed.
    fixed_work: bool = False
    #: Left out of ``--quick`` runs (which must stay under a minute): for paths that only
    #: explain another path's figure and have no target of their own.
    full_only: bool = False

    def ratio(self, value: float, reference: float) -> float:
        """The path's speed relative to the reference (1.0 = equal, higher = faster)."""
        if self.higher_is_better:
            return value / reference if reference > 0 else float("nan")
        return reference / value if value > 0 else float("nan")


#: Every registered path by name, in registration order (the order they run and print).
REGISTRY: dict[str, BenchPath] = {}


def register(path: BenchPath) -> BenchPath:
    """Add a path to :data:`REGISTRY`; a name may be registered once."""
    if path.name in REGISTRY:
        raise ValueError(f"bench path {path.name!r} is already registered")
    REGISTRY[path.name] = path
    return path
