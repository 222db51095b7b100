"""``python -m bench``: run the benchmarks and write bench/RESULTS.md and bench/results.json."""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import shlex
import sys
import time
from pathlib import Path

import psycopg

from eventstore.database import connect_kwargs, resolve_database_url

from . import paths as _paths  # noqa: F401  (registers every path)
from .context import (
    BenchContext,
    create_scratch_database,
    drop_scratch_database,
    lock_server,
)
from .environment import code_revision, machine_info, server_info
from .explain import CHECK_NAMES, CheckResult, run_explain_checks
from .harness import PathResult, Timing, run_path
from .registry import REGISTRY
from .report import RunResult, check_line, now, path_line, summary, write_results

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark convstore against plain PostgreSQL, as ratios measured in one run.",
    )
    parser.add_argument(
        "--database-url",
        help="server to benchmark on (default: DATABASE_URL, else the embedded PostgreSQL);"
        " the bench works in its own scratch database there",
    )
    parser.add_argument("--quick", action="store_true", help="short run (under a minute)")
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="run only this path or check (shell-style patterns allowed; repeatable)",
    )
    parser.add_argument("--list", action="store_true", help="list paths and checks, then exit")
    parser.add_argument(
        "--database-name",
        default="convstore_bench",
        help="name of the scratch database, dropped and recreated (default: %(default)s)",
    )
    parser.add_argument(
        "--keep-database", action="store_true", help="leave the scratch database after the run"
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=HERE,
        help="where RESULTS.md and results.json go (default: the bench package)",
    )
    parser.add_argument("--rounds", type=int, help="rounds per path (overrides the mode)")
    parser.add_argument("--seconds", type=float, help="seconds per round (overrides the mode)")
    parser.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 when a target is missed or an EXPLAIN check fails",
    )
    return parser.parse_args(argv)


def _selected(name: str, patterns: list[str] | None) -> bool:
    return patterns is None or any(fnmatch.fnmatchcase(name, p) for p in patterns)


async def _run(args: argparse.Namespace, url: str, command: str) -> RunResult:
    started = now()
    revision = code_revision()
    machine = machine_info()
    timing = Timing.for_mode(args.quick)
    if args.rounds or args.seconds:
        timing = Timing(
            warmup_seconds=timing.warmup_seconds,
            round_seconds=args.seconds or timing.round_seconds,
            rounds=args.rounds or timing.rounds,
            path_budget_seconds=timing.path_budget_seconds,
        )
    admin = await psycopg.AsyncConnection.connect(url, **connect_kwargs())
    ctx = BenchContext(url, quick=args.quick, admin=admin)
    try:
        server = await server_info(admin)
        print(
            f"machine: nproc={machine.nproc} cpu={machine.cpu_model!r}"
            f" memory={machine.memory_mib}MiB load={machine.load_average[0]}"
        )
        print(f"server: {server.version.split(' on ')[0]} via {server.transport}")
        print("settings: " + " ".join(f"{k}={v}" for k, v in server.settings.items()))
        if not server.durable:
            print("WARNING: fsync, synchronous_commit or full_page_writes is off on this server")
        print(
            f"mode: {'quick' if args.quick else 'full'}; db: {args.database_name};"
            f" revision: {revision}"
        )
        results: list[PathResult] = []
        for path in REGISTRY.values():
            if not _selected(path.name, args.only):
                continue
            if path.full_only and args.quick:
                print(f"  {path.name}: skipped under --quick", file=sys.stderr)
                continue
            began = time.monotonic()
            try:
                result = await run_path(ctx, path, timing)
            finally:
                await ctx.release_pools()
            print(f"  {path.name}: {time.monotonic() - began:.1f}s", file=sys.stderr)
            results.append(result)
            print(path_line(result), flush=True)
        checks: list[CheckResult] = []
        if any(_selected(name, args.only) for name in CHECK_NAMES):
            checks = [c for c in await run_explain_checks(ctx) if _selected(c.name, args.only)]
            await ctx.release_pools()
            for check in checks:
                print(check_line(check))
        print(summary(results, checks))
        size = ctx.workload.mean_sizes()
        return RunResult(
            started_at=started,
            finished_at=now(),
            mode="quick" if args.quick else "full",
            command=command,
            revision=revision,
            timing=timing,
            machine=machine,
            machine_load_after=machine_info().load_average,
            server=server,
            database=args.database_name,
            payload_bytes=size[0],
            metadata_bytes=size[1],
            paths=results,
            checks=checks,
        )
    finally:
        await ctx.release_pools()
        await admin.close()


def main(argv: list[str] | None = None) -> int:
    """Run the bench; return the process exit code."""
    args = parse_args(argv)
    if args.list:
        for path in REGISTRY.values():
            target = "" if path.target is None else f" (target {path.target:.2f})"
            full_only = " (full runs only)" if path.full_only else ""
            print(f"{path.name}{target}{full_only}: {path.description}")
        for name in CHECK_NAMES:
            print(f"{name}: EXPLAIN check")
        return 0
    known = [*REGISTRY, *CHECK_NAMES]
    for pattern in args.only or ():
        if not any(fnmatch.fnmatchcase(name, pattern) for name in known):
            print(f"bench: no path or check matches {pattern!r} (see --list)", file=sys.stderr)
            return 2
    server_url = resolve_database_url(args.database_url)
    command = "python -m bench" + "".join(" " + shlex.quote(a) for a in (argv or sys.argv[1:]))
    with lock_server(server_url, args.database_name):
        url = create_scratch_database(server_url, args.database_name)
        try:
            run = asyncio.run(_run(args, url, command))
        finally:
            if not args.keep_database:
                drop_scratch_database(server_url, args.database_name)
    md, js = write_results(run, args.output_dir)
    print(f"wrote {md} and {js}", file=sys.stderr)
    if args.strict:
        missed = any(p.met is False for p in run.paths) or any(not c.passed for c in run.checks)
        return 1 if missed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
