"""``convstore demo``: the whole product on realistic traffic, with its guarantees checked.

It registers four demo connections (a Messenger page, an Instagram account, a Telegram bot and
a website widget), serves the real application on a free loopback port, and drives traffic
through the real HTTP endpoints with valid signatures: concurrent first messages, batched and
out-of-order Meta deliveries, provider redeliveries, echoes, agent replies (some retried with
the same Idempotency-Key), reads, closes followed by new messages, a snooze, and a guest who
signs up, writes, and later identifies as an existing client. Then the projectors catch up and
the demo prints an inbox, one customer's history, and the checks that matter.

Every run uses fresh customer ids, so running it again adds to the data and checks again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import msgspec
from aiohttp import web
from psycopg_pool import AsyncConnectionPool

from conversations.connections import Connection, add_connection, get_connection
from conversations.errors import ConnectionNotFound
from projections import PROJECTIONS, InboxQueries, catch_up

from .app import SERVICE, Settings, create_app
from .meta import signature_header

__all__ = ["DemoReport", "run_demo"]

_ENC = msgspec.json.Encoder()
_PHRASES = (
    "Hi! Is my order on its way?",
    "I was charged twice for the same thing",
    "Do you ship to Lisbon?",
    "Can I change the delivery address?",
    "The app keeps logging me out 😕",
    "Thanks, that worked!",
    "What are your opening hours on Sunday?",
    "I'd like a refund please",
    "Where can I find my invoice?",
    "Is there a discount for students? 🎓",
    "Merci beaucoup 🙏",
    "Приветствую! Есть ли доставка?",
)
_REPLIES = (
    "Hello! Let me check that for you.",
    "Sorry about that, I've fixed it.",
    "Yes, we do. It takes 3-5 days.",
    "Done! Anything else?",
)


class DemoReport(msgspec.Struct):
    """What the demo sent and what it found; ``passed`` is the verdict."""

    customers: int = 0
    requests: int = 0
    accepted: int = 0
    redeliveries: int = 0
    replies: int = 0
    closes: int = 0
    stored: int = 0
    in_read_model: int = 0
    duplicate_messages: int = -1
    keys_with_two_open: int = -1
    replies_queued: int = 0
    replies_delivered: int = 0
    replies_failed: int = 0
    most_sends_of_one_reply: int = 0
    passed: bool = False
    seconds: float = 0.0


class _Customer(msgspec.Struct):
    connection: Connection
    psid: str
    messages: list[tuple[str, dt.datetime, str]]
    guest_token: str | None = None


async def _ensure_connections(pool: AsyncConnectionPool[Any]) -> dict[str, Connection]:
    wanted: dict[str, dict[str, str]] = {
        "demo-messenger": {
            "channel": "messenger",
            "external_id": "100200300",
            "reopen_policy": "new",
        },
        "demo-instagram": {
            "channel": "instagram",
            "external_id": "178400500",
            "reopen_policy": "reopen-within=7d",
        },
        "demo-telegram": {
            "channel": "telegram",
            "external_id": "demo_bot",
            "reopen_policy": "reopen-last",
        },
        "demo-widget": {"channel": "widget", "external_id": "demo-site", "reopen_policy": "new"},
    }
    found: dict[str, Connection] = {}
    for name, spec in wanted.items():
        try:
            found[name] = await get_connection(pool, name)
        except ConnectionNotFound:
            meta = spec["channel"] in ("messenger", "instagram")
            found[name] = await add_connection(
                pool,
                name,
                app_secret=secrets.token_hex(16) if meta else None,
                verify_token=secrets.token_hex(8),
                secret_token=secrets.token_hex(16),
                access_token=f"EAA-demo-{secrets.token_hex(12)}" if meta else None,
                bot_token=(
                    f"{secrets.randbelow(10**9)}:{secrets.token_hex(12)}"
                    if spec["channel"] == "telegram"
                    else None
                ),
                **spec,
            )
    return found


class _Driver:
    """Sends the traffic, retrying like providers do (5xx and connection errors)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base: str,
        api_token: str,
        pool: AsyncConnectionPool[Any],
    ) -> None:
        self.session = session
        self.pool = pool
        self.base = base
        self.api = {"Authorization": f"Bearer {api_token}", "X-Agent-Id": "demo-agent"}
        self.requests = 0
        self.accepted: set[tuple[str, str]] = set()
        self.limit = asyncio.Semaphore(32)

    async def post(
        self, path: str, body: bytes, headers: dict[str, str], accepts: tuple[int, ...] = (200,)
    ) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json", **headers}
        for attempt in range(8):
            async with self.limit:
                self.requests += 1
                try:
                    async with self.session.post(self.base + path, data=body, headers=headers) as r:
                        payload = await r.json(content_type=None)
                        if r.status < 500:
                            if r.status not in accepts:
                                raise RuntimeError(f"POST {path}: {r.status} {payload}")
                            return r.status, payload
                except aiohttp.ClientConnectionError:
                    pass
            await asyncio.sleep(0.05 * 2**attempt)
        raise RuntimeError(f"POST {path}: no answer after retries")

    async def get(self, path: str, params: dict[str, str] | None = None) -> Any:
        async with self.session.get(self.base + path, params=params, headers=self.api) as r:
            if r.status != 200:
                raise RuntimeError(f"GET {path}: {r.status} {await r.text()}")
            return await r.json()

    # -------------------------------------------------------------- providers

    async def meta(
        self,
        connection: Connection,
        items: list[tuple[_Customer, str, dt.datetime, str]],
        echo: bool = False,
    ) -> bytes:
        obj = "page" if connection.channel == "messenger" else "instagram"
        messaging = []
        for customer, mid, at, text in items:
            party = {"id": customer.psid}
            page = {"id": connection.external_id}
            message: dict[str, Any] = {"mid": mid, "text": text}
            if echo:
                message["is_echo"] = True
            messaging.append(
                {
                    "sender": page if echo else party,
                    "recipient": party if echo else page,
                    "timestamp": int(at.timestamp() * 1000),
                    "message": message,
                }
            )
        body = _ENC.encode(
            {
                "object": obj,
                "entry": [
                    {
                        "id": connection.external_id,
                        "time": int(time.time() * 1000),
                        "messaging": messaging,
                    }
                ],
            }
        )
        assert connection.app_secret is not None
        await self.post(
            "/webhooks/meta",
            body,
            {"X-Hub-Signature-256": signature_header(connection.app_secret, body)},
        )
        if not echo:
            self.accepted.update((connection.name, mid) for _, mid, _, _ in items)
        return body

    async def telegram(
        self, connection: Connection, customer: _Customer, mid: str, at: dt.datetime, text: str
    ) -> bytes:
        chat_id = int(customer.psid)
        body = _ENC.encode(
            {
                "update_id": random.randrange(10**9),
                "message": {
                    "message_id": int(mid.rpartition("-")[2]),
                    "from": {"id": chat_id, "is_bot": False, "first_name": "Demo"},
                    "chat": {"id": chat_id, "type": "private"},
                    "date": int(at.timestamp()),
                    "text": text,
                },
            }
        )
        assert connection.secret_token is not None
        await self.post(
            f"/webhooks/telegram/{connection.name}",
            body,
            {"X-Telegram-Bot-Api-Secret-Token": connection.secret_token},
        )
        self.accepted.add((connection.name, f"{chat_id}:{int(mid.rpartition('-')[2])}"))
        return body

    async def widget(self, customer: _Customer, mid: str, text: str) -> bytes:
        body = _ENC.encode({"client_message_id": mid, "text": text})
        await self.post(
            f"/widget/{customer.connection.name}/messages",
            body,
            {"Authorization": f"Bearer {customer.guest_token}"},
            accepts=(200, 201),
        )
        self.accepted.add((customer.connection.name, f"{customer.psid}:{mid}"))
        return body

    async def send(self, customer: _Customer, index: int) -> Callable[[], Awaitable[Any]]:
        """Deliver one message; returns how to deliver it again (a provider retry)."""
        mid, at, text = customer.messages[index]
        channel = customer.connection.channel
        if channel in ("messenger", "instagram"):
            body = await self.meta(customer.connection, [(customer, mid, at, text)])
            headers = {
                "X-Hub-Signature-256": signature_header(customer.connection.app_secret or "", body)
            }
            return lambda: self.post("/webhooks/meta", body, headers)
        if channel == "telegram":
            body = await self.telegram(customer.connection, customer, mid, at, text)
            tg = {"X-Telegram-Bot-Api-Secret-Token": customer.connection.secret_token or ""}
            path = f"/webhooks/telegram/{customer.connection.name}"
            return lambda: self.post(path, body, tg)
        body = await self.widget(customer, mid, text)
        auth = {"Authorization": f"Bearer {customer.guest_token}"}
        path = f"/widget/{customer.connection.name}/messages"
        return lambda: self.post(path, body, auth, accepts=(200, 201))


def _say(line: str) -> None:
    print(line, flush=True)


async def run_demo(
    database_url: str, *, customers: int = 320, messages: int = 8, seed: int | None = None
) -> DemoReport:
    """Run the demo against ``database_url`` (migrated) and return its report."""
    rng = random.Random(seed)
    random.seed(seed)
    started = time.monotonic()
    run_start = dt.datetime.now(dt.UTC)
    report = DemoReport()
    api_token = secrets.token_urlsafe(24)
    app = create_app(Settings(database_url=database_url, api_token=api_token, pool_max_size=16))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    base = f"http://127.0.0.1:{port}"
    _say(f"demo: server on {base}")
    pool = app[SERVICE].pool
    try:
        connections = await _ensure_connections(pool)
        run = uuid.uuid4().hex[:6]
        async with aiohttp.ClientSession() as session:
            driver = _Driver(session, base, api_token, pool)
            people = await _customers(driver, connections, run, customers, messages, rng)
            report.customers = len(people)
            _say(
                f"demo: {len(people)} customers across {len(connections)} connections, "
                f"{sum(len(c.messages) for c in people)} messages to send"
            )

            # 1. First contact: each customer's first two messages race as separate requests.
            await asyncio.gather(*(driver.send(c, i) for c in people for i in (0, 1)))
            _say(f"demo: first messages in ({driver.requests} requests so far)")

            # 2. The rest, shuffled (out of order), Meta ones batched; 10% redelivered.
            retries: list[Callable[[], Awaitable[Any]]] = []
            rest = [(c, i) for c in people for i in range(2, len(c.messages) - 1)]
            rng.shuffle(rest)
            meta_batches: dict[str, list[tuple[_Customer, str, dt.datetime, str]]] = {}
            singles = []
            for c, i in rest:
                if c.connection.channel in ("messenger", "instagram"):
                    meta_batches.setdefault(c.connection.name, []).append((c, *c.messages[i]))
                else:
                    singles.append((c, i))

            async def batch(name: str, items: list[Any]) -> None:
                body = await driver.meta(connections[name], items)
                if rng.random() < 0.1:
                    sig = signature_header(connections[name].app_secret or "", body)
                    retries.append(
                        lambda: driver.post("/webhooks/meta", body, {"X-Hub-Signature-256": sig})
                    )

            async def single(c: _Customer, i: int) -> None:
                again = await driver.send(c, i)
                if rng.random() < 0.1:
                    retries.append(again)

            jobs: list[Awaitable[Any]] = [single(c, i) for c, i in singles]
            for name, items in meta_batches.items():
                for k in range(0, len(items), 4):
                    jobs.append(batch(name, items[k : k + 4]))
            await asyncio.gather(*jobs)
            await asyncio.gather(*(again() for again in retries))
            report.redeliveries = len(retries)
            _say(
                f"demo: conversations flowing ({len(driver.accepted)} messages accepted, "
                f"{len(retries)} provider redeliveries)"
            )

            # 3. Agents: replies (some retried), reads, closes, a snooze, page echoes.
            await catch_up(pool, list(PROJECTIONS.values()))
            report.replies, report.closes = await _agents(driver, connections, people, rng)
            _say(
                f"demo: agents sent {report.replies} replies and closed {report.closes}"
                " conversations"
            )

            # 4. After a close the customer writes again: a new conversation (or reopened).
            await asyncio.gather(*(driver.send(c, len(c.messages) - 1) for c in people))

            # 5. A guest signs up, writes, then identifies as an existing client.
            await _guest_identifies(driver, connections, people, run)
            report.requests = driver.requests
            report.accepted = len(driver.accepted)

            # 6. The delivery daemon sends the agents' replies through a fake provider on
            #    loopback, whose Meta echoes come back to the real webhook as confirmations.
            await _deliver_replies(pool, connections, base, run_start, report)

        _say("demo: projectors catching up")
        await catch_up(pool, list(PROJECTIONS.values()))
        await _print_inbox(pool, connections["demo-messenger"].name)
        await _print_history(pool, people[0])
        await _checks(pool, report, run_start)
    finally:
        await runner.cleanup()
    report.seconds = time.monotonic() - started
    return report


async def _customers(
    driver: _Driver,
    connections: dict[str, Connection],
    run: str,
    customers: int,
    messages: int,
    rng: random.Random,
) -> list[_Customer]:
    shares = (
        ("demo-messenger", 0.35),
        ("demo-instagram", 0.25),
        ("demo-telegram", 0.25),
        ("demo-widget", 0.15),
    )
    people: list[_Customer] = []
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    for name, share in shares:
        connection = connections[name]
        for n in range(max(1, int(customers * share))):
            if connection.channel == "telegram":
                # Chat ids from the run id: a repeated seed must not reuse a chat's message ids.
                psid = str(int(run, 16) * 100_000 + n)
            elif connection.channel == "widget":
                psid = ""
            else:
                psid = f"{run}{n:05d}{rng.randrange(10**6):06d}"
            start = now - dt.timedelta(minutes=rng.randrange(30, 600))
            count = max(4, messages + rng.randrange(-2, 3))
            msgs = []
            for k in range(count):
                mid = f"m_{run}-{name[5:7]}{n}-{k + 1}"
                at = start + dt.timedelta(seconds=30 * k + rng.randrange(20))
                msgs.append((mid, at, rng.choice(_PHRASES)))
            people.append(_Customer(connection, psid, msgs))
    widget = connections["demo-widget"]
    for customer in people:
        if customer.connection.channel == "widget":
            _, guest = await driver.post(f"/widget/{widget.name}/guests", b"{}", {}, accepts=(201,))
            customer.psid = guest["guest_id"]
            customer.guest_token = guest["token"]
    return people


async def _agents(
    driver: _Driver,
    connections: dict[str, Connection],
    people: list[_Customer],
    rng: random.Random,
) -> tuple[int, int]:
    replies = closes = 0
    for name in connections:
        cursor = None
        rows: list[dict[str, Any]] = []
        while True:
            params = {"status": "open", "limit": "200", **({"cursor": cursor} if cursor else {})}
            page = await driver.get(f"/api/connections/{name}/inbox", params)
            rows.extend(page["items"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        jobs = []
        for row in rows:
            cid = row["conversation_id"]
            if rng.random() < 0.6:
                key = uuid.uuid4().hex
                # A reference per reply, as agents' tools add: it also lets the fake provider
                # count Telegram sends per reply (it tells them apart by text).
                body = _ENC.encode({"text": f"{rng.choice(_REPLIES)} (ref {key[:6]})"})
                headers = {**driver.api, "Idempotency-Key": key}
                jobs.append(driver.post(f"/api/conversations/{cid}/messages", body, headers))
                if rng.random() < 0.2:  # a client retry of the same reply: stored once
                    jobs.append(driver.post(f"/api/conversations/{cid}/messages", body, headers))
                replies += 1
            if row["last_message_id"] and rng.random() < 0.5:
                read = _ENC.encode({"up_to_message_id": row["last_message_id"]})
                jobs.append(
                    driver.post(
                        f"/api/conversations/{cid}/read", read, driver.api, accepts=(200, 409)
                    )
                )
        await asyncio.gather(*jobs)
        closing = rows[: max(1, len(rows) // 4)]
        results = await asyncio.gather(
            *(
                driver.post(
                    f"/api/conversations/{r['conversation_id']}/close",
                    b'{"reason": "resolved"}',
                    driver.api,
                    accepts=(200, 409),
                )
                for r in closing
            )
        )
        closes += sum(1 for status, _ in results if status == 200)
        if name == "demo-messenger" and len(rows) > len(closing):
            snoozed = rows[len(closing)]["conversation_id"]
            await driver.post(f"/api/conversations/{snoozed}/snooze", b"{}", driver.api)
    # Messages the page sent from Meta's own inbox come back as echoes: stored as outbound.
    messenger = connections["demo-messenger"]
    echoes = [c for c in people if c.connection is messenger][:10]
    now = dt.datetime.now(dt.UTC)
    for k, customer in enumerate(echoes):
        await driver.meta(
            messenger,
            [(customer, f"m_echo_{customer.psid}_{k}", now, "(sent from the page)")],
            echo=True,
        )
    return replies, closes


async def _guest_identifies(
    driver: _Driver,
    connections: dict[str, Connection],
    people: list[_Customer],
    run: str,
) -> None:
    messenger_customer = next(c for c in people if c.connection.name == "demo-messenger")
    client = await _contact_of(driver, messenger_customer)
    client_id = f"client-{run}"
    await driver.post(
        f"/api/contacts/{client}/identify", _ENC.encode({"client_id": client_id}), driver.api
    )
    widget = connections["demo-widget"]
    _, guest = await driver.post(
        f"/widget/{widget.name}/guests",
        _ENC.encode({"username": f"visitor-{run}"}),
        {},
        accepts=(201,),
    )
    auth = {"Authorization": f"Bearer {guest['token']}"}
    for k in range(3):
        await driver.post(
            f"/widget/{widget.name}/messages",
            _ENC.encode({"client_message_id": f"hello-{k}", "text": f"guest message {k}"}),
            auth,
            accepts=(201,),
        )
        driver.accepted.add((widget.name, f"{guest['guest_id']}:hello-{k}"))
    _, merged = await driver.post(
        f"/api/contacts/{guest['contact_id']}/identify",
        _ENC.encode({"client_id": client_id}),
        driver.api,
    )
    _say(
        f"demo: guest {guest['guest_id'][:14]}… identified as {client_id}: its history now "
        f"belongs to contact {merged['contact_id']}"
    )


async def _contact_of(driver: _Driver, customer: _Customer) -> str:
    """The contact id of a customer, through the agent API's inbox."""
    await catch_up(driver.pool, list(PROJECTIONS.values()))
    cursor = None
    while True:
        params = {"status": "all", "limit": "500", **({"cursor": cursor} if cursor else {})}
        page = await driver.get(f"/api/connections/{customer.connection.name}/inbox", params)
        for row in page["items"]:
            if row["psid"] == customer.psid:
                return str(row["contact_id"])
        cursor = page["next_cursor"]
        if cursor is None:
            raise RuntimeError(f"customer {customer.psid} is not in the inbox")


async def _deliver_replies(
    pool: AsyncConnectionPool[Any],
    connections: dict[str, Connection],
    base: str,
    since: dt.datetime,
    report: DemoReport,
) -> None:
    from .delivery import DeliverySettings, run_delivery
    from .fakeprovider import FakeProvider

    pages = {
        c.access_token: (c.external_id, c.app_secret or "")
        for c in connections.values()
        if c.access_token and c.channel in ("messenger", "instagram")
    }
    bots = {c.bot_token for c in connections.values() if c.bot_token}
    instagram = {c.external_id for c in connections.values() if c.channel == "instagram"}
    async with FakeProvider(
        page_tokens=pages,
        bot_tokens=bots,
        echo_to=f"{base}/webhooks/meta",
        instagram_pages=instagram,
    ) as provider:
        settings = DeliverySettings(
            graph_api_url=provider.graph_url,
            telegram_api_url=provider.telegram_url,
            timeout=5.0,
            poll_interval=0.05,
            standby_interval=0.2,
        )
        stop = asyncio.Event()
        daemon = asyncio.create_task(run_delivery(pool, settings, stop=stop))
        try:
            async with asyncio.timeout(120):
                while True:
                    queued, delivered, failed = await _reply_counts(pool, since)
                    if queued == delivered + failed or daemon.done():
                        break
                    await asyncio.sleep(0.2)
        finally:
            stop.set()
            await daemon
        sends = provider.sends()
    report.replies_queued, report.replies_delivered, report.replies_failed = (
        queued,
        delivered,
        failed,
    )
    report.most_sends_of_one_reply = max(sends.values(), default=0)
    _say(
        f"demo: delivery daemon sent {delivered} of {queued} replies ({failed} failed), "
        f"{sum(sends.values())} provider calls"
    )


async def _reply_counts(pool: AsyncConnectionPool[Any], since: dt.datetime) -> tuple[int, int, int]:
    """Replies queued since ``since``, and how many of them are delivered or failed."""
    async with pool.connection() as conn:
        row = await (
            await conn.execute(
                "WITH replies AS (SELECT data ->> 'message_id' AS id FROM events"
                " WHERE type = 'MessageSent' AND data ->> 'source' = 'agent'"
                " AND recorded_at >= %s),"
                " outcome AS (SELECT DISTINCT ON (data ->> 'message_id') data ->> 'message_id'"
                " AS id, type FROM events WHERE type IN ('ReplyDelivered', 'ReplyConfirmed',"
                " 'ReplyFailed') AND recorded_at >= %s"
                " ORDER BY data ->> 'message_id', (type = 'ReplyFailed'))"
                " SELECT count(*), count(*) FILTER (WHERE o.type <> 'ReplyFailed'),"
                " count(*) FILTER (WHERE o.type = 'ReplyFailed')"
                " FROM replies r LEFT JOIN outcome o ON o.id = r.id",
                (since, since),
            )
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


async def _print_inbox(pool: AsyncConnectionPool[Any], connection: str) -> None:
    page = await InboxQueries(pool).inbox(connection, "all", limit=12)
    _say("")
    _say(f"Inbox of {connection} (newest activity first, 12 of them):")
    _say(
        f"  {'CUSTOMER':<20} {'STATUS':<8} {'LAST ACTIVITY':<19} {'MSGS':>4} {'UNREAD':>6}"
        "  LAST MESSAGE"
    )
    for c in page.items:
        arrow = "<-" if c.last_message_direction == "in" else "->"
        preview = (c.last_message_preview or "")[:38]
        _say(
            f"  {c.psid[:20]:<20} {c.status:<8} {c.last_activity_at:%Y-%m-%d %H:%M:%S} "
            f"{c.message_count:>4} {c.unread_count:>6}  {arrow} {preview}"
        )


async def _print_history(pool: AsyncConnectionPool[Any], customer: _Customer) -> None:
    queries = InboxQueries(pool)
    async with pool.connection() as conn:
        rows = await (
            await conn.execute(
                "SELECT conversation_id FROM conversations WHERE connection = %s AND psid = %s"
                " ORDER BY opened_at",
                (customer.connection.name, customer.psid),
            )
        ).fetchall()
    _say("")
    _say(f"History of customer {customer.psid} on {customer.connection.name}:")
    for (cid,) in rows:
        row = await queries.conversation(cid)
        status = row.status if row else "?"
        _say(f"  conversation {cid} ({status})")
        page = await queries.messages(cid, limit=50)
        for m in reversed(page.items):
            who = "customer" if m.direction == "in" else (m.author or "agent")
            _say(f"    {m.sent_at:%H:%M:%S} {who:>10}: {(m.text or '')[:60]}")


async def _checks(pool: AsyncConnectionPool[Any], report: DemoReport, since: dt.datetime) -> None:
    async with pool.connection() as conn:

        async def one(query: Any, params: Any = None) -> int:
            row = await (await conn.execute(query, params)).fetchone()
            return int(row[0]) if row and row[0] is not None else 0

        report.keys_with_two_open = await one(
            "SELECT count(*) FROM (SELECT 1 FROM conversations WHERE status <> 'closed'"
            " GROUP BY connection, psid HAVING count(*) > 1) AS t"
        )
        open_in_model = await one(
            "SELECT count(*) FROM (SELECT 1 FROM rm_inbox.conversations"
            " WHERE status <> 'closed' GROUP BY connection, psid HAVING count(*) > 1) AS t"
        )
        report.keys_with_two_open += open_in_model
        report.duplicate_messages = await one(
            "SELECT count(*) - count(DISTINCT (c.connection, e.data ->> 'provider_message_id'))"
            " FROM events e JOIN conversations c ON c.stream_id = e.stream_id"
            " WHERE e.type = 'MessageReceived'"
        )
        report.stored = await one(
            "SELECT count(*) FROM events WHERE type = 'MessageReceived' AND recorded_at >= %s",
            (since,),
        )
        report.in_read_model = await one(
            "SELECT count(*) FROM rm_inbox.messages m JOIN events e ON e.event_id = m.message_id"
            " WHERE e.type = 'MessageReceived' AND e.recorded_at >= %s",
            (since,),
        )
    checks = [
        (
            "open conversations per key <= 1 (write side and read model)",
            report.keys_with_two_open == 0,
            f"{report.keys_with_two_open} keys over",
        ),
        (
            "duplicate messages = 0",
            report.duplicate_messages == 0,
            f"{report.duplicate_messages} duplicates",
        ),
        (
            "messages accepted = messages stored = messages in the read model",
            report.accepted == report.stored == report.in_read_model,
            f"{report.accepted} = {report.stored} = {report.in_read_model}",
        ),
        (
            "agent replies queued = delivered + failed, none sent more than twice",
            report.replies_queued == report.replies_delivered + report.replies_failed
            and report.most_sends_of_one_reply <= 2,
            f"{report.replies_queued} = {report.replies_delivered} + {report.replies_failed},"
            f" at most {report.most_sends_of_one_reply} send(s) per reply",
        ),
    ]
    _say("")
    _say(
        f"Checks ({report.requests} HTTP requests, {report.redeliveries} redeliveries, "
        f"{report.replies} replies, {report.closes} closes):"
    )
    for label, ok, detail in checks:
        _say(f"  {'PASS' if ok else 'FAIL'}  {label}: {detail}")
    report.passed = all(ok for _, ok, _ in checks)


def main(database_url: str, customers: int, messages: int, seed: int | None) -> int:
    """Run the demo and return the process exit code (1 when a check fails)."""
    report = asyncio.run(run_demo(database_url, customers=customers, messages=messages, seed=seed))
    verdict = "all checks passed" if report.passed else "CHECKS FAILED"
    _say(f"demo: {verdict} in {report.seconds:.1f} s")
    return 0 if report.passed else 1
