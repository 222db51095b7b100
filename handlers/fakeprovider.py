"""A fake Messenger/Instagram Send API and Telegram Bot API on loopback, for tests and the bench.

It binds ``127.0.0.1`` only. Point the delivery daemon at it with
``CONVSTORE_GRAPH_API_URL=<provider.graph_url>`` and
``CONVSTORE_TELEGRAM_API_URL=<provider.telegram_url>``.

Each recipient (PSID or chat id) follows a script of outcomes, one per request, then ``ok``:

- ``ok``: sent; answers like the real API (a message id);
- ``error``: a 500 (transient: not sent);
- ``rate_limit``: a 429 with ``Retry-After`` (transient: not sent);
- ``timeout``: sent, then no answer for ``hang`` seconds (the caller times out);
- ``disconnect``: sent, then the connection is dropped without an answer;
- ``invalid``: a permanent refusal (Meta: 400 code 100 "No matching user found"; Telegram:
  400 "chat not found").

Every request is recorded (:attr:`FakeProvider.requests`); :meth:`sends` counts the requests
that sent a message (ok, timeout, disconnect) by reply: the ``metadata`` of a Meta send, the
text of a Telegram one. With ``echo_to`` (a ``/webhooks/meta`` URL) every Meta send is echoed
back like Meta does: a signed ``is_echo`` delivery carrying the ``metadata``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import itertools
import random
import time
from typing import Any, Final

import aiohttp
import msgspec
from aiohttp import web

__all__ = ["OUTCOMES", "FakeProvider", "Received"]

#: The scriptable outcomes of one request.
OUTCOMES: Final = ("ok", "error", "rate_limit", "timeout", "disconnect", "invalid")
_SENT: Final = frozenset({"ok", "timeout", "disconnect"})


class Received(msgspec.Struct, frozen=True):
    """One request the fake provider received."""

    channel: str  # "meta" or "telegram"
    recipient: str
    text: str
    metadata: str | None
    outcome: str
    authorised: bool


class FakeProvider:
    """The fake provider's server (see the module). Use ``async with FakeProvider() as p``."""

    def __init__(
        self,
        *,
        page_tokens: dict[str, tuple[str, str]] | None = None,
        bot_tokens: set[str] | None = None,
        echo_to: str | None = None,
        hang: float = 30.0,
        latency: float = 0.0,
        instagram_pages: set[str] | None = None,
    ) -> None:
        #: page access token -> (page id, app secret), for Meta sends and their echoes
        self.page_tokens = dict(page_tokens or {})
        #: known bot tokens (any token is accepted when empty)
        self.bot_tokens = set(bot_tokens or ())
        self.echo_to = echo_to
        #: page ids that are Instagram accounts: their echoes come as ``object: instagram``
        self.instagram_pages = set(instagram_pages or ())
        self.hang = hang
        #: each send is answered after a random delay up to this many seconds
        self.latency = latency
        self.requests: list[Received] = []
        self.echoes_posted = 0
        self._scripts: dict[str, collections.deque[str]] = {}
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.port = 0

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> FakeProvider:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Serve on a free port of 127.0.0.1."""
        app = web.Application()
        app.router.add_post("/graph/{node}/messages", self._meta)
        app.router.add_post("/telegram/{bot}/sendMessage", self._telegram)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        self._session = aiohttp.ClientSession()

    async def close(self) -> None:
        """Stop serving; pending echoes are cancelled."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def graph_url(self) -> str:
        """The value for ``CONVSTORE_GRAPH_API_URL``."""
        return f"http://127.0.0.1:{self.port}/graph"

    @property
    def telegram_url(self) -> str:
        """The value for ``CONVSTORE_TELEGRAM_API_URL``."""
        return f"http://127.0.0.1:{self.port}/telegram"

    # ------------------------------------------------------------------ scripting and counts

    def script(self, recipient: str, *outcomes: str) -> None:
        """The next requests for ``recipient`` get these outcomes, in order (then ``ok``)."""
        unknown = [o for o in outcomes if o not in OUTCOMES]
        if unknown:
            raise ValueError(f"unknown outcomes {unknown}; use {', '.join(OUTCOMES)}")
        self._scripts.setdefault(recipient, collections.deque()).extend(outcomes)

    def sends(self) -> collections.Counter[str]:
        """Requests that sent a message, by reply (Meta: metadata; Telegram: text)."""
        return collections.Counter(
            (r.metadata if r.channel == "meta" and r.metadata else r.text)
            for r in self.requests
            if r.authorised and r.outcome in _SENT
        )

    def _next(self, recipient: str) -> str:
        queue = self._scripts.get(recipient)
        return queue.popleft() if queue else "ok"

    # ------------------------------------------------------------------ the APIs

    async def _meta(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        page = self.page_tokens.get(token) if scheme.lower() == "bearer" else None
        authorised = page is not None or not self.page_tokens
        recipient = str(body.get("recipient", {}).get("id", ""))
        message = body.get("message", {})
        text, metadata = str(message.get("text", "")), message.get("metadata")
        outcome = self._next(recipient) if authorised else "unauthorised"
        self.requests.append(Received("meta", recipient, text, metadata, outcome, authorised))
        if not authorised:
            return _meta_error(400, "OAuthException", 190, None, "Invalid OAuth access token.")
        if outcome == "error":
            return _meta_error(500, "OAuthException", 2, None, "Service temporarily unavailable")
        if outcome == "rate_limit":
            response = _meta_error(429, "OAuthException", 613, None, "Calls exceeded the limit")
            response.headers["Retry-After"] = "0"
            return response
        if outcome == "invalid":
            return _meta_error(400, "OAuthException", 100, 2018001, "No matching user found")
        mid = f"m_fake{next(self._ids)}"
        if page is not None and self.echo_to:
            self._spawn(self._echo(page, recipient, mid, text, metadata))
        return await self._answer(request, outcome, {"recipient_id": recipient, "message_id": mid})

    async def _telegram(self, request: web.Request) -> web.StreamResponse:
        bot = request.match_info["bot"]
        token = bot.removeprefix("bot")
        authorised = bot.startswith("bot") and (token in self.bot_tokens or not self.bot_tokens)
        body = await request.json()
        chat = str(body.get("chat_id", ""))
        text = str(body.get("text", ""))
        outcome = self._next(chat) if authorised else "unauthorised"
        self.requests.append(Received("telegram", chat, text, None, outcome, authorised))
        if not authorised:
            return web.json_response(
                {"ok": False, "error_code": 404, "description": "Not Found"}, status=404
            )
        if outcome == "error":
            return web.json_response(
                {"ok": False, "error_code": 502, "description": "Bad Gateway"}, status=502
            )
        if outcome == "rate_limit":
            return web.json_response(
                {
                    "ok": False,
                    "error_code": 429,
                    "description": "Too Many Requests: retry after 0",
                    "parameters": {"retry_after": 0},
                },
                status=429,
            )
        if outcome == "invalid":
            return web.json_response(
                {"ok": False, "error_code": 400, "description": "Bad Request: chat not found"},
                status=400,
            )
        result = {
            "message_id": next(self._ids),
            "chat": {"id": int(chat) if chat.lstrip("-").isdigit() else chat, "type": "private"},
            "date": int(time.time()),
            "text": text,
        }
        return await self._answer(request, outcome, {"ok": True, "result": result})

    async def _answer(
        self, request: web.Request, outcome: str, body: dict[str, Any]
    ) -> web.StreamResponse:
        if self.latency > 0:
            await asyncio.sleep(random.uniform(0, self.latency))
        if outcome == "timeout":
            await asyncio.sleep(self.hang)
        elif outcome == "disconnect":
            transport = request.transport
            if transport is not None:
                transport.abort()
            raise asyncio.CancelledError
        return web.json_response(body)

    # ------------------------------------------------------------------ echoes

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _echo(
        self, page: tuple[str, str], recipient: str, mid: str, text: str, metadata: str | None
    ) -> None:
        page_id, secret = page
        millis = int(time.time() * 1000)
        message: dict[str, Any] = {"mid": mid, "is_echo": True, "app_id": 1, "text": text}
        if metadata is not None:
            message["metadata"] = metadata
        body = msgspec.json.encode(
            {
                "object": "instagram" if page_id in self.instagram_pages else "page",
                "entry": [
                    {
                        "id": page_id,
                        "time": millis,
                        "messaging": [
                            {
                                "sender": {"id": page_id},
                                "recipient": {"id": recipient},
                                "timestamp": millis,
                                "message": message,
                            }
                        ],
                    }
                ],
            }
        )
        signature = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        assert self._session is not None and self.echo_to is not None
        # Like Meta, retry a delivery the webhook did not take (a 503 while the database is
        # busy), a few times.
        for delay in (0.0, 0.2, 0.5, 1.0, 2.0):
            await asyncio.sleep(delay)
            try:
                async with self._session.post(
                    self.echo_to,
                    data=body,
                    headers={
                        "Content-Type": "application/json",
                        "X-Hub-Signature-256": signature,
                    },
                ) as response:
                    if response.status == 200:
                        self.echoes_posted += 1
                        return
            except aiohttp.ClientError:
                continue


def _meta_error(
    status: int, kind: str, code: int, subcode: int | None, message: str
) -> web.Response:
    error: dict[str, Any] = {"message": message, "type": kind, "code": code, "fbtrace_id": "fake"}
    if subcode is not None:
        error["error_subcode"] = subcode
    return web.json_response({"error": error}, status=status)
