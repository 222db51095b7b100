"""Security properties as tests (issue 10).

- Secrets and tokens are compared in constant time (``hmac.compare_digest``), never with ``==``.
- Secrets never appear in logs: the application's, the real ``convstore serve`` process's
  (its access log included), or the ``connections`` commands' output.
- A guest token reads and writes only its own guest's messages on its own widget.
- Every agent API route answers 401 without the API token, and stores nothing.
- No SQL text is built from values: a static scan of every query the product executes.
- Every session we open has ``idle_in_transaction_session_timeout``, and one left idle in a
  transaction is ended, which releases the global-log fence for every reader.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import contextlib
import inspect
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import urlencode

import aiohttp
import psycopg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from psycopg_pool import AsyncConnectionPool

from eventstore import START, EventStore, NewEvent, uuid7
from eventstore.database import SESSION_SETTINGS, open_pool
from handlers import app, meta, telegram, widget
from handlers.app import POOL
from tests.conftest import API_TOKEN, ROOT
from tests.hostile import (
    AGENT,
    BOT_SECRET,
    PAGE,
    SECRETS,
    VERIFY_TOKEN,
    World,
    build_world,
    encode,
    meta_headers,
    send,
)

PACKAGES = ("eventstore", "conversations", "projections", "handlers")


@pytest.fixture
async def world(http: TestClient[Any, Any], pool: AsyncConnectionPool[Any]) -> World:
    """Connections, a guest who wrote once, and a guest of another widget."""
    return await build_world(http, pool)


def _leaks(text: str, secrets: tuple[str, ...] = SECRETS) -> list[str]:
    return [secret for secret in secrets if secret in text]


# --------------------------------------------------------------------------- constant time

#: Where a secret or token from a request is checked: each must use hmac.compare_digest.
SECRET_CHECKS: tuple[Callable[..., Any], ...] = (
    meta._signed_by,  # X-Hub-Signature-256 against each app secret
    meta.verify,  # hub.verify_token against each verify token
    telegram._telegram_connection,  # X-Telegram-Bot-Api-Secret-Token
    widget._guest,  # the guest token's MAC
    app.require_api_token,  # the agent API's bearer token
)
_NOT_SERVED = {"fakeprovider.py"}
_SECRETISH = re.compile(r"secret|token|signature|digest|password|(^|_)mac($|_)", re.IGNORECASE)
#: Comparisons that name a secret but leak nothing an attacker does not know (source, reason).
_HARMLESS = {
    # a digest's length is public (32 bytes for SHA-256); the bytes are compared in constant time
    "len(digest) != hashlib.sha256().digest_size",
    # a cache of verification results keyed by the server's own secrets: no request data
    "secret not in secrets_ok",
}


def test_secret_checks_use_compare_digest() -> None:
    for check in SECRET_CHECKS:
        tree = ast.parse(inspect.getsource(check).lstrip())
        calls = {ast.unparse(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
        assert "hmac.compare_digest" in calls, f"{check.__qualname__} must use compare_digest"


def test_no_secret_is_compared_with_equality() -> None:
    """No ``==``, ``!=``, ``in`` or ``startswith`` on anything named like a secret or token."""
    found = []
    paths = sorted((ROOT / "handlers").glob("*.py")) + [ROOT / "conversations/connections.py"]
    # the fake Meta/Telegram APIs the delivery tests call are not part of convstore's server
    for path in [p for p in paths if p.name not in _NOT_SERVED]:
        for node in ast.walk(ast.parse(path.read_text())):
            suspect: ast.AST | None = None
            if isinstance(node, ast.Compare) and any(
                isinstance(op, ast.Eq | ast.NotEq | ast.In | ast.NotIn) for op in node.ops
            ):
                suspect = node
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("startswith", "endswith")
            ):
                suspect = node.func.value
            if suspect is None or ast.unparse(suspect) in _HARMLESS:
                continue
            names = [
                n.id if isinstance(n, ast.Name) else n.attr
                for n in ast.walk(suspect)
                if isinstance(n, ast.Name | ast.Attribute)
            ]
            if any(_SECRETISH.search(name) for name in names):
                line = getattr(node, "lineno", 0)
                found.append(f"{path.relative_to(ROOT)}:{line}: {ast.unparse(suspect)}")
    assert found == [], "compare secrets with hmac.compare_digest:\n" + "\n".join(found)


# --------------------------------------------------------------------------- logs


async def _requests_carrying_secrets(
    request: Callable[..., Any], world: World | None = None
) -> None:
    """Requests that carry every kind of secret, right and wrong, through ``request``."""
    query = {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "42"}
    await request("GET", "/webhooks/meta?" + urlencode(query))
    await request("GET", "/webhooks/meta?" + urlencode({**query, "hub.verify_token": "nope"}))
    item = {
        "sender": {"id": "PSID-log"},
        "recipient": {"id": PAGE},
        "timestamp": 1_700_000_000_000,
        "message": {"mid": "m_log", "text": "hello"},
    }
    body = encode({"object": "page", "entry": [{"id": PAGE, "messaging": [item]}]})
    await request("POST", "/webhooks/meta", data=body, headers=meta_headers(body))
    await request("POST", "/webhooks/meta", data=body, headers=meta_headers(body, "wrong"))
    update = encode(
        {
            "update_id": 1,
            "message": {
                "message_id": 1,
                "date": 1_700_000_000,
                "chat": {"id": 42, "type": "private"},
                "text": "hi",
            },
        }
    )
    for token in (BOT_SECRET, BOT_SECRET + "x"):
        headers = {"Content-Type": "application/json", "X-Telegram-Bot-Api-Secret-Token": token}
        await request("POST", "/webhooks/telegram/bot", data=update, headers=headers)
    for token in (API_TOKEN, API_TOKEN + "x"):
        auth = {"Authorization": f"Bearer {token}"}
        await request("GET", "/api/connections/page/inbox", headers=auth)
        await request("POST", f"/api/conversations/{uuid.uuid4()}/close", headers=auth)
    if world is not None:
        for token in (world.guest_token, world.guest_token + "0"):
            auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
            await request("GET", "/widget/site/messages", headers=auth)
            message = encode({"client_message_id": "log", "text": "x"})
            await request("POST", "/widget/site/messages", data=message, headers=auth)


async def test_requests_carrying_secrets_log_none_of_them(
    http: TestClient[Any, Any], world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """The application's own log lines, at DEBUG, never hold a secret or a token.

    The test server's access log is aiohttp's, not the product's configuration: the product's
    server is checked as it runs, by the next test.
    """
    caplog.set_level(logging.DEBUG)
    answers: list[bytes] = []

    async def request(method: str, path: str, **kwargs: Any) -> None:
        async with http.request(method, path, **kwargs) as response:
            answers.append(await response.read())

    await _requests_carrying_secrets(request, world)
    lines = [
        record.getMessage() + (record.exc_text or "")
        for record in caplog.records
        if record.name != "aiohttp.access"
    ]
    assert len(lines) >= 10, "the requests should have been logged"
    assert _leaks("\n".join(lines), (*SECRETS, world.guest_token)) == []
    # and no answer echoes a secret (the verify handshake echoes only the challenge)
    assert _leaks(b"\n".join(answers).decode()) == []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_convstore_serve_logs_no_secret(
    database_url: str, pool: AsyncConnectionPool[Any], tmp_path: Path
) -> None:
    """The real ``convstore serve`` process, access log included, never logs a secret."""
    port = _free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "DATABASE_URL": database_url, "CONVSTORE_API_TOKEN": API_TOKEN}
    env["CONVSTORE_WIDGET_SECRET"] = "widget-secret-from-the-environment-31f"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "handlers.cli", "serve", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
            for _ in range(200):
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with session.get("/healthz") as response:
                        if response.status == 200:
                            break
                await asyncio.sleep(0.05)
            world = await _world_over(session, pool)

            async def request(method: str, path: str, **kwargs: Any) -> None:
                async with session.request(method, path, **kwargs) as response:
                    await response.read()

            await _requests_carrying_secrets(request, world)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
    text = log.read_text(errors="replace")
    assert "GET /webhooks/meta" in text or "route=/webhooks/meta" in text, text[-2000:]
    secrets = (*SECRETS, world.guest_token, env["CONVSTORE_WIDGET_SECRET"])
    assert _leaks(text, secrets) == [], text[-3000:]


async def _world_over(session: aiohttp.ClientSession, pool: AsyncConnectionPool[Any]) -> World:
    """:func:`tests.hostile.build_world` against a server at the other end of ``session``."""

    class Adapter:
        async def post(self, path: str, **kwargs: Any) -> Any:
            response = await session.post(path, **kwargs)
            await response.read()
            return response

    return await build_world(Adapter(), pool)  # type: ignore[arg-type]


def test_connection_commands_print_no_secret(
    database_url: str, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    from handlers.cli import main

    caplog.set_level(logging.DEBUG)
    secrets = {
        "--app-secret": "cli-app-secret-a81f",
        "--verify-token": "cli-verify-token-0c2d",
        "--access-token": "cli-access-token-77e0",
    }
    base = ["--database-url", database_url, "connections"]
    add = [*base, "add", "cli-page", "--channel", "messenger", "--external-id", "123"]
    assert main([*add, *(part for pair in secrets.items() for part in pair)]) == 0
    bot = ["--secret-token", "cli-secret-token-19aa", "--bot-token", "cli-bot-token-5d3b"]
    assert main([*base, "add", "cli-bot", "--channel", "telegram", "--external-id", "9", *bot]) == 0
    assert main([*base, "list"]) == 0
    # adding it again fails; the error names the connection, not its secrets
    assert main([*add, "--app-secret", "cli-app-secret-a81f"]) == 1
    out = capsys.readouterr()
    text = out.out + out.err + "\n".join(r.getMessage() for r in caplog.records)
    assert "cli-page" in text and "app_secret" in text  # it lists which secrets are set...
    every = (*secrets.values(), bot[1], bot[3])
    assert _leaks(text, every) == []  # ...and never their values


def test_reprs_hide_secrets() -> None:
    from conversations.connections import Connection
    from handlers.app import Settings

    settings = Settings(database_url="postgresql://u:pw-9f2@h/db", api_token="api-tok-3c1")
    assert _leaks(repr(settings) + str(settings), ("pw-9f2", "api-tok-3c1")) == []
    connection = Connection(
        "c", "messenger", "1", "new", None, None,  # type: ignore[arg-type]
        app_secret="s-1a", verify_token="v-2b", secret_token="t-3c", access_token="a-4d",
        bot_token="b-5e",
    )  # fmt: skip
    text = repr(connection) + str(connection) + f"{connection}"
    assert _leaks(text, ("s-1a", "v-2b", "t-3c", "a-4d", "b-5e")) == []


# --------------------------------------------------------------------------- guests


async def test_a_guest_token_reads_and_writes_only_its_own_guest(
    http: TestClient[Any, Any], pool: AsyncConnectionPool[Any], world: World
) -> None:
    def auth(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    second = await (await http.post("/widget/site/guests", json={})).json()
    for n in range(2):
        body = encode({"client_message_id": f"b-{n}", "text": f"second guest's secret {n}"})
        status, _ = await send(
            http, pool, "POST", "/widget/site/messages", data=body, headers=auth(second["token"])
        )
        assert status == 201

    async def history(token: str) -> list[str]:
        response = await http.get("/widget/site/messages", headers=auth(token))
        assert response.status == 200
        return [item["text"] for item in (await response.json())["items"]]

    assert await history(world.guest_token) == ["hello"]
    assert await history(second["token"]) == ["second guest's secret 0", "second guest's secret 1"]

    mac = world.guest_token.rpartition(".")[2]
    other_mac = second["token"].rpartition(".")[2]
    forgeries = [
        f"{second['guest_id']}.{mac}",  # another guest's id with my MAC
        f"{world.guest_id}.{other_mac}",  # my id with another guest's MAC
        f"{world.guest_id}.{mac.upper()}",  # the MAC in another case
        f"{world.guest_id}.{mac[:-2]}",  # a truncated MAC
        f"{world.guest_id}.",
        f"{world.guest_id}",
        f"x.{world.guest_token}",
        world.other_guest_token,  # a token of the other widget
        API_TOKEN,  # the agent API's token is not a guest token
    ]
    for token in forgeries:
        for method, data in (
            ("GET", None),
            ("POST", encode({"client_message_id": "f", "text": "x"})),
        ):
            status, _ = await send(
                http, pool, method, "/widget/site/messages", data=data, headers=auth(token)
            )
            assert status == 401, token
    # a token is bound to its widget: the other widget's guest cannot use it here, nor mine there
    status, _ = await send(
        http, pool, "GET", "/widget/other-site/messages", headers=auth(world.guest_token)
    )
    assert status == 401
    # the body cannot name another guest: unknown fields are refused
    for extra in ({"guest_id": second["guest_id"]}, {"psid": second["guest_id"]}):
        body = encode({"client_message_id": "imp", "text": "as someone else", **extra})
        status, _ = await send(
            http, pool, "POST", "/widget/site/messages", data=body, headers=auth(world.guest_token)
        )
        assert status == 400
    # and a guest token opens nothing on the agent API
    for path in (f"/api/conversations/{world.conversation_id}", "/api/connections/site/inbox"):
        status, _ = await send(http, pool, "GET", path, headers=auth(world.guest_token))
        assert status == 401
    assert await history(second["token"]) == ["second guest's secret 0", "second guest's secret 1"]
    assert await history(world.guest_token) == ["hello"]


# --------------------------------------------------------------------------- agent API


def _app_of(http: TestClient[Any, Any]) -> web.Application:
    server = http.server
    assert isinstance(server, TestServer)
    return server.app


async def test_every_agent_route_needs_the_api_token(
    http: TestClient[Any, Any], pool: AsyncConnectionPool[Any], world: World
) -> None:
    values = {"id": world.conversation_id}
    routes = []
    for route in _app_of(http).router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        template = info.get("formatter") or info.get("path") or ""
        if template.startswith("/api/") and route.method != "HEAD":  # HEAD runs GET's handler
            path = template.replace("{id}", values["id"])
            if "/connections/" in template:
                path = template.replace("{id}", "site")
            elif "/contacts/" in template:
                path = template.replace("{id}", world.contact_id)
            routes.append((route.method, path))
    assert len(routes) >= 15, routes
    basic = base64.b64encode(f"agent:{API_TOKEN}".encode()).decode()
    wrong = [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer "},
        {"Authorization": f"Bearer {API_TOKEN[:-1]}"},
        {"Authorization": f"Bearer {API_TOKEN}x"},
        {"Authorization": f"Bearer {API_TOKEN.upper()}"},
        {"Authorization": f"Basic {basic}"},
        {"Authorization": f"Token {API_TOKEN}"},
        {"Authorization": f"Bearer {world.guest_token}"},
        {"X-Api-Token": API_TOKEN},
    ]
    body = encode({"text": "x", "reason": "x"})
    for method, path in routes:
        for headers in wrong:
            sent = {**headers, "Content-Type": "application/json", "Idempotency-Key": "k"}
            status, answer = await send(http, pool, method, path, data=body, headers=sent)
            assert status == 401, (method, path, headers, answer)
        # nor does the token in the query string count
        status, _ = await send(http, pool, method, path, params={"token": API_TOKEN})
        assert status == 401
        # and with the token the route is real (anything but 401)
        async with http.request(method, path, headers=AGENT) as response:
            assert response.status != 401, (method, path)


# --------------------------------------------------------------------------- SQL from values

_SQL_WORDS = re.compile(
    r"\b(SELECT|INSERT|UPDATE|DELETE|WHERE|FROM|CREATE|ALTER|DROP|VALUES|LISTEN|NOTIFY|"
    r"TRUNCATE|LOCK|ANALYZE|EXPLAIN|RETURNING|JOIN|ORDER BY|GROUP BY|LIMIT|COPY)\b"
)
_EXECUTE = {"execute", "executemany", "copy", "stream"}
_COMPOSABLES = {"sql.Identifier", "sql.Literal", "sql.Placeholder", "sql.Composed"}
#: Queries the scan cannot follow, and why they carry no value.
_READ_FROM_FILES = {
    # a migration's text is the checksummed sql/NNNN_*.sql file shipped with the code
    "migration.sql.encode()",
}
Function = ast.FunctionDef | ast.AsyncFunctionDef
Scope = Function | None
#: What a place must hold: fixed text only, a psycopg.sql composition only, or either.
Want = Literal["text", "comp", "sql"]


class _Row(ast.AST):
    """A loop variable: item ``index`` of each row of ``iterable`` (the row when ``None``)."""

    _fields = ("iterable",)

    def __init__(self, iterable: ast.AST, index: int | None = None) -> None:
        super().__init__()
        self.iterable = iterable
        self.index = index


class _Part(ast.AST):
    """A name unpacked from a tuple: item ``index`` of ``value``."""

    _fields = ("value",)

    def __init__(self, value: ast.AST, index: int) -> None:
        super().__init__()
        self.value = value
        self.index = index


class _Param(ast.AST):
    """A function's parameter: its annotation, else whatever its callers pass."""

    _fields = ()

    def __init__(self, function: Function, name: str, annotation: str) -> None:
        super().__init__()
        self.function = function
        self.name = name
        self.annotation = annotation


@dataclass
class _Module:
    """One module of the product: its top-level bindings, imports and calls."""

    name: str
    path: Path
    tree: ast.Module
    bindings: dict[str, list[ast.AST]] = field(default_factory=dict)
    imports: dict[str, tuple[str, str]] = field(default_factory=dict)
    calls: list[tuple[ast.Call, Scope]] = field(default_factory=list)


def _bind(found: dict[str, list[ast.AST]], target: ast.AST, source: ast.AST) -> None:
    if isinstance(target, ast.Name):
        found.setdefault(target.id, []).append(source)
    elif isinstance(target, ast.Tuple | ast.List):
        for index, element in enumerate(target.elts):
            if isinstance(source, _Row) and source.index is None:
                _bind(found, element, _Row(source.iterable, index))
            else:
                _bind(found, element, _Part(source, index))
    elif isinstance(target, ast.Starred):
        _bind(found, target.value, ast.Constant(None))  # a list: never text


def _bindings(scope: ast.AST) -> dict[str, list[ast.AST]]:
    """Every binding of each name in a scope: assigned values, and loop variables as rows of
    their iterables. Nested functions and classes are scopes of their own (not entered)."""
    found: dict[str, list[ast.AST]] = {}
    if isinstance(scope, Function):
        arguments = scope.args
        for argument in (*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs):
            note = ast.unparse(argument.annotation) if argument.annotation else ""
            found.setdefault(argument.arg, []).append(_Param(scope, argument.arg, note))

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, Function | ast.ClassDef):
                found.setdefault(child.name, []).append(child)
                continue
            if isinstance(child, ast.Assign):
                for target in child.targets:
                    _bind(found, target, child.value)
            elif isinstance(child, ast.AnnAssign | ast.AugAssign) and child.value is not None:
                _bind(found, child.target, child.value)
            elif isinstance(child, ast.NamedExpr):
                _bind(found, child.target, child.value)
            elif isinstance(child, ast.For | ast.AsyncFor | ast.comprehension):
                _bind(found, child.target, _Row(child.iter))
            elif isinstance(child, ast.withitem) and child.optional_vars is not None:
                _bind(found, child.optional_vars, ast.Constant(None))
            visit(child)

    visit(scope)
    return found


def _scopes(tree: ast.AST) -> Iterator[tuple[ast.AST, Scope]]:
    """Every node with its innermost enclosing function (``None`` at module level)."""

    def walk(node: ast.AST, scope: Scope) -> Iterator[tuple[ast.AST, Scope]]:
        for child in ast.iter_child_nodes(node):
            inner = child if isinstance(child, Function) else scope
            yield child, inner
            yield from walk(child, inner)

    yield from walk(tree, None)


def _module(name: str, path: Path, tree: ast.Module, package: str) -> _Module:
    module = _Module(name, path, tree, _bindings(tree))
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                module.imports[alias.asname or alias.name] = (base, alias.name)
    module.calls = [(node, scope) for node, scope in _scopes(tree) if isinstance(node, ast.Call)]
    return module


def _load_modules() -> dict[str, _Module]:
    modules: dict[str, _Module] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            package_name = name if parts[-1] == "__init__" else name.rpartition(".")[0]
            modules[name] = _module(name, path, ast.parse(path.read_text()), package_name)
    return modules


class _SqlScan:
    """Decides whether a query is fixed: text written in the source, or a psycopg.sql
    composition of such text (values enter compositions only as quoted Literals/Identifiers).

    A name is followed to every value bound to it: in its function, its module, the module it
    is imported from; a parameter to the argument of every call of its function (a
    ``sql.Composed`` one is fixed by construction); an attribute only ``self`` sets to those
    assignments (one set elsewhere, like a Struct's field, is not fixed); a call to every
    return of the functions of that name. A value reached again on the same
    path adds nothing new (so ``q = sql.SQL("EXPLAIN ") + q`` is fixed when ``q`` is).
    """

    def __init__(self, modules: dict[str, _Module]) -> None:
        self.modules = modules
        self._scope_bindings: dict[int, dict[str, list[ast.AST]]] = {}
        self._visiting: set[tuple[int, str]] = set()
        self._functions: dict[str, list[tuple[Function, _Module]]] = {}
        self._attributes: dict[str, list[tuple[ast.AST, _Module, Scope]]] = {}
        self._opaque: set[str] = set()
        for module in modules.values():
            self.add(module)

    def add(self, module: _Module) -> None:
        """Index a module's functions and attribute assignments."""
        self.modules[module.name] = module
        for node, scope in _scopes(module.tree):
            if isinstance(node, Function):
                self._functions.setdefault(node.name, []).append((node, module))
            if isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if not isinstance(target, ast.Attribute):
                        continue
                    self_set = isinstance(target.value, ast.Name) and target.value.id == "self"
                    if self_set and node.value is not None and isinstance(node, ast.Assign):
                        found = self._attributes.setdefault(target.attr, [])
                        found.append((node.value, module, scope))
                    else:  # set on another object, or updated: the scan follows no such write
                        self._opaque.add(target.attr)
            if isinstance(node, ast.ClassDef):
                # a declared field (a Struct's, a dataclass's) is set by whoever builds one
                for statement in node.body:
                    if isinstance(statement, ast.AnnAssign | ast.Assign):
                        for name in ast.walk(statement):
                            if isinstance(name, ast.Name) and not isinstance(name.ctx, ast.Load):
                                self._opaque.add(name.id)

    def _attribute(self, name: str) -> list[tuple[ast.AST, _Module, Scope]]:
        """What ``self.<name> = ...`` assigns anywhere; nothing when others may set it too."""
        return [] if name in self._opaque else self._attributes.get(name, [])

    def bindings(self, scope: ast.AST) -> dict[str, list[ast.AST]]:
        key = id(scope)
        if key not in self._scope_bindings:
            self._scope_bindings[key] = _bindings(scope)
        return self._scope_bindings[key]

    def ok(self, node: ast.AST, module: _Module, scope: Scope, want: Want = "sql") -> bool:
        """True when ``node`` can only hold what ``want`` says."""
        key = (id(node), want)
        if key in self._visiting:
            return True  # on this path already: it adds no value of its own
        self._visiting.add(key)
        try:
            return self._ok(node, module, scope, want)
        finally:
            self._visiting.discard(key)

    def _ok(self, node: ast.AST, module: _Module, scope: Scope, want: Want) -> bool:
        if isinstance(node, ast.Constant):
            return want != "comp" and isinstance(node.value, str | bytes)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            sides = (node.left, node.right)
            if want == "comp":  # a composition plus text or another composition
                return all(self.ok(s, module, scope, "sql") for s in sides) and any(
                    self.ok(s, module, scope, "comp") for s in sides
                )
            return all(self.ok(s, module, scope, want) for s in sides)
        if isinstance(node, ast.IfExp):
            return all(self.ok(b, module, scope, want) for b in (node.body, node.orelse))
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            return all(self.ok(e, module, scope, want) for e in node.elts)
        if isinstance(node, ast.Dict):
            return all(self.ok(v, module, scope, want) for v in node.values)
        if isinstance(node, ast.Subscript):  # an item of a fixed table
            return self.ok(node.value, module, scope, want)
        if isinstance(node, ast.Call):
            return self._call(node, module, scope, want)
        if isinstance(node, ast.Attribute):
            found = self._attribute(node.attr)
            return bool(found) and all(self.ok(v, m, s, want) for v, m, s in found)
        if isinstance(node, ast.Name):
            values = self._values(node.id, module, scope)
            return bool(values) and all(self.ok(v, m, s, want) for v, m, s in values)
        if isinstance(node, _Row):
            rows = self._rows(node.iterable, module, scope)
            return rows is not None and all(
                self.ok(item, m, s, want)
                for row, m, s in rows
                for item in self._items(row, node.index)
            )
        if isinstance(node, _Part):
            return self._part(node, module, scope, want)
        if isinstance(node, _Param):
            return self._param(node, module, want)
        return False

    def _call(self, node: ast.Call, module: _Module, scope: Scope, want: Want) -> bool:
        func = ast.unparse(node.func)
        if func in ("sql.SQL", "SQL"):
            return (
                want != "text"
                and len(node.args) == 1
                and self.ok(node.args[0], module, scope, "text")
            )
        if func in _COMPOSABLES:
            return want != "text"
        if isinstance(node.func, ast.Attribute) and node.func.attr in ("format", "join"):
            return want != "text" and self.ok(node.func.value, module, scope, "comp")
        if isinstance(node.func, ast.Attribute) and node.func.attr == "encode":
            return self.ok(node.func.value, module, scope, want)
        if isinstance(node.func, ast.Attribute) and node.func.attr in ("as_bytes", "as_string"):
            # A fixed composition rendered once is fixed text (but no longer a composition).
            return want != "comp" and self.ok(node.func.value, module, scope, "sql")
        returns = self._returns(node, module)
        return bool(returns) and all(self.ok(v, m, s, want) for v, m, s in returns)

    def _part(self, node: _Part, module: _Module, scope: Scope, want: Want) -> bool:
        if isinstance(node.value, ast.Tuple | ast.List):
            items = node.value.elts
            return node.index < len(items) and self.ok(items[node.index], module, scope, want)
        if isinstance(node.value, ast.Call):
            returns = self._returns(node.value, module)
        elif isinstance(node.value, ast.Name):
            returns = self._values(node.value.id, module, scope)
        else:
            return False
        return bool(returns) and all(
            self.ok(_Part(value, node.index), m, s, want) for value, m, s in returns
        )

    def _param(self, node: _Param, module: _Module, want: Want) -> bool:
        # A composition is fixed by construction: every sql.SQL() in the code takes fixed text
        # (rule 3 below) and values enter only as quoted Literals and Identifiers. A str
        # parameter (LiteralString included: mypy does not enforce it) is followed to callers.
        if re.search(r"\b(sql\.)?(Composed|Composable|SQL)\b", node.annotation):
            return want != "text"
        arguments = self._arguments(node.function, node.name, module)
        return bool(arguments) and all(self.ok(v, m, s, want) for v, m, s in arguments)

    @staticmethod
    def _items(row: ast.AST, index: int | None) -> list[ast.AST]:
        if index is None:
            return [row]
        if isinstance(row, ast.Tuple | ast.List) and index < len(row.elts):
            return [row.elts[index]]
        return [ast.Constant(None)]  # not a row of that shape: not fixed

    def _rows(
        self, node: ast.AST, module: _Module, scope: Scope
    ) -> list[tuple[ast.AST, _Module, Scope]] | None:
        """The rows of the table ``node`` iterates over (``None`` when not a fixed table)."""
        key = (id(node), "rows")
        if key in self._visiting:
            return []
        self._visiting.add(key)
        try:
            sources: list[tuple[ast.AST, _Module, Scope]]
            if isinstance(node, ast.Tuple | ast.List | ast.Set):
                return [(element, module, scope) for element in node.elts]
            if isinstance(node, ast.ListComp | ast.GeneratorExp | ast.SetComp):
                return [(node.elt, module, scope)]
            if isinstance(node, ast.Name):
                sources = self._values(node.id, module, scope)
            elif isinstance(node, ast.Call):
                sources = self._returns(node, module)
            elif isinstance(node, ast.Attribute):
                sources = self._attribute(node.attr)
            elif isinstance(node, _Param):
                sources = self._arguments(node.function, node.name, module)
            else:
                return None
            rows: list[tuple[ast.AST, _Module, Scope]] = []
            for value, value_module, value_scope in sources:
                found = self._rows(value, value_module, value_scope)
                if found is None:
                    return None
                rows.extend(found)
            return rows if sources else None
        finally:
            self._visiting.discard(key)

    def _values(
        self, name: str, module: _Module, scope: Scope
    ) -> list[tuple[ast.AST, _Module, Scope]]:
        """Every value ``name`` is bound to where it is read, with the scope to read it in."""
        if scope is not None:
            bound = self.bindings(scope).get(name)
            if bound:
                return [(value, module, scope) for value in bound]
        if name in module.bindings:
            return [(value, module, None) for value in module.bindings[name]]
        if name in module.imports:
            source, original = module.imports[name]
            if source in self.modules:
                return self._values(original, self.modules[source], None)
        return []

    def _returns(self, call: ast.Call, module: _Module) -> list[tuple[ast.AST, _Module, Scope]]:
        """What the functions a call may reach return (every def of that name for methods)."""
        functions: list[tuple[Function, _Module]] = []
        if isinstance(call.func, ast.Name):
            for value, value_module, _ in self._values(call.func.id, module, None):
                if isinstance(value, Function):
                    functions.append((value, value_module))
        elif isinstance(call.func, ast.Attribute):
            functions = self._functions.get(call.func.attr, [])
        found: list[tuple[ast.AST, _Module, Scope]] = []
        for function, function_module in functions:
            for node, scope in _scopes(function):
                if isinstance(node, ast.Return) and node.value is not None:
                    if scope is None or scope is function:
                        found.append((node.value, function_module, function))
        return found

    def _arguments(
        self, function: Function, name: str, module: _Module
    ) -> list[tuple[ast.AST, _Module, Scope]]:
        """What each call of ``function`` in its module passes as parameter ``name``."""
        arguments = function.args
        positional = [a.arg for a in (*arguments.posonlyargs, *arguments.args)]
        found: list[tuple[ast.AST, _Module, Scope]] = []
        for call, caller in module.calls:
            func = call.func
            called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if called != function.name:
                continue
            method = isinstance(func, ast.Attribute) and positional[:1] in (["self"], ["cls"])
            keyword = [k.value for k in call.keywords if k.arg == name]
            index = positional.index(name) - int(method) if name in positional else -1
            if keyword:
                found.append((keyword[0], module, caller))
            elif 0 <= index < len(call.args) and not any(
                isinstance(a, ast.Starred) for a in call.args[: index + 1]
            ):
                found.append((call.args[index], module, caller))
            else:
                return []  # passed in a way this scan does not follow: not fixed
        return found


def _literal_text(node: ast.AST, module: _Module) -> str:
    """The text written in ``node``, and in the module constants it names."""
    parts = []
    for n in ast.walk(node):
        if isinstance(n, ast.Constant) and isinstance(n.value, str):
            parts.append(n.value)
        elif isinstance(n, ast.Name):
            for value in module.bindings.get(n.id, []):
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    parts.append(value.value)
    return " ".join(parts)


def _sql_problems(scan: _SqlScan, modules: list[_Module]) -> list[str]:
    """Each place in ``modules`` where a query is, or SQL text is, built from a value."""
    problems = []
    for module in modules:
        where = module.path.relative_to(ROOT) if module.path.is_absolute() else module.path
        for node, scope in _scopes(module.tree):
            # 1. A query call receives fixed text or a composition of it.
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in _EXECUTE
                and node.args
                and ast.unparse(node.args[0]) not in _READ_FROM_FILES
                and not scan.ok(node.args[0], module, scope)
            ):
                problems.append(f"{where}:{node.lineno}: query not fixed: {ast.unparse(node)[:80]}")
            # 2. Anywhere: SQL text is never formatted or concatenated with a value.
            text = ""
            if isinstance(node, ast.JoinedStr):
                text = _literal_text(node, module)
            elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod | ast.Add):
                text = "" if scan.ok(node, module, scope) else _literal_text(node, module)
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("format", "join", "replace")
                and not scan.ok(node, module, scope)
            ):
                text = _literal_text(node.func.value, module)
            if _SQL_WORDS.search(text):
                line = getattr(node, "lineno", 0)
                problems.append(f"{where}:{line}: SQL text built: {ast.unparse(node)[:80]}")
            # 3. sql.SQL() itself takes only fixed text.
            if (
                isinstance(node, ast.Call)
                and ast.unparse(node.func) in ("sql.SQL", "SQL")
                and not (node.args and scan.ok(node.args[0], module, scope, "text"))
            ):
                problems.append(f"{where}:{node.lineno}: sql.SQL() of text not fixed")
    return problems


def test_no_sql_text_is_built_from_values() -> None:
    modules = _load_modules()
    executes = sum(
        1
        for module in modules.values()
        for node in ast.walk(module.tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in _EXECUTE
    )
    assert executes > 80  # the scan sees the product's queries
    problems = _sql_problems(_SqlScan(modules), list(modules.values()))
    assert problems == [], "\n".join(problems)


#: Each way of building SQL from a value, which the scan must flag, and fixed ones it must not.
_PROBES = {
    "f_string": "async def f(conn, x):\n    await conn.execute(f'SELECT * FROM t WHERE a = {x}')",
    "percent": "async def f(conn, x):\n    await conn.execute('SELECT %s' % x)",
    "format": "async def f(conn, x):\n    q = 'DELETE FROM t WHERE a = {}'.format(x)\n"
    "    await conn.execute(q)",
    "concat": "async def f(conn, x):\n    await conn.execute('SELECT * FROM ' + x)",
    "sql_of_value": "async def f(conn, x):\n    await conn.execute(sql.SQL(x))",
    "parameter": "async def f(conn, q):\n    await conn.execute(q)\n"
    "async def g(conn, x):\n    await f(conn, 'SELECT ' + x)",
    "returned": "def build(x):\n    return 'SELECT ' + x\n"
    "async def f(conn, x):\n    await conn.execute(build(x))",
    "unpacked": "def build(x):\n    return 'SELECT ' + x, ()\n"
    "async def f(conn, x):\n    q, p = build(x)\n    await conn.execute(q, p)",
    "loop": "async def f(conn, x):\n    for op in ('<', x):\n"
    "        await conn.execute(sql.SQL('SELECT 1 {} 2').format(sql.SQL(op)))",
    "attribute": "class C:\n    channel: str\n\n    async def f(self, conn):\n"
    "        await conn.execute('LISTEN ' + self.channel)",
    "rendered": "async def f(conn, x):\n    await conn.execute(sql.SQL(x).as_bytes(None))",
    "fixed": "Q = 'SELECT 1'\n"
    "async def f(conn, x):\n    await conn.execute(Q + ' WHERE a = %s', (x,))\n"
    "async def g(conn, x):\n    await conn.execute(sql.SQL('SELECT {}').format(x))\n"
    "async def h(conn, x):\n    for op, v in (('<', x), ('>', x)):\n"
    "        await conn.execute(sql.SQL('SELECT %s {} 2').format(sql.SQL(op)), (v,))\n"
    "async def i(conn, q):\n    await conn.execute(q)\n"
    "async def j(conn):\n    await i(conn, Q if conn else Q + ' LIMIT 1')\n"
    "def build(x):\n    return Q, (x,)\n"
    "async def k(conn, x):\n    q, p = build(x)\n    await conn.execute(q, p)\n"
    "class D:\n    def __init__(self):\n        self.probe_query = sql.SQL('SELECT 1')\n\n"
    "    async def f(self, conn):\n        await conn.execute(self.probe_query)\n"
    "def render(s: sql.Composed) -> bytes:\n    return s.as_bytes(None)\n"
    "async def m(conn):\n"
    "    await conn.execute(render(sql.SQL('SELECT {}').format(sql.Identifier('t'))))",
}


def test_the_sql_scan_flags_each_way_of_building_sql_from_values() -> None:
    scan = _SqlScan(_load_modules())
    for label, source in _PROBES.items():
        module = _module(label, Path(f"{label}.py"), ast.parse(source), "")
        scan.add(module)
        problems = _sql_problems(scan, [module])
        assert bool(problems) == (label != "fixed"), (label, problems)


# --------------------------------------------------------------------------- stuck sessions


def test_session_settings_bound_idle_transactions() -> None:
    value = SESSION_SETTINGS["idle_in_transaction_session_timeout"]
    assert value not in ("0", "0s", "0ms", ""), value


async def test_every_session_we_open_has_the_timeout(
    http: TestClient[Any, Any],
    pool: AsyncConnectionPool[Any],
    world: World,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The app's pool, the store's listener, the projector's leader and standby connections."""
    from projections import PROJECTIONS, catch_up, rebuild

    app_pool = _app_of(http)[POOL]
    async with app_pool.connection() as conn:
        row = await (await conn.execute("SHOW idle_in_transaction_session_timeout")).fetchone()
    assert row is not None and row[0] not in ("0", "0ms"), row

    opened: list[str] = []
    connect = psycopg.AsyncConnection.connect

    async def recording(cls: Any, /, conninfo: str = "", **kwargs: Any) -> Any:
        opened.append(f"{conninfo} {kwargs.get('options', '')}")
        return await connect(conninfo, **kwargs)

    monkeypatch.setattr(psycopg.AsyncConnection, "connect", classmethod(recording))
    fresh = await open_pool(str(pool.conninfo), min_size=2, max_size=2)
    try:
        store = EventStore(fresh)
        follower = store.subscribe(START, poll_interval=0.05)
        await anext(follower)  # the first event: the listener connection is open
        await cast(AsyncGenerator[Any, None], follower).aclose()
        await catch_up(fresh, list(PROJECTIONS.values()))
        await rebuild(fresh, PROJECTIONS["inbox"])
        await store.close()
    finally:
        await fresh.close()
    assert len(opened) >= 4, opened
    missing = [line for line in opened if "idle_in_transaction_session_timeout" not in line]
    assert missing == [], missing


async def test_a_session_stuck_in_a_transaction_is_ended_and_the_fence_moves_on(
    database_url: str, pool: AsyncConnectionPool[Any]
) -> None:
    """A client that opens a transaction and goes quiet holds the global log's fence (readers
    see nothing committed after it began) until PostgreSQL ends its session."""
    store = EventStore(pool)
    stuck_pool = await open_pool(
        database_url, min_size=1, max_size=1, settings={"idle_in_transaction_session_timeout": "1s"}
    )
    try:
        async with stuck_pool.connection() as stuck:
            await stuck.execute("BEGIN")
            await stuck.execute("SELECT pg_current_xact_id()")  # it holds a transaction id
            event = NewEvent(uuid7(), "Noted", b'{"n": 1}')
            await store.append("note-1", [event])
            assert [e.event_id for e in await store.read_all(START)] == []  # held back
            deadline = time.monotonic() + 60  # generous: the timeout is 1 s
            seen: list[uuid.UUID] = []
            while not seen and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                seen = [e.event_id for e in await store.read_all(START)]
            assert seen == [event.event_id]
            # (PostgreSQL 15 raises IdleInTransactionSessionTimeout; a closed socket is operational)
            with pytest.raises(
                (psycopg.errors.IdleInTransactionSessionTimeout, psycopg.OperationalError)
            ):
                await stuck.execute("SELECT 1")
    finally:
        await stuck_pool.close()
        await store.close()
