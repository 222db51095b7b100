"""The ``convstore`` command line.

Every command that touches the database resolves it in one place
(:func:`eventstore.database.resolve_database_url`): ``--database-url``, else ``DATABASE_URL``,
else the embedded PostgreSQL. Long-running commands refuse to start on a schema ``db verify``
would reject, with the same one line.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from psycopg_pool import AsyncConnectionPool

from conversations.connections import add_connection, list_connections
from eventstore.database import open_pool, resolve_database_url
from eventstore.errors import ConvstoreError
from eventstore.migrations import migrate, require_current_schema, schema_status
from projections.cli import register as register_projection_commands

from .delivery import register as register_delivery_commands

__all__ = ["build_parser", "main", "run_with_pool"]

_T = TypeVar("_T")


def _err(line: str) -> None:
    print(line, file=sys.stderr)


def _url(args: argparse.Namespace) -> str:
    data_dir = Path(args.data_dir) if args.data_dir else None
    return resolve_database_url(args.database_url, data_dir=data_dir, announce=_err)


def run_with_pool(
    args: argparse.Namespace, work: Callable[[AsyncConnectionPool[Any]], Awaitable[_T]]
) -> _T:
    """Run ``work`` with a small pool on the selected database, after the schema check."""
    url = _url(args)
    require_current_schema(url)

    async def go() -> _T:
        pool = await open_pool(url, min_size=1, max_size=4)
        try:
            return await work(pool)
        finally:
            await pool.close()

    return asyncio.run(go())


def _connections_add(args: argparse.Namespace) -> int:
    connection = run_with_pool(
        args,
        lambda pool: add_connection(
            pool,
            args.name,
            channel=args.channel,
            external_id=args.external_id,
            reopen_policy=args.reopen_policy,
            app_secret=args.app_secret,
            verify_token=args.verify_token,
            secret_token=args.secret_token,
            access_token=args.access_token,
            bot_token=args.bot_token,
        ),
    )
    print(
        f"added connection {connection.name} ({connection.channel} {connection.external_id},"
        f" reopen policy {connection.policy_text})"
    )
    return 0


def _connections_list(args: argparse.Namespace) -> int:
    connections = run_with_pool(args, list_connections)
    print(f"{'NAME':<24} {'CHANNEL':<10} {'EXTERNAL ID':<24} {'REOPEN POLICY':<20} SECRETS")
    for c in connections:
        secrets = ",".join(
            name
            for name, value in (
                ("app_secret", c.app_secret),
                ("verify_token", c.verify_token),
                ("secret_token", c.secret_token),
                ("access_token", c.access_token),
                ("bot_token", c.bot_token),
            )
            if value
        )
        print(
            f"{c.name:<24} {c.channel:<10} {c.external_id:<24} {c.policy_text:<20} {secrets or '-'}"
        )
    return 0


def _serve(args: argparse.Namespace) -> int:
    import logging

    from aiohttp import web

    from .app import Settings, create_app

    url = _url(args)
    require_current_schema(url)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = Settings.from_env(url)
    if settings.api_token is None:
        _err("convstore: CONVSTORE_API_TOKEN is not set: the agent API will answer 401")
    # No aiohttp access log: its request line carries the query string, and Meta's handshake
    # puts the verify token there. The app logs one line per request without it (_observe).
    web.run_app(create_app(settings), host=args.host, port=args.port, print=_err, access_log=None)
    return 0


def _replay(args: argparse.Namespace) -> int:
    from .export import run_export

    url = _url(args)
    require_current_schema(url)
    return run_export(args, url)


def _inbox(args: argparse.Namespace) -> int:
    import msgspec

    from projections.timetravel import inbox_as_of

    from .export import parse_time

    as_of = parse_time(args.as_of) if args.as_of else None
    statuses = args.status.split(",") if "," in args.status else args.status
    rows = run_with_pool(
        args,
        lambda pool: inbox_as_of(pool, args.connection, as_of=as_of, status=statuses),
    )
    if args.json:
        sys.stdout.buffer.write(msgspec.json.encode(rows) + b"\n")
        return 0
    when = f" as of {as_of.isoformat()}" if as_of else ""
    print(f"inbox of {args.connection} ({args.status}){when}: {len(rows)} conversations")
    print(
        f"{'CONVERSATION':<36}  {'CUSTOMER':<22} {'STATUS':<8} {'LAST ACTIVITY':<19} "
        f"{'MSGS':>4} {'UNREAD':>6}  LAST MESSAGE"
    )
    for c in rows:
        arrow = "<-" if c.last_message_direction == "in" else "->"
        preview = (c.last_message_preview or "").replace("\n", " ")[:40]
        print(
            f"{c.conversation_id!s:<36}  {c.psid[:22]:<22} {c.status:<8} "
            f"{c.last_activity_at:%Y-%m-%d %H:%M:%S} {c.message_count:>4} {c.unread_count:>6}"
            f"  {arrow} {preview}"
        )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    url = _url(args)
    for migration in migrate(url):
        print(f"applied {migration.label}")
    return demo_main(url, args.customers, args.messages, args.seed)


def _db_stop(args: argparse.Namespace) -> int:
    from eventstore.database import stop_embedded

    data_dir = Path(args.data_dir) if args.data_dir else None
    if stop_embedded(data_dir):
        print("stopped the embedded PostgreSQL")
    else:
        print("the embedded PostgreSQL is not running")
    return 0


def _db_migrate(args: argparse.Namespace) -> int:
    applied = migrate(_url(args))
    if applied:
        for migration in applied:
            print(f"applied {migration.label}")
    else:
        print("nothing to apply: the schema is current")
    return 0


def _db_verify(args: argparse.Namespace) -> int:
    status = schema_status(_url(args))
    if status.problem is not None:
        _err(status.problem.line)
        return 1
    last = status.applied[-1].label if status.applied else "none"
    print(f"schema is current (at {last})")
    return 0


def _db_status(args: argparse.Namespace) -> int:
    status = schema_status(_url(args))
    for row in status.applied:
        print(f"applied  {row.label}  {row.applied_at:%Y-%m-%d %H:%M:%S%z}  {row.checksum[:12]}")
    for migration in status.pending:
        print(f"pending  {migration.label}")
    if status.problem is not None:
        print(status.problem.line)
    else:
        print("schema is current")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every ``convstore`` command."""
    parser = argparse.ArgumentParser(
        prog="convstore", description="An event-sourced conversation store on PostgreSQL."
    )
    parser.add_argument(
        "--database-url",
        help="PostgreSQL URL (default: $DATABASE_URL, else the embedded PostgreSQL)",
    )
    parser.add_argument(
        "--data-dir",
        help="data folder of the embedded PostgreSQL (default: $CONVSTORE_DATA_DIR "
        "or .convstore/pgdata)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    db = commands.add_parser("db", help="schema migrations").add_subparsers(
        dest="db_command", required=True
    )
    db.add_parser("migrate", help="apply pending migrations").set_defaults(run=_db_migrate)
    db.add_parser("verify", help="exit 1 unless the schema is current").set_defaults(run=_db_verify)
    db.add_parser("status", help="list applied and pending migrations").set_defaults(run=_db_status)
    db.add_parser(
        "stop", help="stop the embedded PostgreSQL (it otherwise keeps running between commands)"
    ).set_defaults(run=_db_stop)

    demo = commands.add_parser(
        "demo", help="run realistic traffic through the real endpoints and check the results"
    )
    demo.add_argument("--customers", type=int, default=320, help="customers to simulate")
    demo.add_argument("--messages", type=int, default=8, help="messages per customer, about")
    demo.add_argument("--seed", type=int, help="random seed, for a repeatable run")
    demo.set_defaults(run=_demo)

    serve = commands.add_parser("serve", help="run the HTTP server (webhooks, widget, agent API)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.set_defaults(run=_serve)

    replay = commands.add_parser(
        "replay", help="export a slice of the global log as JSON Lines or CSV, in log order"
    )
    replay.add_argument("--after", help="start after this checkpoint (TXID:POSITION)")
    replay.add_argument("--after-position", type=int, help="start after the event at POSITION")
    replay.add_argument("--since", help="recorded at or after this ISO 8601 time (UTC default)")
    replay.add_argument("--until", help="recorded before this ISO 8601 time")
    replay.add_argument("--stream", action="append", help="only this stream (repeatable)")
    replay.add_argument("--category", action="append", help="only this category (repeatable)")
    replay.add_argument("--type", action="append", help="only this event type (repeatable)")
    replay.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    replay.add_argument("--out", help="write to FILE instead of standard output")
    replay.set_defaults(run=_replay)

    inbox = commands.add_parser(
        "inbox", help="a connection's inbox, live or as it stood at a past moment"
    )
    inbox.add_argument("--connection", required=True, help="the connection's name")
    inbox.add_argument(
        "--status", default="open", help="open, snoozed, closed, all, or a comma list"
    )
    inbox.add_argument("--as-of", help="an ISO 8601 time: rebuild the inbox as it stood then")
    inbox.add_argument("--json", action="store_true", help="JSON instead of a table")
    inbox.set_defaults(run=_inbox)

    connections = commands.add_parser("connections", help="channel connections").add_subparsers(
        dest="connections_command", required=True
    )
    add = connections.add_parser("add", help="register a connection")
    add.add_argument("name", help="the name URLs and commands use for this connection")
    add.add_argument(
        "--channel", required=True, choices=["messenger", "instagram", "telegram", "widget"]
    )
    add.add_argument(
        "--external-id", required=True, help="the page, account, bot or widget id at the provider"
    )
    add.add_argument("--app-secret", help="Meta app secret (X-Hub-Signature-256)")
    add.add_argument("--verify-token", help="Meta webhook verify token (hub.verify_token)")
    add.add_argument("--secret-token", help="Telegram X-Telegram-Bot-Api-Secret-Token")
    add.add_argument("--access-token", help="Meta page access token, for replies")
    add.add_argument("--bot-token", help="Telegram bot token, for replies")
    add.add_argument(
        "--reopen-policy",
        default="new",
        help="new (default), reopen-last, or reopen-within=DURATION (e.g. 7d)",
    )
    add.set_defaults(run=_connections_add)
    connections.add_parser("list", help="list connections (secrets are not shown)").set_defaults(
        run=_connections_list
    )
    register_projection_commands(commands)
    register_delivery_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``convstore`` command and return its exit code."""
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except ConvstoreError as exc:
        _err(f"convstore: {exc}")
        return 1
    except ValueError as exc:
        # bad command-line values (a checkpoint, a time) found after argparse
        _err(f"convstore: {exc}")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
