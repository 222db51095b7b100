"""The delivery daemon SIGKILLed again and again while 1,000 replies are queued and sent.

The daemon runs as a real ``convstore deliver`` process against a fake provider on loopback
(healthy, answering after a few milliseconds so kills land between a send and its record) and
is killed with SIGKILL at random moments, then restarted, while replies keep being queued.
Meta sends are echoed back to the real webhook, as Meta does. At the end:

- every reply ended delivered (or confirmed) or failed: none lost;
- the provider received no reply more than twice (counted at the provider);
- no echo became a message: every echo of ours confirmed its reply;
- the inbox shows each reply once, delivered or failed, and each conversation's failed marker
  and last status agree with its messages;
- the daemons' queue and totals, built by processes killed mid-batch, equal a fresh build.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import os
import random
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient
from psycopg_pool import AsyncConnectionPool

from conversations.connections import add_connection
from conversations.delivery import echo_metadata
from conversations.events import CODEC
from conversations.service import ConversationService, InboundMessage
from eventstore import EventStore
from handlers.delivery import DELIVERY
from handlers.fakeprovider import FakeProvider
from projections import PROJECTIONS, build_into, catch_up, compare_read_models

ROOT = Path(__file__).resolve().parent.parent
REPLIES = 1000
PAGE_TOKEN = "page-token"
BOT_TOKEN = "42:bot-token"
APP_SECRET = "app-secret"

_SETTLED = """
SELECT count(*) FILTER (WHERE d.kind IS NOT NULL), count(*) FILTER (WHERE d.kind = 'ReplyFailed'),
       count(*)
FROM events s
LEFT JOIN LATERAL (
    SELECT min(t.type) AS kind FROM events t
    WHERE t.stream_id = s.stream_id AND t.stream_version > s.stream_version
      AND t.type IN ('ReplyDelivered', 'ReplyConfirmed', 'ReplyFailed')
      AND t.data ->> 'message_id' = s.event_id::text
) AS d ON true
WHERE s.type = 'MessageSent' AND s.data ->> 'source' = 'agent'
"""


def _start(database_url: str, provider: FakeProvider, log: Any) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "CONVSTORE_GRAPH_API_URL": provider.graph_url,
        "CONVSTORE_TELEGRAM_API_URL": provider.telegram_url,
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "handlers.cli",
            "--database-url",
            database_url,
            "deliver",
            "--timeout",
            "1",
            "--in-doubt-after",
            "1.5",
            "--base-delay",
            "0.05",
            "--max-delay",
            "0.2",
            "--poll-interval",
            "0.05",
            "--standby-interval",
            "0.1",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=log,
    )


async def test_sigkilled_daemon_loses_nothing_and_sends_nothing_three_times(
    database_url: str,
    pool: AsyncConnectionPool[Any],
    http: TestClient[Any, Any],
    tmp_path: Path,
) -> None:
    rng = random.Random(11)
    await add_connection(
        pool,
        "fb",
        channel="messenger",
        external_id="page-1",
        app_secret=APP_SECRET,
        access_token=PAGE_TOKEN,
    )
    await add_connection(pool, "tg", channel="telegram", external_id="bot", bot_token=BOT_TOKEN)
    await add_connection(pool, "site", channel="widget", external_id="w")
    store = EventStore(pool, CODEC)
    service = ConversationService(store)
    now = dt.datetime.now(dt.UTC)
    conversations: list[uuid.UUID] = []
    for n in range(100):
        if n < 50:
            key = ("fb", f"psid-{n}")
        elif n < 80:
            key = ("tg", str(1000 + n))
        else:
            key = ("site", (await service.guest_sign_up("site")).guest_id)
        result = await service.receive_inbound(*key, InboundMessage(f"in-{n}", now, "help"))
        conversations.append(result.conversation_id)

    replies: list[tuple[uuid.UUID, str]] = []  # (message id, text)

    async def queue_replies() -> None:
        for i in range(REPLIES):
            cid = conversations[i % len(conversations)]
            text = f"reply {i} to {cid}"
            result = await service.reply(cid, by="agent", text=text, idempotency_key=str(i))
            replies.append((result.event_ids[0], text))
            if i % 25 == 24:
                await asyncio.sleep(0.05)

    log_path = tmp_path / "deliver.log"
    kills = 0
    async with FakeProvider(
        page_tokens={PAGE_TOKEN: ("page-1", APP_SECRET)},
        bot_tokens={BOT_TOKEN},
        echo_to=str(http.make_url("/webhooks/meta")),
        latency=0.02,
    ) as provider:
        with log_path.open("ab") as log:
            producer = asyncio.create_task(queue_replies())
            try:
                # Kill at random moments while replies are queued and sent, at least 8 times.
                while kills < 8 or not producer.done():
                    process = _start(database_url, provider, log)
                    await asyncio.sleep(rng.uniform(0.6, 1.6))
                    process.send_signal(signal.SIGKILL)
                    await asyncio.to_thread(process.wait)
                    kills += 1
                await producer
                # Then one that is left alone until every reply is settled.
                process = _start(database_url, provider, log)
                try:
                    async with asyncio.timeout(120):
                        while True:
                            async with pool.connection() as conn:
                                row = await (await conn.execute(_SETTLED)).fetchone()
                            assert row is not None
                            if row[0] == row[2] == REPLIES:
                                break
                            await asyncio.sleep(0.2)
                    # Echoes still on their way must find their replies settled.
                    async with asyncio.timeout(30):
                        while provider._tasks:
                            await asyncio.sleep(0.05)
                finally:
                    process.send_signal(signal.SIGTERM)
                    await asyncio.to_thread(process.wait)
            finally:
                if not producer.done():
                    producer.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await producer

    settled, failed, total = row
    # Every reply ended delivered or failed: none lost.
    assert settled == total == len(replies) == REPLIES
    # No reply was sent more than twice (counted at the provider).
    sends = provider.sends()
    per_reply = collections.Counter(
        {mid: sends[echo_metadata(mid)] + sends[text] for mid, text in replies}
    )
    assert max(per_reply.values()) <= 2, per_reply.most_common(3)
    assert sum(sends.values()) == sum(per_reply.values())  # every send was one of these replies
    meta = {mid for mid, text in replies if sends[echo_metadata(mid)]}
    resent = collections.Counter(
        "messenger" if mid in meta else "telegram" for mid, n in per_reply.items() if n == 2
    )

    async with pool.connection() as conn:
        echo_messages, confirmations, attempts, in_doubt = await (
            await conn.execute(
                "SELECT count(*) FILTER (WHERE type = 'MessageSent'"
                "                        AND data ->> 'source' = 'echo'),"
                " count(*) FILTER (WHERE type = 'ReplyConfirmed'),"
                " count(*) FILTER (WHERE type = 'ReplyAttempted'),"
                " count(*) FILTER (WHERE type = 'ReplyFailed'"
                "                  AND data ->> 'reason' = 'uncertain')"
                " FROM events"
            )
        ).fetchone() or (None, None, None, None)
    # Echoes never create second messages: each confirmed its reply instead.
    assert echo_messages == 0
    assert provider.echoes_posted > 0 and confirmations > 0
    # A failure can only be an attempt the budget would not repeat, never a lost reply.
    assert failed == in_doubt

    await catch_up(pool, [PROJECTIONS["inbox"], DELIVERY], timeout=60)
    async with pool.connection() as conn:
        statuses = dict(
            await (
                await conn.execute(
                    "SELECT delivery_status, count(*) FROM rm_inbox.messages"
                    " WHERE direction = 'out' GROUP BY 1"
                )
            ).fetchall()
        )
        pending = await (await conn.execute("SELECT count(*) FROM rm_delivery.outbox")).fetchone()
        # Each conversation row agrees with its messages: the failed marker and last status.
        disagree = await (
            await conn.execute(
                "SELECT c.conversation_id, c.last_message_status, m.delivery_status,"
                " c.failed_replies, f.n FROM rm_inbox.conversations c"
                " JOIN rm_inbox.messages m ON m.message_id = c.last_message_id"
                " CROSS JOIN LATERAL (SELECT count(*) AS n FROM rm_inbox.messages x"
                "  WHERE x.conversation_id = c.conversation_id"
                "  AND x.delivery_status = 'failed') AS f"
                " WHERE c.last_message_status IS DISTINCT FROM m.delivery_status"
                " OR c.failed_replies <> f.n"
            )
        ).fetchall()
    assert disagree == []
    # The queue and its totals, built by daemons killed mid-batch, equal a fresh build.
    await build_into(pool, DELIVERY, "fresh", replace=True)
    async with pool.connection() as conn:
        assert set(
            (await compare_read_models(conn, DELIVERY, "rm_delivery", "fresh")).values()
        ) == {(0, 0)}
    assert sum(statuses.values()) == REPLIES
    assert set(statuses) <= {"delivered", "failed"}
    assert statuses.get("failed", 0) == failed
    assert pending == (0,)
    print(
        f"\n{kills} kills; {attempts} attempts for {REPLIES} replies; sent twice: {dict(resent)};"
        f" {failed} failed as uncertain; {confirmations} echo confirmations",
        file=sys.stderr,
    )
