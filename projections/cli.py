"""The projector commands of ``convstore``: ``project`` and ``projections status|rebuild``.

``register`` adds them to the ``convstore`` parser; ``python -m projections`` runs the same
commands on their own (the tests start projector processes that way).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import psycopg

from eventstore import ConvstoreError, open_pool, require_current_schema, resolve_database_url
from eventstore.errors import DatabaseUnavailable, first_line

from .base import Projection, ProjectionError
from .progress import progress_for
from .rebuild import rebuild
from .registry import PROJECTIONS, REPORTED, get_projection
from .runner import DEFAULT_LEASE, HEARTBEAT, collecting_less_often, run_projections
from .status import format_status, projection_status

__all__ = ["main", "register"]


def _err(line: str) -> None:
    print(line, file=sys.stderr)


def _url(args: argparse.Namespace) -> str:
    """The database, and exit 1 with one line unless its schema is current."""
    data_dir = getattr(args, "data_dir", None)
    url = resolve_database_url(
        getattr(args, "database_url", None),
        data_dir=Path(data_dir) if data_dir else None,
        announce=_err,
    )
    require_current_schema(url)
    return url


def _selected(
    names: Sequence[str] | None, among: Mapping[str, Projection] = PROJECTIONS
) -> list[Projection]:
    if not names:
        return list(among.values())
    return [get_projection(name, among) for name in dict.fromkeys(names)]


def _log_to_stderr() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr
    )


async def _with_stop(work: Callable[[asyncio.Event], Awaitable[int]]) -> int:
    """Run ``work`` with an event that SIGTERM and SIGINT set (finish the batch, then exit)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handled = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
    try:
        return await work(stop)
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)


def _project(args: argparse.Namespace) -> int:
    if args.timeout is not None and not args.once:
        raise ValueError("--timeout goes with --once")
    if args.lease <= 2 * HEARTBEAT:
        raise ValueError(f"--lease must be more than {2 * HEARTBEAT:g} seconds: {args.lease:g}")
    _log_to_stderr()
    url = _url(args)
    projections = _selected(args.projection)

    async def work(stop: asyncio.Event) -> int:
        timed_out = asyncio.Event()
        if args.timeout is not None:
            # --once waits for transactions that hold the log back; a job may not wait long.
            def give_up() -> None:
                timed_out.set()
                stop.set()

            asyncio.get_running_loop().call_later(args.timeout, give_up)
        # Per projection: its batch connection and its read-ahead; plus the status writes.
        pool = await open_pool(url, min_size=1, max_size=2 * len(projections) + 2)
        try:
            outcomes = await run_projections(
                pool,
                projections,
                stop=stop,
                once=args.once,
                batch_size=args.batch_size,
                poll_interval=args.poll_interval,
                standby_interval=args.standby_interval,
                lease=args.lease,
            )
        finally:
            await pool.close()
        for name, outcome in outcomes.items():
            logging.getLogger("convstore.projections").info("%s: %s", name, outcome)
        if "failed" in outcomes.values():
            return 1
        if timed_out.is_set() and "stopped" in outcomes.values():
            _err(
                f"convstore: not caught up within {args.timeout:g}s: transactions still open on"
                " the server hold the log back (see pg_stat_activity)"
            )
            return 3
        return 0

    with collecting_less_often():
        return asyncio.run(_with_stop(work))


def _status(args: argparse.Namespace) -> int:
    url = _url(args)
    projections = _selected(args.projection, REPORTED)

    async def work() -> int:
        pool = await open_pool(url, min_size=1, max_size=2)
        try:
            statuses = await projection_status(pool, projections)
        finally:
            await pool.close()
        if args.json:
            print(msgspec.json.encode(statuses).decode())
        else:
            print("\n".join(line for status in statuses for line in format_status(status)))
        # Both need an operator; a clean stop does not.
        return 1 if any(s.state in ("failed", "halted") for s in statuses) else 0

    return asyncio.run(work())


def _rebuild(args: argparse.Namespace) -> int:
    _log_to_stderr()
    url = _url(args)
    projection = get_projection(args.name)

    async def work(stop: asyncio.Event) -> int:
        pool = await open_pool(url, min_size=1, max_size=3)
        try:
            result = await rebuild(
                pool,
                projection,
                batch_size=args.batch_size,
                progress=progress_for(f"rebuild {projection.name}"),
                stop=stop,
            )
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise DatabaseUnavailable(
                f"the rebuild of {projection.name} lost its database connection"
                f" ({first_line(exc)}); run it again to resume"
            ) from exc
        except psycopg.Error as exc:
            # Whatever else PostgreSQL refused (a swap's GRANT or ALTER ... OWNER without the
            # privilege, say): the live model is as it was, and the next rebuild resumes.
            raise ProjectionError(
                f"the rebuild of {projection.name} failed ({first_line(exc)}); the live model"
                " is unchanged, and the next rebuild resumes"
            ) from exc
        finally:
            await pool.close()
        if not result.swapped:
            print(
                f"rebuild of {projection.name} interrupted after {result.events} events;"
                " run it again to resume"
            )
            return 1
        rate = result.events / result.seconds if result.seconds else 0.0
        print(
            f"rebuilt {projection.name} (version {result.version}): {result.events} events in"
            f" {result.seconds:.1f}s ({rate:.0f} events/s), swapped in at {result.checkpoint}"
        )
        return 0

    with collecting_less_often():
        return asyncio.run(_with_stop(work))


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer: {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def register(commands: Any) -> None:
    """Add ``project`` and ``projections status|rebuild`` to a ``convstore`` subparsers set.

    ``commands`` is the object ``ArgumentParser.add_subparsers`` returned; each command sets
    ``run`` to a function of the parsed arguments returning an exit code.
    """
    project = commands.add_parser(
        "project",
        help="run the projectors: catch up, then follow new events (SIGTERM ends cleanly)",
    )
    project.add_argument("--once", action="store_true", help="catch up with the log, then exit")
    project.add_argument(
        "--projection",
        action="append",
        metavar="NAME",
        help=f"run only this projection (repeatable; known: {', '.join(PROJECTIONS)})",
    )
    project.add_argument("--batch-size", type=_positive, default=1000, help="events per batch")
    project.add_argument(
        "--timeout",
        type=_seconds,
        metavar="SECONDS",
        help="with --once: give up (exit 3) if not caught up by then, which happens while"
        " transactions elsewhere on the server hold the log back",
    )
    project.add_argument(
        "--poll-interval",
        type=_seconds,
        default=0.5,
        help="seconds between polls when no notification comes (default 0.5)",
    )
    project.add_argument(
        "--standby-interval",
        type=_seconds,
        default=1.0,
        help="seconds between a standby's tries to take over (default 1)",
    )
    project.add_argument(
        "--lease",
        type=_seconds,
        default=DEFAULT_LEASE,
        metavar="SECONDS",
        help="a standby ends the leader's lock session once it has run nothing for this long:"
        f" the leader hangs (default {DEFAULT_LEASE:g}; more than {2 * HEARTBEAT:g})",
    )
    project.set_defaults(run=_project)

    projections = commands.add_parser(
        "projections", help="projection status and rebuilds"
    ).add_subparsers(dest="projections_command", required=True)
    status = projections.add_parser(
        "status",
        help="checkpoint, events behind, state and last error of each projection"
        " (exit 1 if one is failed or halted)",
    )
    status.add_argument("--projection", action="append", metavar="NAME")
    status.add_argument("--json", action="store_true", help="one JSON array")
    status.set_defaults(run=_status)
    rebuild_cmd = projections.add_parser(
        "rebuild",
        help="rebuild a read model from history while the current one serves, then swap",
    )
    rebuild_cmd.add_argument("name", help=f"the projection ({', '.join(PROJECTIONS)})")
    rebuild_cmd.add_argument("--batch-size", type=_positive, default=1000)
    rebuild_cmd.set_defaults(run=_rebuild)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m projections``: the projector commands without the rest of ``convstore``."""
    parser = argparse.ArgumentParser(prog="python -m projections")
    parser.add_argument("--database-url")
    parser.add_argument("--data-dir")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except ConvstoreError as exc:
        _err(f"convstore: {exc}")
        return 1
    except ValueError as exc:
        # bad values found after argparse (a database URL libpq cannot parse), as convstore
        _err(f"convstore: {exc}")
        return 2
    except KeyboardInterrupt:
        return 130
