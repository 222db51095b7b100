"""Test harness: one real PostgreSQL, a migrated template database, a fresh clone per test.

The server is ``DATABASE_URL`` when set, else the embedded PostgreSQL in
``.convstore/test-pgdata`` (``CONVSTORE_TEST_DATA_DIR`` to move it). The template is migrated
once per session; each test gets its own database created from it, which is a file copy.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool

from eventstore import EventStore, migrate
from eventstore.database import embedded_url, open_pool

ROOT = Path(__file__).resolve().parent.parent
_counter = itertools.count()


def with_dbname(url: str, dbname: str) -> str:
    """The same server, another database."""
    params = conninfo_to_dict(url)
    params["dbname"] = dbname
    return make_conninfo(**params)


def admin_execute(server_url: str, statement: sql.Composable) -> None:
    """Run one statement on the server's maintenance connection (autocommit)."""
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(statement)


def create_database(server_url: str, name: str, template: str | None = None) -> str:
    """Create (replacing) database ``name``, optionally cloned from ``template``; return its URL."""
    drop_database(server_url, name)
    if template is None:
        admin_execute(server_url, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    else:
        admin_execute(
            server_url,
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)
            ),
        )
    return with_dbname(server_url, name)


def drop_database(server_url: str, name: str) -> None:
    """Drop database ``name`` if it exists, closing its sessions."""
    admin_execute(
        server_url,
        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)),
    )


@pytest.fixture(scope="session")
def server_url() -> str:
    """The URL of the PostgreSQL server the suite runs against."""
    url = os.environ.get("DATABASE_URL")
    if url:
        return url
    data_dir = Path(os.environ.get("CONVSTORE_TEST_DATA_DIR", ROOT / ".convstore" / "test-pgdata"))
    return embedded_url(data_dir, keep_running=False)


@pytest.fixture(scope="session")
def template_name(server_url: str) -> Iterator[str]:
    """A database with every migration applied, cloned by each test."""
    name = f"convstore_tpl_{os.getpid()}"
    url = create_database(server_url, name)
    migrate(url)
    yield name
    drop_database(server_url, name)


@pytest.fixture
def database_url(server_url: str, template_name: str) -> Iterator[str]:
    """A migrated database of this test's own."""
    name = f"convstore_t{os.getpid()}_{next(_counter)}"
    url = create_database(server_url, name, template=template_name)
    yield url
    drop_database(server_url, name)


@pytest.fixture
def empty_database_url(server_url: str) -> Iterator[str]:
    """An empty database of this test's own (no migrations applied)."""
    name = f"convstore_e{os.getpid()}_{next(_counter)}"
    url = create_database(server_url, name)
    yield url
    drop_database(server_url, name)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[AsyncConnectionPool[Any]]:
    """An open pool on the test's database."""
    pool = await open_pool(database_url, min_size=1, max_size=20)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def store(pool: AsyncConnectionPool[Any]) -> AsyncIterator[EventStore]:
    """An event store on the test's database."""
    store = EventStore(pool)
    try:
        yield store
    finally:
        await store.close()


API_TOKEN = "test-api-token"


@pytest.fixture
async def http(database_url: str) -> AsyncIterator[TestClient[Any, Any]]:
    """A client of the real application served on a loopback port, on the test's database."""
    from handlers.app import Settings, create_app

    app = create_app(
        Settings(database_url=database_url, api_token=API_TOKEN, widget_secret="test-widget-secret")
    )
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        yield client


async def wait_for_fence(pool: AsyncConnectionPool[Any], timeout: float = 60.0) -> None:
    """Wait until the global-log fence has passed every stored event.

    The fence is cluster-wide: a transaction in another database of the same server holds it
    back for a moment. Tests asserting what ``read_all`` returns after their writes wait first.
    """
    import asyncio

    async with asyncio.timeout(timeout):
        while True:
            async with pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT pg_snapshot_xmin(pg_current_snapshot())"
                    " > coalesce(max(transaction_id), '0'::xid8) FROM events"
                )
                row = await cur.fetchone()
            if row is not None and row[0]:
                return
            await asyncio.sleep(0.01)
