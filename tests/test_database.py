"""The pool every component opens: last in, first out, and otherwise psycopg_pool's behaviour."""

from __future__ import annotations

import asyncio

import pytest
from psycopg.pq import TransactionStatus
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


async def test_a_connection_comes_back_clean_whatever_its_block_left(database_url: str) -> None:
    pool = await open_pool(database_url, min_size=1, max_size=1)
    try:
        async with pool.connection() as conn:
            await conn.execute("CREATE TABLE pool_probe (n int)")
        # A block that raises: the connection goes back, and what it committed stays.
        with pytest.raises(ZeroDivisionError):
            async with pool.connection() as conn:
                await conn.execute("INSERT INTO pool_probe VALUES (1)")
                1 / 0  # noqa: B018
        # A block that leaves a transaction open (a bug): putconn rolls it back.
        async with pool.connection() as conn:
            await conn.execute("BEGIN")
            await conn.execute("INSERT INTO pool_probe VALUES (2)")
        # A block whose statement is cancelled mid-flight: psycopg cancels it on the server.
        with pytest.raises(TimeoutError):
            async with pool.connection() as conn:
                await asyncio.wait_for(conn.execute("SELECT pg_sleep(10)"), 0.2)
        async with pool.connection() as conn:
            assert conn.pgconn.transaction_status == TransactionStatus.IDLE
            assert conn.autocommit
            rows = await (await conn.execute("SELECT n FROM pool_probe ORDER BY n")).fetchall()
            assert rows == [(1,)]
    finally:
        await pool.close()
