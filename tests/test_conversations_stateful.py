"""Hypothesis: random interleavings of conversation commands keep invariants 1 and 3.

A rule-based state machine drives inbound messages (sometimes several at once, racing a close),
closes, reopens, snoozes and soft deletes over a few customer keys, and after every step checks
against the database: at most one open conversation per key, and every accepted message stored
in exactly one conversation.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from psycopg_pool import AsyncConnectionPool

from conversations.connections import add_connection
from conversations.errors import InvalidTransition
from conversations.events import CODEC
from conversations.service import ConversationService, InboundMessage
from eventstore import EventStore
from eventstore.database import open_pool

_T = TypeVar("_T")
KEYS = ("k0", "k1", "k2")
CONNECTIONS = ("fb", "fb-last")
BASE = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)


class _Env:
    """One event loop and one pool for every example of the test."""

    def __init__(self, url: str) -> None:
        self.runner = asyncio.Runner()
        self.pool: AsyncConnectionPool[Any] = self.run(open_pool(url, max_size=12))
        self.service = ConversationService(EventStore(self.pool, CODEC))
        for name, policy in (("fb", "new"), ("fb-last", "reopen-last")):
            self.run(
                add_connection(
                    self.pool, name, channel="messenger", external_id=name, reopen_policy=policy
                )
            )

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return self.runner.run(coro)

    def close(self) -> None:
        self.run(self.pool.close())
        self.runner.close()


def test_random_interleavings_keep_identity_invariants(database_url: str) -> None:
    env = _Env(database_url)
    counter = itertools.count()

    class ConversationMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            # Fresh keys per example: examples share the database but never a key.
            self.prefix = uuid.uuid4().hex[:8]
            self.accepted: set[uuid.UUID] = set()

        def key(self, k: str) -> str:
            return f"{self.prefix}-{k}"

        def current(self, connection: str, k: str) -> uuid.UUID | None:
            async def q() -> uuid.UUID | None:
                async with env.pool.connection() as conn:
                    row = await (
                        await conn.execute(
                            "SELECT conversation_id FROM stream_reservations"
                            " WHERE connection = %s AND psid = %s",
                            (connection, self.key(k)),
                        )
                    ).fetchone()
                return row[0] if row else None

            return env.run(q())

        def deliver(self, connection: str, k: str, n: int, close_too: bool) -> None:
            ids = [f"m{next(counter)}" for _ in range(n)]
            target = self.current(connection, k) if close_too else None

            async def go() -> list[Any]:
                calls: list[Any] = [
                    env.service.receive_inbound(
                        connection,
                        self.key(k),
                        InboundMessage(provider_message_id=i, sent_at=BASE, text=i),
                    )
                    for i in ids
                ]
                if target is not None:
                    calls.append(env.service.close(target, by="agent"))
                return await asyncio.gather(*calls, return_exceptions=True)

            results = env.run(go())
            for result in results[: len(ids)]:
                assert not isinstance(result, BaseException), result
                self.accepted.add(result.message_id)
            for result in results[len(ids) :]:
                # the close may find the conversation already closed: a clear refusal, no loss
                assert not isinstance(result, BaseException) or isinstance(
                    result, InvalidTransition
                ), result

        @rule(
            connection=st.sampled_from(CONNECTIONS),
            k=st.sampled_from(KEYS),
            n=st.integers(1, 4),
            close_too=st.booleans(),
        )
        def inbound(self, connection: str, k: str, n: int, close_too: bool) -> None:
            self.deliver(connection, k, n, close_too)

        @rule(connection=st.sampled_from(CONNECTIONS), k=st.sampled_from(KEYS))
        def redeliver_last(self, connection: str, k: str) -> None:
            # A provider retry of an already stored message must change nothing.
            if not self.accepted:
                return
            mid = f"m{next(counter) - 1}"
            env.run(
                env.service.receive_inbound(
                    connection,
                    self.key(k),
                    InboundMessage(provider_message_id=mid, sent_at=BASE, text=mid),
                )
            )

        @rule(
            connection=st.sampled_from(CONNECTIONS),
            k=st.sampled_from(KEYS),
            command=st.sampled_from(["close", "reopen", "snooze", "unsnooze", "delete"]),
        )
        def command(self, connection: str, k: str, command: str) -> None:
            target = self.current(connection, k)
            if target is None:
                return
            try:
                env.run(getattr(env.service, command)(target, by="agent"))
            except InvalidTransition:
                pass  # refused in this state: fine, as long as nothing changed

        @invariant()
        def at_most_one_open_per_key(self) -> None:
            async def q() -> list[Any]:
                async with env.pool.connection() as conn:
                    return await (
                        await conn.execute(
                            "SELECT connection, psid, count(*) FROM conversations"
                            " WHERE status <> 'closed' GROUP BY 1, 2 HAVING count(*) > 1"
                        )
                    ).fetchall()

            assert env.run(q()) == []

        @invariant()
        def every_accepted_message_in_exactly_one_conversation(self) -> None:
            async def q() -> list[Any]:
                async with env.pool.connection() as conn:
                    return await (
                        await conn.execute(
                            "SELECT event_id, count(*), min(stream_id) FROM events"
                            " WHERE event_id = ANY(%s) GROUP BY 1",
                            (list(self.accepted),),
                        )
                    ).fetchall()

            rows = env.run(q())
            assert len(rows) == len(self.accepted)
            assert all(count == 1 and s.startswith("conversation-") for _, count, s in rows)

    try:
        run_state_machine_as_test(
            ConversationMachine,
            settings=settings(
                max_examples=25,
                stateful_step_count=15,
                deadline=None,
                derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
            ),
        )
    finally:
        env.close()
