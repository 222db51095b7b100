"""Concurrent deliveries share one statement: the first step of ``receive_inbound``, batched.

On a small machine a delivery's cost is mostly per statement, not per row: the round trip,
the executor's start-up, the commit and its WAL flush. A webhook server under load has many
deliveries waiting at once, so :class:`InboundBatcher` sends every delivery that arrived while
the previous statements ran as one statement (natural batching: a delivery that finds a free
slot goes at once, alone, so a quiet server adds no latency). Each caller still waits for its
own row, and gets it only after the statement committed.

The statement is ``receive_inbound``'s first step for each delivery: read the key (its
connection, current conversation, stream version, contact, and whether the message is already
stored) and, when the conversation is open, move its stream one version on and insert the
message. Two deliveries for the same stream in one batch cannot both move it (an UPDATE moves a
row once per statement): the one that did not comes back "not appended" and its caller takes
the general path, as after any lost race. When the statement fails as a whole (a unique
violation raised by one delivery), every caller is told so with :class:`BatchFailed` and runs
its delivery alone, so an error reaches only the delivery that caused it.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final, NamedTuple

from psycopg_pool import AsyncConnectionPool

__all__ = ["RECEIVE_MANY", "BatchFailed", "InboundBatcher", "InboundRow"]

#: One row per delivery that names a registered connection: its index in the batch, whether it
#: was appended, then the key as read (``conversations.service._Found``'s columns). The
#: statement itself is ``receive_inbound_batch`` in ``sql/0005_receive_inbound_batch.sql``.
RECEIVE_MANY: Final = """
SELECT * FROM receive_inbound_batch(
    %(connections)b::text[], %(psids)b::text[], %(event_ids)b::uuid[],
    %(data)b::text[], %(providers)b::text[], %(metadata)b::text[])
"""


class InboundRow(NamedTuple):
    """One delivery of a batch: the statement's parameters for it."""

    connection: str
    psid: str
    event_id: Any  # uuid.UUID
    data: str
    provider: str | None
    metadata: str


class BatchFailed(Exception):
    """The batch's statement failed as a whole; run this delivery alone."""


def params_of(rows: list[InboundRow]) -> dict[str, list[Any]]:
    """The statement's array parameters for ``rows``."""
    return {
        "connections": [r.connection for r in rows],
        "psids": [r.psid for r in rows],
        "event_ids": [r.event_id for r in rows],
        "data": [r.data for r in rows],
        "providers": [r.provider for r in rows],
        "metadata": [r.metadata for r in rows],
    }


async def receive_many(
    pool: AsyncConnectionPool[Any], rows: list[InboundRow]
) -> list[tuple[Any, ...] | None]:
    """Run :data:`RECEIVE_MANY` for ``rows``; per row its result (without ``ord``) or ``None``.

    ``None`` means the row's connection is not registered.
    """
    async with pool.connection() as conn:
        cur = await conn.execute(RECEIVE_MANY, params_of(rows))
        results: list[tuple[Any, ...] | None] = [None] * len(rows)
        for row in await cur.fetchall():
            results[row[0] - 1] = tuple(row[1:])
    return results


class InboundBatcher:
    """Runs :data:`RECEIVE_MANY` for concurrent callers, at most ``max_in_flight`` at a time.

    A call that finds a free slot starts a statement at once with whatever is waiting (itself,
    at least); otherwise it waits for the next free slot with everyone who came meanwhile.
    """

    def __init__(
        self, pool: AsyncConnectionPool[Any], *, max_in_flight: int = 2, max_batch: int = 200
    ) -> None:
        self.pool = pool
        self.max_in_flight = max_in_flight
        self.max_batch = max_batch
        self._waiting: list[tuple[InboundRow, asyncio.Future[tuple[Any, ...] | None]]] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        #: statements run and deliveries they carried (their ratio is the batching achieved)
        self.statements = 0
        self.deliveries = 0

    async def receive(self, row: InboundRow) -> tuple[Any, ...] | None:
        """The delivery's result row, once its statement committed; raise :class:`BatchFailed`."""
        future: asyncio.Future[tuple[Any, ...] | None] = asyncio.get_running_loop().create_future()
        self._waiting.append((row, future))
        self._start()
        return await future

    def _start(self) -> None:
        while self._waiting and self._in_flight < self.max_in_flight:
            batch = self._waiting[: self.max_batch]
            del self._waiting[: self.max_batch]
            self._in_flight += 1
            self.statements += 1
            self.deliveries += len(batch)
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(
        self, batch: list[tuple[InboundRow, asyncio.Future[tuple[Any, ...] | None]]]
    ) -> None:
        try:
            results = await receive_many(self.pool, [row for row, _ in batch])
        except BaseException as exc:
            # Whatever failed, each caller learns it and runs its own delivery alone, where
            # its error (if it is its own) reaches only it. The cause is kept for debugging.
            for _, future in batch:
                if not future.done():
                    failed = BatchFailed(f"a batch of {len(batch)} deliveries failed")
                    failed.__cause__ = exc
                    future.set_exception(failed)
            if not isinstance(exc, Exception):
                raise
        else:
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():  # a cancelled caller no longer waits
                    future.set_result(result)
        finally:
            self._in_flight -= 1
            self._start()
