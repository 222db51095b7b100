"""Signed Meta webhook deliveries end to end at 32 clients, against a bare one-INSERT endpoint.

The path starts the real application (:func:`handlers.app.create_app`, default pool settings)
on a free loopback port, once per path so that the warm-up round warms it, and posts Messenger
deliveries to ``/webhooks/meta`` from 32 concurrent clients (one aiohttp session, one message
per delivery, signed with ``X-Hub-Signature-256`` by the connection's app secret). Each
client plays customers: ten messages per sender id, then a new one, so one delivery in ten
opens a conversation (as in ``ingest_c8``). Every answer must be a 200.

The reference is a bare aiohttp application (also kept for the path) on another free
loopback port whose one route reads the body and INSERTs it into a plain table (one row per
request, autocommit) on a pool of the application's size, at the same concurrency, same
bodies, same client. The figure is deliveries per second (p50 and p99 latency in the
details); the issue's goal is 0.7x.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Final, LiteralString

import aiohttp
import msgspec
from aiohttp import web

from conversations.connections import add_connection, get_connection
from conversations.errors import ConnectionNotFound
from eventstore.database import open_pool
from handlers.app import Settings, create_app
from handlers.meta import signature_header

from ..context import BenchContext, Pool
from ..registry import BenchPath, Measurement, register

__all__ = ["CONCURRENCY"]

CONCURRENCY: Final = 32
MESSAGES_PER_KEY: Final = 10
_CONNECTION: Final = "bench-webhook"
_PAGE_ID: Final = "bench-webhook-page"
_APP_SECRET: Final = "bench-webhook-app-secret"
#: The application's default pool size, for the reference's pool too.
_POOL_SIZE: Final = Settings(database_url="").pool_max_size

_REF_DDL: LiteralString = """
CREATE TABLE IF NOT EXISTS bench_ref_webhook (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    body        jsonb       NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
)
"""

_REF_INSERT: LiteralString = "INSERT INTO bench_ref_webhook (body) VALUES (%s::jsonb)"

_ENCODER = msgspec.json.Encoder()
_keys = itertools.count()
_mids = itertools.count()


async def _setup(ctx: BenchContext) -> None:
    await ctx.execute(_REF_DDL)
    pool = await ctx.pool(2)
    try:
        await get_connection(pool, _CONNECTION)
    except ConnectionNotFound:
        await add_connection(
            pool,
            _CONNECTION,
            channel="messenger",
            external_id=_PAGE_ID,
            app_secret=_APP_SECRET,
        )


def _delivery(psid: str, text: str) -> bytes:
    """A Messenger delivery of one customer message (unique mid), as Meta sends it."""
    at = int(time.time() * 1000)
    body = {
        "object": "page",
        "entry": [
            {
                "id": _PAGE_ID,
                "time": at,
                "messaging": [
                    {
                        "sender": {"id": psid},
                        "recipient": {"id": _PAGE_ID},
                        "timestamp": at,
                        "message": {"mid": f"m-{psid}-{next(_mids)}", "text": text},
                    }
                ],
            }
        ],
    }
    return _ENCODER.encode(body)


@asynccontextmanager
async def _serving(app: web.Application) -> AsyncIterator[str]:
    """Serve ``app`` on a free loopback port; yield its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def _load(ctx: BenchContext, url: str, seconds: float) -> Measurement:
    """32 clients posting signed deliveries to ``url`` for ``seconds``; deliveries/s."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)

    async def client(session: aiohttp.ClientSession) -> None:
        sent = 0
        psid = f"wpsid-{next(_keys)}"
        while time.perf_counter() < deadline:
            payload, _ = ctx.workload.item(sent)
            body = _delivery(psid, payload.text)
            headers = {
                "Content-Type": "application/json",
                "X-Hub-Signature-256": signature_header(_APP_SECRET, body),
            }
            started = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{url}: HTTP {response.status}")
            latencies.append(time.perf_counter() - started)
            sent += 1
            if sent % MESSAGES_PER_KEY == 0:
                psid = f"wpsid-{next(_keys)}"

    start = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(client(session) for _ in range(CONCURRENCY)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    details: dict[str, float] = {}
    if latencies:
        details = {
            "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1000,
            "deliveries": float(len(latencies)),
        }
    return Measurement(len(latencies) / elapsed, "deliveries/s", details)


async def webhook(ctx: BenchContext, seconds: float) -> Measurement:
    """Signed deliveries through the real application at 32 concurrent clients.

    The application is started once per path (by the warm-up round) and kept, as a webhook
    server runs for days: a fresh one per round would time its pool's connections preparing
    their statements.
    """
    base = await ctx.kept("webhook_app", lambda: _serving(create_app(Settings(ctx.url))))
    return await _load(ctx, base + "/webhooks/meta", seconds)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def _reference_app(ctx: BenchContext) -> AsyncIterator[str]:
    """Serve the bare one-INSERT endpoint on its own pool; yield its base URL."""
    pool: Pool = await open_pool(ctx.url, min_size=2, max_size=_POOL_SIZE, timeout=5.0)

    async def insert(request: web.Request) -> web.Response:
        body = await request.read()
        async with pool.connection() as conn:
            await conn.execute(_REF_INSERT, (body.decode(),))
        return web.json_response({"stored": 1})

    app = web.Application()
    app.router.add_post("/webhooks/meta", insert)
    try:
        async with _serving(app) as base:
            yield base
    finally:
        await pool.close()


async def reference_webhook(ctx: BenchContext, seconds: float) -> Measurement:
    """The same deliveries to a bare endpoint that INSERTs each body into a plain table."""
    base = await ctx.kept("webhook_reference", lambda: _reference_app(ctx))
    return await _load(ctx, base + "/webhooks/meta", seconds)


register(
    BenchPath(
        name="webhook_e2e_c32",
        description=(
            "signed Meta (Messenger) webhook deliveries through the real aiohttp app"
            " (create_app, loopback) at 32 concurrent clients, one message per delivery,"
            " 10 per sender (1 in 10 opens a conversation); p50/p99 in details"
        ),
        run=webhook,
        reference=reference_webhook,
        reference_description=(
            "bare aiohttp endpoint doing one INSERT of the body per request into a plain"
            " table (pool of the app's size), same clients and bodies"
        ),
        target=0.7,
        setup=_setup,
    )
)
