"""The pool every component opens: last in, first out, and otherwise psycopg_pool's behaviour."""

from __future__ import annotations

import asyncio

import pytest
from psycopg_pool import TooManyRequests

from eventstore.database import LifoConnectionPool, connect_kwargs, open_pool


async def test_the_connection_returned_last_is_handed_out_first(database_url: str) -> None:
    pool = await open_pool(database_url, min_size=3, max_size=3)
    try:
        assert isinstance(pool, LifoConnectionPool)
        first, second, third = [await pool.getconn() for _ in range(3)]
        pids = [c.info.backend_pid for c in (first, second, third)]
        for conn in (first, second, third):
            await pool.putconn(conn)
        # psycopg_pool's own order would give the first one back (FIFO).
        again = [await pool.getconn() for _ in range(3)]
        assert [c.info.backend_pid for c in again] == pids[::-1]
        last = again[-1].info.backend_pid
        for conn in again:
            await pool.putconn(conn)
        # One at a time, the same backend serves every statement.
        served = set()
        for _ in range(5):
            async with pool.connection() as conn:
                row = await (await conn.execute("SELECT pg_backend_pid()")).fetchone()
                assert row is not None
                served.add(row[0])
        assert served == {last}
    finally:
        await pool.close()


async def test_a_waiting_client_gets_the_connection_put_back(database_url: str) -> None:
    pool = await open_pool(database_url, min_size=1, max_size=1)
    try:
        held = await pool.getconn()
        waiter = asyncio.create_task(pool.getconn(timeout=10))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        await pool.putconn(held)
        given = await asyncio.wait_for(waiter, 10)
        assert given is held
        await pool.putconn(given)
    finally:
        await pool.close()


async def test_too_many_waiting_clients_are_refused(database_url: str) -> None:
    pool = LifoConnectionPool(
        database_url, min_size=1, max_size=1, max_waiting=1, kwargs=connect_kwargs(), open=False
    )
    await pool.open(wait=True)
    try:
        held = await pool.getconn()
        waiter = asyncio.create_task(pool.getconn(timeout=10))
        await asyncio.sleep(0.05)
        with pytest.raises(TooManyRequests):
            await pool.getconn(timeout=1)
        await pool.putconn(held)
        await pool.putconn(await asyncio.wait_for(waiter, 10))
    finally:
        await pool.close()
