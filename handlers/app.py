"""The aiohttp application: resources in ``web.AppKey``s, one middleware for errors and logs.

Every route answers JSON. A webhook answers 200 only after its events are committed; when
PostgreSQL is unreachable every route answers 503 with ``Retry-After`` so providers retry.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from aiohttp import web
from psycopg_pool import AsyncConnectionPool

from conversations.connections import ConnectionCache
from conversations.events import CODEC
from conversations.service import ConversationService
from eventstore import EventStore, check_schema
from eventstore.database import open_pool
from eventstore.errors import ConvstoreError, SchemaMismatch

from .errors import HTTPError, error_response, response_for
from .metrics import Metrics

__all__ = [
    "CONNECTIONS",
    "METRICS",
    "POOL",
    "SERVICE",
    "SETTINGS",
    "STORE",
    "Settings",
    "create_app",
    "decode_json",
    "json_response",
]

log = logging.getLogger("convstore.http")

MAX_BODY = 1024 * 1024
_T = TypeVar("_T")
_ENCODER = msgspec.json.Encoder()


class Settings(msgspec.Struct, frozen=True):
    """What the application needs to run; secrets are kept out of ``repr``."""

    database_url: str
    api_token: str | None = None
    widget_secret: str | None = None
    pool_min_size: int = 2
    pool_max_size: int = 16

    def __repr__(self) -> str:
        return f"Settings(pool_max_size={self.pool_max_size})"

    @classmethod
    def from_env(cls, database_url: str) -> Settings:
        """Settings from ``CONVSTORE_API_TOKEN``, ``CONVSTORE_WIDGET_SECRET``, pool sizes."""
        return cls(
            database_url=database_url,
            api_token=os.environ.get("CONVSTORE_API_TOKEN") or None,
            widget_secret=os.environ.get("CONVSTORE_WIDGET_SECRET") or None,
            pool_max_size=int(os.environ.get("CONVSTORE_POOL_SIZE", "16")),
        )


SETTINGS = web.AppKey("settings", Settings)
POOL = web.AppKey("pool", AsyncConnectionPool)
STORE = web.AppKey("store", EventStore)
SERVICE = web.AppKey("service", ConversationService)
CONNECTIONS = web.AppKey("connections", ConnectionCache)
METRICS = web.AppKey("metrics", Metrics)
WIDGET_KEY = web.AppKey("widget_key", bytes)


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON response encoded by msgspec (Structs, UUIDs and datetimes included)."""
    return web.Response(
        status=status,
        body=_ENCODER.encode(body),
        content_type="application/json",
        headers=headers,
    )


async def decode_json(request: web.Request, type_: type[_T]) -> _T:
    """The request body decoded into ``type_``: 415 unless JSON, 413 over 1 MiB, 400 if bad."""
    if request.content_type != "application/json":
        raise HTTPError(415, "unsupported_media_type", "send the body as application/json")
    raw = await request.read()
    try:
        return msgspec.json.decode(raw, type=type_)
    except RecursionError:
        # msgspec raises these, not DecodeError, for nesting deeper than the stack allows and
        # for invalid UTF-8 inside a string: bad input, not a server error
        raise HTTPError(400, "malformed_json", "the body is nested too deeply") from None
    except UnicodeDecodeError:
        raise HTTPError(400, "malformed_json", "the body is not valid UTF-8") from None


def _route_name(request: web.Request) -> str:
    route = request.match_info.route
    resource = route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def _observe(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Map errors to responses, count the request, and log one line (no secrets, no text)."""
    started = time.perf_counter()
    request_id = request.headers.get("X-Request-Id", "")[:64] or uuid.uuid4().hex
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if isinstance(exc, web.HTTPRequestEntityTooLarge):
            response = response_for(exc) or exc
        elif exc.status >= 400:
            code = exc.reason.lower().replace(" ", "_")
            response = error_response(exc.status, code, exc.reason)
        else:
            response = exc
    except web.RequestPayloadError:
        # The body could not be read as sent: a Content-Encoding it does not have (gzip over
        # plain JSON), or a transfer cut short. The client's fault, like a malformed body.
        response = error_response(
            400, "malformed_body", "the body could not be read (check its Content-Encoding)"
        )
    except (ConvstoreError, HTTPError, msgspec.MsgspecError) as exc:
        mapped = response_for(exc)
        if mapped is None:
            log.exception("unmapped error", extra={"request_id": request_id})
            mapped = error_response(500, "internal", "internal error")
        response = mapped
    except Exception:
        log.exception("unhandled error", extra={"request_id": request_id})
        response = error_response(500, "internal", "internal error")
    route = _route_name(request)
    request.app[METRICS].requests.labels(route, request.method, str(response.status)).inc()
    response.headers["X-Request-Id"] = request_id
    millis = (time.perf_counter() - started) * 1000
    log.info(
        "request_id=%s method=%s route=%s status=%d ms=%.1f",
        request_id,
        request.method,
        route,
        response.status,
        millis,
    )
    return response


async def _database(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    pool = await open_pool(
        settings.database_url,
        min_size=settings.pool_min_size,
        max_size=settings.pool_max_size,
        timeout=5.0,
    )
    store = EventStore(pool, CODEC)
    app[POOL] = pool
    app[STORE] = store
    app[SERVICE] = ConversationService(store)
    app[CONNECTIONS] = ConnectionCache(pool)
    app[WIDGET_KEY] = (
        settings.widget_secret.encode() if settings.widget_secret else await _shared_key(pool)
    )
    try:
        yield
    finally:
        await store.close()
        await pool.close()


async def _shared_key(pool: AsyncConnectionPool[Any], name: str = "widget") -> bytes:
    """The deployment's key ``name`` (sql/0010): made by the first server, read by the rest."""
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO server_keys (name, key) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
            (name, secrets.token_bytes(32)),
        )
        cur = await conn.execute("SELECT key FROM server_keys WHERE name = %s", (name,))
        row = await cur.fetchone()
    assert row is not None  # inserted above, and never deleted
    return bytes(row[0])


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: the database answers and its schema is exactly what this code needs."""
    url = request.app[SETTINGS].database_url
    try:
        import asyncio

        await asyncio.to_thread(check_schema, url)
    except SchemaMismatch as exc:
        return error_response(503, "schema_mismatch", exc.line, headers={"Retry-After": "5"})
    except ConvstoreError:
        return error_response(
            503, "unavailable", "the database is unavailable", headers={"Retry-After": "5"}
        )
    return json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format."""
    app = request.app
    m = app[METRICS]
    stats = app[SERVICE].stats
    m.conflicts_retried.set(stats.conflicts_retried)
    m.duplicates_dropped.set(stats.duplicates_dropped)
    batcher = app[SERVICE].batcher
    m.inbound_statements.set(batcher.statements)
    m.inbound_deliveries.set(batcher.deliveries)
    await m.delivery.refresh(app[POOL])
    return web.Response(body=m.render(), content_type="text/plain", charset="utf-8")


def require_api_token(request: web.Request) -> None:
    """401 unless the request carries ``Authorization: Bearer <CONVSTORE_API_TOKEN>``."""
    expected = request.app[SETTINGS].api_token
    given = request.headers.get("Authorization", "")
    scheme, _, token = given.partition(" ")
    if (
        expected is None
        or scheme.lower() != "bearer"
        # bytes that are not UTF-8 arrive as lone surrogates: keep them as the bytes they were
        or not hmac.compare_digest(
            token.strip().encode("utf-8", "surrogateescape"), expected.encode()
        )
    ):
        raise HTTPError(401, "unauthorized", "send Authorization: Bearer <CONVSTORE_API_TOKEN>")


def create_app(settings: Settings) -> web.Application:
    """The application with every route; the pool opens on start-up and closes on clean-up."""
    from . import agent, meta, openapi, telegram, widget

    app = web.Application(middlewares=[_observe], client_max_size=MAX_BODY)
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app.cleanup_ctx.append(_database)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    widget.add_routes(app)
    agent.add_routes(app)
    meta.add_routes(app)
    telegram.add_routes(app)
    openapi.add_routes(app)
    return app
