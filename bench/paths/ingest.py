"""Conversation ingest: ``receive_inbound`` at 8 connections against the plain INSERT reference.

Each worker plays customers of one connection: ten messages per customer key, then a new key,
so one delivery in ten opens a conversation (a contact, a reservation and three events) and the
rest are one version-checked append to the open conversation. The reference is the append
paths' plain INSERT of one row per transaction at the same concurrency and payload size. The
issue's goal is 0.5x: a first message writes several rows where the reference writes one.
"""

from __future__ import annotations

import datetime as dt
import itertools
from typing import Any, Final

import psycopg

from conversations.connections import add_connection, get_connection
from conversations.errors import ConnectionNotFound
from conversations.events import CODEC
from conversations.service import ConversationService, InboundMessage
from eventstore import EventStore

from ..context import BenchContext
from ..registry import BenchPath, Measurement, register
from ..timing import Operation, timed_workers
from .append import reference_insert, setup_reference_table

__all__ = ["CONCURRENCY", "MESSAGES_PER_KEY"]

CONCURRENCY: Final = 8
MESSAGES_PER_KEY: Final = 10
_CONNECTION: Final = "bench-page"
_keys = itertools.count()


async def _setup(ctx: BenchContext) -> None:
    await setup_reference_table(ctx)
    pool = await ctx.pool(2)
    try:
        await get_connection(pool, _CONNECTION)
    except ConnectionNotFound:
        await add_connection(pool, _CONNECTION, channel="messenger", external_id="bench-page-1")


class _Customer:
    """One worker's stream of deliveries: ten messages for a key, then the next key."""

    def __init__(self, service: ConversationService, ctx: BenchContext) -> None:
        self.service = service
        self.ctx = ctx
        self.sent = 0
        self.key = f"psid-{next(_keys)}"
        self.base = dt.datetime.now(dt.UTC)

    async def __call__(self, conn: psycopg.AsyncConnection[Any]) -> int:
        # The service takes its own pool connections; the harness's is only its anchor.
        payload, _ = self.ctx.workload.item(self.sent)
        message = InboundMessage(
            provider_message_id=f"{self.key}-{self.sent}",
            sent_at=self.base + dt.timedelta(seconds=self.sent),
            text=payload.text,
        )
        await self.service.receive_inbound(_CONNECTION, self.key, message)
        self.sent += 1
        if self.sent % MESSAGES_PER_KEY == 0:
            self.key = f"psid-{next(_keys)}"
        return 1


async def ingest(ctx: BenchContext, seconds: float) -> Measurement:
    """``receive_inbound`` deliveries per second at 8 concurrent webhook workers."""
    # Twice the workers: each holds the harness's connection while the service takes another.
    pool = await ctx.pool(2 * CONCURRENCY + 1)
    store = EventStore(pool, CODEC)
    service = ConversationService(store)

    def make(worker: int) -> Operation:
        return _Customer(service, ctx)

    try:
        # Counted per delivery, so the unit matches the reference's one row per transaction.
        # The service takes its own pool connections, so every backend's CPU counts.
        return await timed_workers(ctx, pool, CONCURRENCY, seconds, make, probe_all_backends=True)
    finally:
        await store.close()


register(
    BenchPath(
        name="ingest_c8",
        description=(
            "ConversationService.receive_inbound at 8 connections, 10 messages per customer key"
            " (1 in 10 opens a conversation: contact, reservation, 3 events); one delivery"
            " counts as one event"
        ),
        run=ingest,
        reference=reference_insert(CONCURRENCY, 1, 10),
        reference_description=(
            "plain INSERT ... RETURNING of one row per transaction, 8 connections"
        ),
        target=0.5,
        setup=_setup,
    )
)
