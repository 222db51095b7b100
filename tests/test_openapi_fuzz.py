"""The agent and widget APIs, fuzzed against the OpenAPI document through the real server.

For every agent and widget operation in ``/openapi.json``, Hypothesis builds requests from the
document: path, query and header parameters and JSON bodies, valid ones (drawn from the
schemas, and from the real ids, tokens and cursors of a small world set up first, so commands
and reads succeed too) and invalid ones (wrong types, missing and unknown fields, huge and
nasty strings and numbers, malformed ids and cursors, bodies that are not JSON, wrong content
types, oversized bodies), with the right bearer token, another one, or none. Every answer
must be documented: no 5xx, a status the operation lists, its required headers, and a body
that validates against the documented schema, with objects closed (a field the document does
not name is an error). A separate test sends one known-good request to every operation and
checks the 2xx it gets.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import functools
import io
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

import msgspec
import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict
from psycopg_pool import AsyncConnectionPool
from yarl import URL

from conversations.connections import add_connection
from handlers.app import MAX_BODY
from handlers.meta import signature_header
from handlers.openapi import document
from tests.conftest import API_TOKEN
from tests.openapi_schema import (
    NASTY_STRINGS,
    any_json,
    invalid_values,
    resolve,
    valid_values,
    validate,
)

DOC = document()
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
#: aiohttp's request-line and header-field limit is 8190 bytes: longer ones are refused by the
#: HTTP parser before any route runs, so requests stay below it.
MAX_FIELD = 6000


def _operations(*prefixes: str) -> list[tuple[str, str]]:
    return [
        (path, method)
        for path, item in DOC["paths"].items()
        if path.startswith(prefixes)
        for method in item
    ]


FUZZED = _operations("/api/", "/widget/")


# --------------------------------------------------------------------------- the world


@dataclass
class Guest:
    connection: str
    guest_id: str
    token: str
    contact_id: str


@dataclass
class World:
    """Real ids, tokens and cursors to draw valid requests from."""

    guests: list[Guest] = field(default_factory=list)
    conversations: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    contacts: list[str] = field(default_factory=list)
    cursors: list[str] = field(default_factory=list)
    #: strategies built from the document and the world, built once
    memo: dict[tuple[str, int], st.SearchStrategy[Any]] = field(default_factory=dict)

    @functools.cached_property
    def hints(self) -> dict[str, st.SearchStrategy[Any]]:
        """Valid values for parameters and body fields, by name."""
        return _hints(self)

    def strategy(self, kind: str, schema: Mapping[str, Any]) -> st.SearchStrategy[Any]:
        """``valid``/``invalid`` values of ``schema`` (with this world's hints), or ``plain``
        valid ones (no hints)."""
        key = (kind, id(schema))
        if key not in self.memo:
            if kind == "plain":
                self.memo[key] = valid_values(DOC, schema)
            elif kind == "valid":
                self.memo[key] = valid_values(DOC, schema, self.hints)
            else:
                self.memo[key] = invalid_values(DOC, schema, self.hints)
        return self.memo[key]


def _cursor(*parts: str) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(parts)).encode()).rstrip(b"=").decode()


#: Cursors that decode but mean nothing, or mean something odd.
CRAFTED_CURSORS = (
    _cursor("m", "-1"),
    _cursor("m", "9" * 300),
    _cursor("m"),
    _cursor("c", "2024-01-01T00:00:00+00:00", str(uuid.UUID(int=0))),
    _cursor("c", "2024-01-01T00:00:00", "not-a-uuid"),
    _cursor("c", "0001-01-01T00:00:00+14:00", str(uuid.UUID(int=1))),
    _cursor("c", "9999-12-31T23:59:59-12:00", str(uuid.UUID(int=2))),
    _cursor("c", "²", "x"),
    _cursor("x", "y", "z"),
    base64.urlsafe_b64encode(b'{"m": 1}').decode(),
    base64.urlsafe_b64encode(b"[1, 2]").decode(),
    "====",
    "-_-_",
)


def _meta_delivery(psid: str, mid: str, millis: int) -> bytes:
    """A Messenger delivery of one customer message to the page ``p1``."""
    item = {
        "timestamp": millis,
        "sender": {"id": psid},
        "recipient": {"id": "p1"},
        "message": {"mid": mid, "text": "hi"},
    }
    return json.dumps({"object": "page", "entry": [{"id": "p1", "messaging": [item]}]}).encode()


async def _world(http: TestClient[Any, Any], pool: AsyncConnectionPool[Any]) -> World:
    from projections import PROJECTIONS, catch_up

    world = World()
    await add_connection(pool, "site", channel="widget", external_id="w1", secret_token="s3")
    await add_connection(pool, "lobby", channel="widget", external_id="w2")
    await add_connection(pool, "bot", channel="telegram", external_id="b1", secret_token="t0k")
    for n, connection in enumerate(["site", "site", "site", "lobby"]):
        body = {"username": f"guest{n}"} if n % 2 else {}
        signed = await http.post(f"/widget/{connection}/guests", json=body)
        assert signed.status == 201
        g = await signed.json()
        world.guests.append(Guest(connection, g["guest_id"], g["token"], g["contact_id"]))
        world.contacts.append(g["contact_id"])
        for m in range(2):
            sent = await http.post(
                f"/widget/{connection}/messages",
                json={"client_message_id": f"m{m}", "text": f"guest {n} says {m}"},
                headers={"Authorization": f"Bearer {g['token']}"},
            )
            assert sent.status == 201
            answer = await sent.json()
            world.messages.append(answer["message_id"])
        world.conversations.append(answer["conversation_id"])
    first, second, third = world.conversations[:3]
    replied = await http.post(
        f"/api/conversations/{first}/messages",
        json={"text": "hello from the agents"},
        headers={**AUTH, "Idempotency-Key": "setup"},
    )
    assert replied.status == 200
    assert (await http.post(f"/api/conversations/{second}/close", headers=AUTH)).status == 200
    snoozed = await http.post(
        f"/api/conversations/{third}/snooze",
        json={"until": (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).isoformat()},
        headers=AUTH,
    )
    assert snoozed.status == 200
    # A Messenger conversation whose customer last wrote in 2023: Meta's window is closed.
    await add_connection(
        pool,
        "page",
        channel="messenger",
        external_id="p1",
        app_secret="app-secret",
        verify_token="vt",
    )
    old = _meta_delivery("psid-old", "mid-old", 1_700_000_000_000)
    delivered = await http.post(
        "/webhooks/meta",
        data=old,
        headers={
            "Content-Type": "application/json",
            "X-Hub-Signature-256": signature_header("app-secret", old),
        },
    )
    assert delivered.status == 200
    await catch_up(pool, list(PROJECTIONS.values()))
    page = await (await http.get("/api/connections/page/inbox", headers=AUTH)).json()
    world.conversations += [c["conversation_id"] for c in page["items"]]
    for url, query in (
        ("/api/connections/site/inbox", {"status": "all", "limit": "1"}),
        (f"/api/conversations/{first}/messages", {"limit": "1"}),
        (f"/api/contacts/{world.contacts[0]}/conversations", {"limit": "1"}),
    ):
        page = await (await http.get(url, params=query, headers=AUTH)).json()
        if page["next_cursor"]:
            world.cursors.append(page["next_cursor"])
    return world


# --------------------------------------------------------------------------- requests


@dataclass
class Call:
    method: str
    url: str
    params: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes | None

    def __repr__(self) -> str:
        body = self.body if self.body is None or len(self.body) < 300 else self.body[:300]
        return f"Call({self.method} {self.url} {self.params!r} {self.headers!r} {body!r})"


def _header_safe(value: str) -> str:
    """A header value aiohttp's client can send: no control characters, not too long."""
    return "".join(c for c in value if c >= " " and c != "\x7f" and not 0x80 <= ord(c) < 0xA0)[
        :MAX_FIELD
    ]


def _param_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _path_hint(path: str, world: World) -> st.SearchStrategy[str]:
    if path.startswith("/api/conversations/"):
        return st.sampled_from(world.conversations)
    if path.startswith("/api/contacts/"):
        return st.sampled_from(world.contacts)
    return st.sampled_from(["site", "lobby", "site", "bot", "nope"])


def _hints(world: World) -> dict[str, st.SearchStrategy[Any]]:
    """Valid values for names of parameters and body fields, from the world."""
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    return {
        "cursor": st.sampled_from([*world.cursors, *CRAFTED_CURSORS]),
        "before": st.sampled_from([*world.cursors, *CRAFTED_CURSORS]),
        "status": st.sampled_from(["open", "snoozed", "closed", "all", "closed,open"]),
        "limit": st.integers(1, 3),
        "If-Match": st.sampled_from(['"1"', "2", '"3"', 'W/"4"', "5", "6"]),
        "X-Agent-Id": st.sampled_from(["ann", "agent-7"]),
        "Idempotency-Key": st.sampled_from(["k1", "k2", "k3"]),
        "up_to_message_id": st.sampled_from(world.messages),
        "from_contact_id": st.sampled_from(world.contacts),
        "until": st.sampled_from(
            [
                soon.isoformat(),
                (soon + dt.timedelta(days=30)).isoformat(),
                "2001-01-01T00:00:00Z",
                "2999-01-01T00:00:00",
                None,
            ]
        ),
        "text": st.text(min_size=1, max_size=30),
        "client_message_id": st.sampled_from(["c1", "c2", "c3"]),
        "email": st.sampled_from(["ann@example.com", "bob@example.com"]),
        "username": st.sampled_from(["ann", "guest1"]),
        "phone": st.sampled_from(["+15550001"]),
        "client_id": st.sampled_from(["client-1"]),
    }


ANY_JSON = any_json()
NOT_JSON_TYPES = (
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/jsonx",
)


@st.composite
def calls(draw: st.DrawFn, path: str, method: str, world: World) -> Call:
    """One request to the operation: each part valid, invalid or left out."""
    operation = DOC["paths"][path][method]
    hints = world.hints
    params = [resolve(DOC, p) for p in operation.get("parameters", ())]

    def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> Any:
        """``good`` three times in four: enough valid requests get past every check."""
        return draw(good if draw(st.integers(0, 3)) else bad)

    def value(param: Mapping[str, Any]) -> Any:
        name = param["name"]
        generated = world.strategy("plain", param["schema"])
        valid = st.one_of(hints[name], generated) if name in hints else generated
        bad = st.one_of(st.sampled_from(NASTY_STRINGS), st.text(max_size=20), st.uuids().map(str))
        return mostly(valid, bad)

    url = path
    for param in (p for p in params if p["in"] == "path"):
        raw = mostly(_path_hint(path, world), st.builds(_param_text, st.just(None)))
        if raw == "null":
            raw = _param_text(value(param))
        if raw in ("", ".", ".."):  # another route (or none) after dot-segment removal
            raw = "x"
        url = url.replace("{" + param["name"] + "}", quote(raw[:MAX_FIELD], safe=""))

    query: list[tuple[str, str]] = []
    for param in (p for p in params if p["in"] == "query"):
        if param.get("required") or draw(st.booleans()):
            query.append((param["name"], _param_text(value(param))[:MAX_FIELD]))
    if draw(st.integers(0, 9)) == 0:
        query.append((draw(st.sampled_from(["limit", "x", "cursor"])), draw(st.text(max_size=8))))

    headers: dict[str, str] = {}
    for param in (p for p in params if p["in"] == "header"):
        if param.get("required") or draw(st.booleans()):
            headers[param["name"]] = _header_safe(_param_text(value(param)))

    # mostly a guest of the connection in the path, whose token is valid there
    here = [g for g in world.guests if url.startswith(f"/widget/{g.connection}/")]
    guest = mostly(st.sampled_from(here or world.guests), st.sampled_from(world.guests))
    tokens = {
        "agent": f"Bearer {API_TOKEN}",
        "guest": f"Bearer {guest.token}",
        "forged": f"Bearer {guest.guest_id}.{'0' * 64}",
        "wrong": "Bearer not-the-token",
        "scheme": f"Basic {API_TOKEN}",
        "bare": "Bearer",
        "junk": _header_safe(draw(st.sampled_from(NASTY_STRINGS))),
    }
    security = operation.get("security", [])
    usual = "agent" if {"agentToken": []} in security else "guest"
    auth = mostly(st.just(usual), st.sampled_from([*tokens, None]))
    if auth is not None and security:
        headers["Authorization"] = tokens[auth]

    body: bytes | None = None
    request_body = operation.get("requestBody")
    if request_body is not None:
        schema = request_body["content"]["application/json"]["schema"]
        kind = mostly(
            st.sampled_from(["valid", "valid", "charset"]),
            st.sampled_from(["invalid", "invalid", "json", "none", "bytes", "type", "huge"]),
        )
        content_type = "application/json"
        if kind in ("valid", "type", "charset"):
            body = json.dumps(draw(world.strategy("valid", schema))).encode()
        elif kind == "invalid":
            body = json.dumps(draw(world.strategy("invalid", schema))).encode()
        elif kind == "json":
            body = json.dumps(draw(ANY_JSON)).encode()
        elif kind == "bytes":
            body = draw(st.binary(max_size=40))
        elif kind == "huge":
            body = b'{"text": "' + b"x" * MAX_BODY + b'"}'
        if kind == "type":
            content_type = draw(st.sampled_from(NOT_JSON_TYPES))
        elif kind == "charset":
            content_type = "application/json; charset=utf-8"
        if body is not None:
            headers["Content-Type"] = content_type
    elif draw(st.integers(0, 9)) == 0:
        body = b'{"ignored": true}'  # a body where none is read
        headers["Content-Type"] = "application/json"
    return Call(method.upper(), url, query, headers, body)


# --------------------------------------------------------------------------- the checks


@dataclass
class Answer:
    status: int
    content_type: str
    headers: Mapping[str, str]
    body: bytes


async def _send(http: TestClient[Any, Any], call: Call) -> Answer:
    url = URL(call.url, encoded=True)
    # aiohttp warns about (so, here, fails on) bytes bodies over 1 MiB: stream those
    data = io.BytesIO(call.body) if call.body and len(call.body) > MAX_BODY else call.body
    async with http.request(
        call.method, url, params=call.params, headers=call.headers, data=data
    ) as response:
        body = await response.read()
        return Answer(response.status, response.content_type, response.headers, body)


def check(path: str, method: str, call: Call, answer: Answer) -> None:
    """The answer is one the document describes for this operation."""
    where = f"{method.upper()} {path}: {call!r} -> {answer.status} {answer.body[:500]!r}"
    assert answer.status < 500, where
    responses = DOC["paths"][path][method]["responses"]
    assert str(answer.status) in responses, f"undocumented status: {where}"
    documented = resolve(DOC, responses[str(answer.status)])
    for name, header in documented.get("headers", {}).items():
        header = resolve(DOC, header)
        if name not in answer.headers:
            assert not header.get("required"), f"no {name} header: {where}"
            continue
        errors = validate(DOC, header["schema"], answer.headers[name], name)
        assert not errors, f"{errors}: {where}"
    content = documented.get("content")
    if content is None:
        assert not answer.body, where
        return
    assert answer.content_type in content, f"content type {answer.content_type}: {where}"
    schema = content[answer.content_type]["schema"]
    if answer.content_type == "application/json":
        value = msgspec.json.decode(answer.body)
    else:
        value = answer.body.decode("utf-8")
    errors = validate(DOC, schema, value, closed=True)
    assert not errors, f"{errors}: {where}"


@pytest.fixture
async def world(http: TestClient[Any, Any], pool: AsyncConnectionPool[Any]) -> World:
    return await _world(http, pool)


@pytest.mark.parametrize(("path", "method"), FUZZED, ids=[f"{m} {p}" for p, m in FUZZED])
@settings(
    max_examples=60,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(data=st.data())
async def test_answers_are_documented(
    http: TestClient[Any, Any], world: World, path: str, method: str, data: st.DataObject
) -> None:
    call = data.draw(calls(path, method, world), label="call")
    answer = await _send(http, call)
    check(path, method, call, answer)


@dataclass
class Good:
    """A request the operation should accept: each part may be swapped for a bad value."""

    path: str
    method: str
    path_params: dict[str, str] = field(default_factory=dict)
    query: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    raw: bytes | None = None  # a body sent as these exact bytes (signed webhooks)

    def call(self, **changes: Any) -> Call:
        """The request as a :class:`Call`, with ``path_params``/``query``/... replaced."""
        parts = {
            "path_params": self.path_params,
            "query": self.query,
            "headers": self.headers,
            "body": self.body,
        } | changes
        url = self.path
        for name, value in parts["path_params"].items():
            url = url.replace("{" + name + "}", quote(value, safe=""))
        headers = dict(parts["headers"])
        if self.path.startswith("/api/"):
            headers = {**AUTH, **headers}
        body = self.raw
        if body is None and parts["body"] is not None:
            body = json.dumps(parts["body"]).encode()
        if body is not None:
            headers.setdefault("Content-Type", "application/json")
        return Call(self.method.upper(), url, list(parts["query"].items()), headers, body)


async def _good_requests(world: World, http: TestClient[Any, Any]) -> list[Good]:
    """One good request per operation (in an order where each still succeeds)."""
    first, second, third = world.conversations[:3]
    contact, other = world.contacts[:2]
    # the lobby guest's: its conversation is not one the commands below act on
    guest = {"Authorization": f"Bearer {world.guests[3].token}"}
    meta = _meta_delivery("psid-1", "mid-1", 1_700_000_000_000)
    update = {
        "update_id": 1,
        "message": {
            "message_id": 1,
            "date": 1_700_000_000,
            "chat": {"id": 42, "type": "private"},
            "text": "hi",
        },
    }
    current = await http.get(f"/api/conversations/{first}", headers=AUTH)
    version = (await current.json())["version"]
    soon = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat()
    conversation = {"id": first}
    return [
        Good("/healthz", "get"),
        Good("/readyz", "get"),
        Good("/metrics", "get"),
        Good("/openapi.json", "get"),
        Good(
            "/webhooks/meta",
            "get",
            query={"hub.mode": "subscribe", "hub.verify_token": "vt", "hub.challenge": "c"},
        ),
        Good(
            "/webhooks/meta",
            "post",
            headers={"X-Hub-Signature-256": signature_header("app-secret", meta)},
            raw=meta,
        ),
        Good(
            "/webhooks/telegram/{connection}",
            "post",
            {"connection": "bot"},
            headers={"X-Telegram-Bot-Api-Secret-Token": "t0k"},
            body=update,
        ),
        Good("/widget/{connection}/guests", "post", {"connection": "site"}, body={}),
        Good(
            "/widget/{connection}/messages",
            "post",
            {"connection": "lobby"},
            headers=guest,
            body={"client_message_id": "new", "text": "again"},
        ),
        Good("/widget/{connection}/messages", "get", {"connection": "lobby"}, headers=guest),
        Good("/widget/{connection}/guests", "options", {"connection": "site"}),
        Good("/widget/{connection}/messages", "options", {"connection": "lobby"}),
        Good(
            "/api/connections/{id}/inbox",
            "get",
            {"id": "site"},
            query={"status": "open,snoozed", "limit": "2", "cursor": world.cursors[0]},
        ),
        Good("/api/connections/{id}/counts", "get", {"id": "site"}),
        Good("/api/conversations/{id}", "get", conversation),
        Good(
            "/api/conversations/{id}/messages",
            "get",
            conversation,
            query={"limit": "1", "before": world.cursors[1]},
        ),
        Good(
            "/api/conversations/{id}/messages",
            "post",
            conversation,
            headers={"Idempotency-Key": "good", "If-Match": f'"{version}"', "X-Agent-Id": "ann"},
            body={"text": "a reply", "tag": "t"},
        ),
        Good(
            "/api/conversations/{id}/read",
            "post",
            conversation,
            body={"up_to_message_id": world.messages[1]},
        ),
        Good("/api/conversations/{id}/reopen", "post", {"id": second}),
        Good("/api/conversations/{id}/snooze", "post", {"id": second}, body={"until": soon}),
        Good("/api/conversations/{id}/unsnooze", "post", {"id": second}),
        Good("/api/conversations/{id}/close", "post", {"id": second}, body={"reason": "done"}),
        Good("/api/conversations/{id}", "delete", {"id": third}),
        Good("/api/conversations/{id}/restore", "post", {"id": third}),
        Good("/api/contacts/{id}/conversations", "get", {"id": contact}),
        Good(
            "/api/contacts/{id}/identify",
            "post",
            {"id": contact},
            body={"email": "ann@example.com"},
        ),
        Good("/api/contacts/{id}/merge", "post", {"id": contact}, body={"from_contact_id": other}),
    ]


async def test_good_requests_get_their_documented_2xx(
    http: TestClient[Any, Any], pool: AsyncConnectionPool[Any], world: World
) -> None:
    """One known-good request per operation, webhooks included: a 2xx, as documented."""
    goods = await _good_requests(world, http)
    assert {(g.path, g.method) for g in goods} == set(_operations("/"))
    for good in goods:
        call = good.call()
        answer = await _send(http, call)
        assert 200 <= answer.status < 300, f"{call!r}: {answer.status} {answer.body!r}"
        check(good.path, good.method, call, answer)


async def test_a_reply_outside_metas_window_is_a_documented_422(
    http: TestClient[Any, Any], world: World
) -> None:
    path, method = "/api/conversations/{id}/messages", "post"
    messenger = world.conversations[-1]
    for tag in (None, "HUMAN_AGENT", "NO_SUCH_TAG"):
        body = {"text": "late", **({"tag": tag} if tag else {})}
        good = Good(path, method, {"id": messenger}, headers={"Idempotency-Key": "k"}, body=body)
        call = good.call()
        answer = await _send(http, call)
        assert answer.status == (400 if tag == "NO_SUCH_TAG" else 422), answer.body
        check(path, method, call, answer)


#: What replaces one value at a time: every nasty string, and JSON values of every type.
ODD_VALUES: tuple[Any, ...] = (
    *NASTY_STRINGS,
    *CRAFTED_CURSORS,
    2**70,
    -1,
    0,
    1.5,
    [],
    {},
    None,
    True,
)


async def test_one_odd_value_at_a_time(http: TestClient[Any, Any], world: World) -> None:
    """Each agent and widget operation's good request, with one part (a path, query or header
    parameter, a body field, the body itself, the token) replaced by each odd value."""
    goods = [g for g in await _good_requests(world, http) if (g.path, g.method) in FUZZED]
    sent = 0
    failures: list[str] = []
    lanes = asyncio.Semaphore(8)  # requests in flight: the answers must not depend on order
    # Every operation of a kind checks the token and reads X-Request-Id with the same code:
    # each is swept on the first operation that has it.
    swept: set[str] = set()
    for good in goods:
        operation = DOC["paths"][good.path][good.method]
        params = [
            param
            for param in map(functools.partial(resolve, DOC), operation["parameters"])
            if param["name"] != "X-Request-Id" or "X-Request-Id" not in swept
        ]
        security = repr(operation["security"])
        sweep_auth = bool(operation["security"]) and security not in swept
        swept |= {"X-Request-Id", security}
        calls: list[Call] = []
        for value in ODD_VALUES:
            text = _param_text(value)
            for param in params:
                name, where = param["name"], param["in"]
                if where == "path" and text not in ("", ".", ".."):
                    calls.append(good.call(path_params={name: text[:MAX_FIELD]}))
                elif where == "query":
                    calls.append(good.call(query={**good.query, name: text[:MAX_FIELD]}))
                elif where == "header":
                    calls.append(good.call(headers={**good.headers, name: _header_safe(text)}))
            if "requestBody" in operation:
                calls.append(good.call(body=value if value is not None else "null"))
                schema = resolve(
                    DOC, operation["requestBody"]["content"]["application/json"]["schema"]
                )
                for name in schema.get("properties", {}):
                    calls.append(good.call(body={**(good.body or {}), name: value}))
            if sweep_auth:
                auth = _header_safe(f"Bearer {text}")
                calls.append(good.call(headers={**good.headers, "Authorization": auth}))

        async def one(call: Call, path: str = good.path, method: str = good.method) -> None:
            async with lanes:
                answer = await _send(http, call)
            try:
                check(path, method, call, answer)
            except AssertionError as exc:
                failures.append(str(exc).partition("\n")[0][:600])

        await asyncio.gather(*(one(call) for call in calls))
        sent += len(calls)
    assert not failures, f"{len(failures)} of {sent} answers not as documented:\n" + "\n".join(
        failures[:40]
    )
    assert sent > 3000


#: Header values that are not UTF-8 (HTTP allows any byte from 0x80 up as obs-text): aiohttp
#: decodes them with surrogate escapes, which encode() then refuses.
NOT_UTF8 = (b"\xff\xfe", b"Bearer \xb2", b"Bearer gu\xe9st.\xc3(", b"2\x80")


def _raw_request(call: Call, name: str, value: bytes) -> bytes:
    """``call`` as HTTP/1.1 bytes, with header ``name`` set to ``value`` as is."""
    target = call.url + ("?" + urlencode(call.params) if call.params else "")
    lines = [f"{call.method} {target} HTTP/1.1".encode(), b"Host: localhost"]
    headers = {k: v for k, v in call.headers.items() if k.lower() != name.lower()}
    lines += [f"{k}: {v}".encode() for k, v in headers.items()]
    lines += [name.encode() + b": " + value, b"Connection: close"]
    if call.body is not None:
        lines.append(f"Content-Length: {len(call.body)}".encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + (call.body or b"")


async def _send_raw(http: TestClient[Any, Any], request: bytes) -> Answer:
    """Send raw bytes; the answer as aiohttp's client would show it."""
    reader, writer = await asyncio.open_connection(http.host, http.port)
    try:
        writer.write(request)
        await writer.drain()
        data = await reader.read()  # Connection: close
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = CIMultiDict(line.split(": ", 1) for line in header_lines)
    content_type = headers.get("Content-Type", "").partition(";")[0].strip()
    return Answer(int(status_line.split()[1]), content_type, headers, body)


async def test_header_values_that_are_not_utf8(http: TestClient[Any, Any], world: World) -> None:
    """Every header an agent or widget operation reads, and its token, sent as bytes that are
    not UTF-8 (which aiohttp's client cannot send): answered as documented."""
    goods = [g for g in await _good_requests(world, http) if (g.path, g.method) in FUZZED]
    failures: list[str] = []
    for good in goods:
        operation = DOC["paths"][good.path][good.method]
        names = [
            param["name"]
            for param in map(functools.partial(resolve, DOC), operation["parameters"])
            if param["in"] == "header"
        ]
        if operation["security"]:
            names.append("Authorization")
        for name in names:
            for value in NOT_UTF8:
                call = good.call()
                answer = await _send_raw(http, _raw_request(call, name, value))
                try:
                    check(good.path, good.method, call, answer)
                except AssertionError as exc:
                    failures.append(f"{name}: {value!r}: " + str(exc).partition("\n")[0][:300])
    assert not failures, "\n".join(failures)


async def test_a_messages_cursor_with_a_digit_that_is_not_ascii(
    http: TestClient[Any, Any], world: World
) -> None:
    path, method = "/api/conversations/{id}/messages", "get"
    good = Good(path, method, {"id": world.conversations[0]}, query={"before": _cursor("m", "²")})
    call = good.call()
    check(path, method, call, await _send(http, call))
