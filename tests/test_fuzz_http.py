"""Hostile input through the real server: only 4xx for bad input, never 5xx, nothing stored.

Hypothesis builds requests for every route that takes input (Meta and Telegram webhooks, the
widget, the agent API): valid-shaped bodies with fields dropped, added, or replaced by any JSON
value (huge integers, wrong types, NUL characters, lone surrogates, long strings), then, on some
of them, byte-level damage (truncation, invalid UTF-8, duplicate keys, deep nesting). Bodies are
signed or authorised correctly most of the time, so the checks run past the gates. Every answer
must be below 500; every 4xx must be a JSON error and leave the store exactly as it was
(:func:`tests.hostile.send`). Runs are repeatable: a fixed seed and a bounded number of
examples (``derandomize=True``), so CI sees the same cases every time.

The example tests below name the cases the reliability issue lists one by one.
"""

from __future__ import annotations

import io
import json
import uuid
from typing import Any
from urllib.parse import quote

import msgspec
import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from psycopg_pool import AsyncConnectionPool

from tests.hostile import (
    AGENT,
    BOT_SECRET,
    IG_ACCOUNT,
    IG_SECRET,
    PAGE,
    PAGE_SECRET,
    World,
    build_world,
    encode,
    footprint,
    meta_headers,
    send,
)

FUZZ = settings(
    derandomize=True,  # a fixed seed: CI runs the same examples every time
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
T0 = 1_700_000_000_000
MIB = 1024 * 1024
JSON = {"Content-Type": "application/json"}


@pytest.fixture
async def world(http: TestClient[Any, Any], pool: AsyncConnectionPool[Any]) -> World:
    """Connections, a guest who wrote once (so commands have a real target), another guest."""
    return await build_world(http, pool)


# --------------------------------------------------------------------------- strategies

#: Numbers a provider never sends: past 64 bits, negative, floats, specials.
hostile_numbers = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([2**63, -(2**63) - 1, 2**64, 10**30, -1, 0, 253_402_300_800_000]),
    st.floats(allow_nan=False, allow_infinity=False),
)
#: Strings with NUL, lone surrogates, control characters, emoji, and over-long ones.
hostile_text = st.one_of(
    st.text(max_size=30),
    st.text(st.characters(categories=["Cs", "Cc", "So"]), max_size=8),
    st.sampled_from(["", "\x00", "a\x00b", "\ud800", "\udfff x", "x" * 501, "y" * 20_001]),
)
#: Mostly JSON; sometimes another media type, JSON with parameters, or none at all.
content_types = st.sampled_from(
    ["application/json"] * 10
    + [
        "application/json; charset=utf-8",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "",
    ]
)
scalars = st.one_of(st.none(), st.booleans(), hostile_numbers, hostile_text)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=6,
)


def _slots(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON tree a mutation can touch, as paths of keys and indexes."""
    found = [path]
    if isinstance(value, dict):
        for key, child in value.items():
            found.extend(_slots(child, (*path, key)))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found.extend(_slots(child, (*path, index)))
    return found


@st.composite
def mutated(draw: st.DrawFn, template: Any, mutations: int = 3) -> Any:
    """``template`` with up to ``mutations`` fields dropped, replaced or added."""
    value = json.loads(json.dumps(template))
    for _ in range(draw(st.integers(0, mutations))):
        path = draw(st.sampled_from(_slots(value)))
        if not path:
            if draw(st.integers(0, 9)) == 0:
                value = draw(json_values)  # the whole body of the wrong shape
            continue
        parent = value
        for step in path[:-1]:
            parent = parent[step]
        key = path[-1]
        operation = draw(st.sampled_from(["drop", "replace", "replace", "extra"]))
        if operation == "drop":
            del parent[key]
        elif operation == "replace":
            parent[key] = draw(json_values)
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=10))] = draw(json_values)
        else:
            parent.append(draw(json_values))
    return value


@st.composite
def damaged(draw: st.DrawFn, value: Any) -> bytes:
    """The JSON bytes of ``value``, sometimes damaged on the byte level."""
    raw = encode(value, ascii_only=draw(st.booleans()))
    damage = draw(
        st.sampled_from(["none"] * 6 + ["truncate", "bad_utf8", "duplicate", "deep", "junk"])
    )
    if damage == "truncate" and raw:
        return raw[: draw(st.integers(0, len(raw) - 1))]
    if damage == "bad_utf8":
        at = draw(st.integers(0, len(raw)))
        return (
            raw[:at]
            + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80"]))
            + raw[at:]
        )
    if raw.startswith(b"{") and raw != b"{}":
        if damage == "duplicate":
            # the same key twice: a parser keeps one of them, and nothing may break
            first_key = raw[1 : raw.index(b":") + 1] if b":" in raw else b'"x":'
            return b"{" + first_key + encode(draw(json_values)) + b"," + raw[1:]
        if damage == "deep":
            depth = draw(st.sampled_from([100, 5_000, 100_000]))
            return b'{"deep":' + b"[" * depth + b"]" * depth + b"," + raw[1:]
    if damage == "junk":
        return draw(st.binary(max_size=40))
    return raw


def _meta_template(draw: st.DrawFn) -> dict[str, Any]:
    instagram = draw(st.booleans())
    account = IG_ACCOUNT if instagram else PAGE
    psid = f"PSID-{draw(st.integers(0, 3))}"
    item: dict[str, Any] = {
        "sender": {"id": psid},
        "recipient": {"id": account},
        "timestamp": T0 + draw(st.integers(0, 10**6)),
        "message": {"mid": f"m_{draw(st.integers(0, 10**9))}", "text": "hello"},
    }
    kind = draw(st.sampled_from(["text", "attachments", "echo", "read", "delivery", "reply"]))
    message = item["message"]
    if kind == "attachments":
        del message["text"]
        message["attachments"] = [{"type": "image", "payload": {"url": "https://x.test/1.jpg"}}]
    elif kind == "echo":
        item["sender"], item["recipient"] = item["recipient"], item["sender"]
        message["is_echo"] = True
    elif kind == "read":
        del item["message"]
        item["read"] = {"watermark": T0}
    elif kind == "delivery":
        del item["message"]
        item["delivery"] = {"mids": ["m_1"], "watermark": T0}
    elif kind == "reply":
        message["reply_to"] = {"mid": "m_1"}
        message["quick_reply"] = {"payload": "YES"}
    return {
        "object": "instagram" if instagram else "page",
        "entry": [{"id": account, "time": T0, "messaging": [item]}],
    }


@st.composite
def meta_requests(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    """A Meta delivery, signed with the right app secret most of the time."""
    template = _meta_template(draw)
    body = draw(damaged(draw(mutated(template))))
    secret = PAGE_SECRET if template["object"] == "page" else IG_SECRET
    signing = draw(st.sampled_from(["right"] * 8 + ["wrong", "garbage"]))
    if signing == "right":
        headers = meta_headers(body, secret)
    elif signing == "wrong":
        headers = meta_headers(body, "not-the-secret")
    else:
        header = draw(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80))
        headers = {**JSON, "X-Hub-Signature-256": header}
    return body, {**headers, "Content-Type": draw(content_types)}


@st.composite
def telegram_requests(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    """A Telegram update, with the bot's secret token most of the time."""
    chat = draw(st.integers(1, 5))
    message: dict[str, Any] = {
        "message_id": draw(st.integers(1, 10**6)),
        "from": {"id": chat, "is_bot": False, "first_name": "Ann"},
        "chat": {"id": chat, "type": "private"},
        "date": 1_700_000_000,
        "text": "hi",
    }
    kind = draw(st.sampled_from(["message", "edited_message", "photo", "document", "other"]))
    if kind == "photo":
        del message["text"]
        message["caption"] = "look"
        message["photo"] = [{"file_id": "p", "file_unique_id": "u", "width": 9, "height": 9}]
    elif kind == "document":
        message["document"] = {"file_id": "d", "file_name": "a.pdf", "mime_type": "x/y"}
    elif kind == "edited_message":
        message["edit_date"] = 1_700_000_060
    update: dict[str, Any] = {"update_id": draw(st.integers(0, 10**9))}
    if kind == "other":
        update["callback_query"] = {"id": "1", "data": "x"}
    else:
        update["edited_message" if kind == "edited_message" else "message"] = message
    body = draw(damaged(draw(mutated(update))))
    token = draw(st.sampled_from([BOT_SECRET] * 8 + ["wrong", ""]))
    return body, {"Content-Type": draw(content_types), "X-Telegram-Bot-Api-Secret-Token": token}


def guest_auth(world: World) -> st.SearchStrategy[dict[str, str]]:
    """The guest's token most of the time; else another widget's, a forgery, or nothing."""
    forged_mac = world.guest_token[:-1] + ("0" if world.guest_token[-1] != "0" else "1")
    tokens = [world.guest_token] * 6 + [
        world.other_guest_token,
        forged_mac,
        f"{world.other_guest_id}.{world.guest_token.rpartition('.')[2]}",
        "",
        "garbage",
    ]
    return st.sampled_from(
        [{"Authorization": f"Bearer {token}"} if token else {} for token in tokens]
    )


# --------------------------------------------------------------------------- fuzz tests


@settings(FUZZ, max_examples=300)
@given(request=meta_requests())
async def test_fuzz_meta_webhook(
    http: TestClient[Any, Any],
    pool: AsyncConnectionPool[Any],
    world: World,
    request: tuple[bytes, dict[str, str]],
) -> None:
    body, headers = request
    status, _ = await send(http, pool, "POST", "/webhooks/meta", data=body, headers=headers)
    event(f"status {status}")


@settings(FUZZ, max_examples=200)
@given(request=telegram_requests(), connection=st.sampled_from(["bot"] * 8 + ["site", "nobody"]))
async def test_fuzz_telegram_webhook(
    http: TestClient[Any, Any],
    pool: AsyncConnectionPool[Any],
    world: World,
    request: tuple[bytes, dict[str, str]],
    connection: str,
) -> None:
    body, headers = request
    status, _ = await send(
        http, pool, "POST", f"/webhooks/telegram/{connection}", data=body, headers=headers
    )
    event(f"status {status}")


@settings(FUZZ, max_examples=200)
@given(data=st.data())
async def test_fuzz_widget(
    http: TestClient[Any, Any], pool: AsyncConnectionPool[Any], world: World, data: st.DataObject
) -> None:
    draw = data.draw
    route = draw(st.sampled_from(["sign_up", "message", "message", "history"]))
    connection = draw(st.sampled_from(["site"] * 8 + ["other-site", "bot", "nobody"]))
    if route == "sign_up":
        template = {"username": "ann", "phone": "+33 6 00 00 00 00", "email": "a@x.test"}
        body = draw(damaged(draw(mutated(template))))
        status, _ = await send(
            http, pool, "POST", f"/widget/{connection}/guests", data=body, headers=JSON
        )
        event(f"sign-up status {status}")
        return
    headers = {**JSON, **draw(guest_auth(world))}
    if route == "history":
        status, _ = await send(http, pool, "GET", f"/widget/{connection}/messages", headers=headers)
        event(f"history status {status}")
        return
    template = {"client_message_id": f"c-{draw(st.integers(0, 50))}", "text": "hi"}
    body = draw(damaged(draw(mutated(template))))
    status, _ = await send(
        http, pool, "POST", f"/widget/{connection}/messages", data=body, headers=headers
    )
    event(f"message status {status}")


_COMMANDS = {
    "close": {"reason": "resolved"},
    "reopen": {},
    "snooze": {"until": "2031-01-01T00:00:00Z"},
    "unsnooze": {},
    "read": {"up_to_message_id": str(uuid.UUID(int=1))},
    "restore": {},
    "messages": {"text": "hello from the agent", "tag": "HUMAN_AGENT"},
}


@st.composite
def agent_requests(
    draw: st.DrawFn, world: World
) -> tuple[str, str, bytes | None, dict[str, str], dict[str, str]]:
    """(method, path, body, headers, query) of an agent API call, mostly authorised."""
    ident = draw(
        st.sampled_from(
            [world.conversation_id] * 4
            + [world.contact_id, str(uuid.UUID(int=7)), "not-a-uuid", quote("x\x00y", safe="")]
        )
    )
    headers = {**JSON, **AGENT}
    if draw(st.integers(0, 9)) == 0:
        del headers["Authorization"]
    printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30)
    for header in ("If-Match", "X-Agent-Id", "Idempotency-Key"):
        if draw(st.booleans()):
            headers[header] = draw(st.one_of(printable, st.sampled_from(['"1"', "2", "W/3"])))
    query: dict[str, str] = {}
    for name in ("limit", "cursor", "before", "status"):
        if draw(st.integers(0, 3)) == 0:
            query[name] = draw(st.one_of(printable, st.sampled_from(["1", "500", "all"])))
    kind = draw(st.sampled_from([*_COMMANDS, "delete", "identify", "merge", "get"]))
    body: bytes | None
    if kind == "get":
        path = draw(
            st.sampled_from(
                [
                    f"/api/conversations/{ident}",
                    f"/api/conversations/{ident}/messages",
                    f"/api/contacts/{ident}/conversations",
                    "/api/connections/site/inbox",
                    "/api/connections/site/counts",
                    "/api/connections/nobody/inbox",
                ]
            )
        )
        return "GET", path, None, headers, query
    if kind == "delete":
        return "DELETE", f"/api/conversations/{ident}", None, headers, query
    if kind == "identify":
        template: dict[str, Any] = {"client_id": "client-1", "email": "ann@x.test"}
        path = f"/api/contacts/{ident}/identify"
    elif kind == "merge":
        template = {"from_contact_id": str(uuid.UUID(int=9))}
        path = f"/api/contacts/{ident}/merge"
    else:
        template = _COMMANDS[kind]
        path = f"/api/conversations/{ident}/{kind}"
    body = draw(damaged(draw(mutated(template))))
    if draw(st.integers(0, 9)) == 0:
        body = None
    return "POST", path, body, headers, query


@settings(FUZZ, max_examples=400)
@given(data=st.data())
async def test_fuzz_agent_api(
    http: TestClient[Any, Any], pool: AsyncConnectionPool[Any], world: World, data: st.DataObject
) -> None:
    method, path, body, headers, query = data.draw(agent_requests(world))
    status, _ = await send(http, pool, method, path, data=body, headers=headers, params=query)
    event(f"{method} status {status}")


# --------------------------------------------------------------------------- named cases


def _json_routes(world: World) -> list[tuple[str, dict[str, str]]]:
    """Every route that decodes a JSON body, with the headers that pass its gate."""
    cid = world.conversation_id
    guest = {"Authorization": f"Bearer {world.guest_token}"}
    routes = [
        ("/widget/site/guests", {}),
        ("/widget/site/messages", guest),
        ("/webhooks/telegram/bot", {"X-Telegram-Bot-Api-Secret-Token": BOT_SECRET}),
        (f"/api/contacts/{world.contact_id}/identify", AGENT),
        (f"/api/contacts/{world.contact_id}/merge", AGENT),
    ]
    routes += [(f"/api/conversations/{cid}/{command}", AGENT) for command in _COMMANDS]
    return routes


async def _post_each(
    http: TestClient[Any, Any],
    pool: AsyncConnectionPool[Any],
    world: World,
    body: bytes,
    expected: int,
    extra: dict[str, str] | None = None,
) -> None:
    """POST ``body`` to every JSON route (and to Meta, signed): each answers ``expected``."""
    routes = [(path, {**JSON, **headers}) for path, headers in _json_routes(world)]
    routes.append(("/webhooks/meta", meta_headers(body)))
    for path, headers in routes:
        headers = {**headers, "Idempotency-Key": "k-1", **(extra or {})}
        status, answer = await send(http, pool, "POST", path, data=body, headers=headers)
        assert status == expected, (path, status, answer[:300])


async def test_deeply_nested_json_is_a_400(
    http: TestClient[Any, Any], pool: AsyncConnectionPool[Any], world: World
) -> None:
    for depth in (2_000, 200_000):
        nested = b"[" * depth + b"]" * depth
        await _post_each(http, pool, world, b'{"x":' + nested + b"}", 400)
        await _post_each(http, pool, world, nested, 400)


async def test_invalid_utf8_is_a_400(
    http: TestClient[Any, Any], pool: AsyncConnectionPool[Any], world: World
) -> None:
    for bad in (b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"):
        await _post_each(http, pool, world, b'{"text":"a' + bad + b'b"}', 400)
        await _post_each(http, pool, world, b'{"a' + bad + b'":1}', 400)
    # lone surrogates, escaped: valid JSON syntax, not text
    await _post_each(http, pool, world, b'{"text":"\\ud800"}', 400)


async def test_a_body_not_in_its_content_encoding_is_a_400(
    http: TestClient[Any, Any], pool: AsyncConnectionPool[Any], world: World
) -> None:
    """Plain JSON that says it is compressed cannot be read: the client's error, not ours."""
    for encoding in ("gzip", "deflate"):
        await _post_each(http, pool, world, b'{"text":"hi"}', 400, {"Content-Encoding": encoding})


async def test_oversized_bodies_are_a_413(
    http: TestClient[Any, Any], pool: AsyncConnectionPool[Any], world: World
) -> None:
    huge = b'{"text":"' + b"x" * MIB + b'"}'
    await _post_each(http, pool, world, huge, 413)
    # without a Content-Length (chunked), the limit holds all the same
    before = await footprint(pool)
    response = await http.post(
        "/widget/site/messages",
        data=io.BytesIO(huge),
        headers={**JSON, "Authorization": f"Bearer {world.guest_token}"},
    )
    assert response.status == 413
    assert (await response.json())["error"] == "body_too_large"
    assert await footprint(pool) == before


def _meta_message(text: str, mid: str = "m_nul", psid: str = "PSID-1") -> bytes:
    item = {
        "sender": {"id": psid},
        "recipient": {"id": PAGE},
        "timestamp": T0,
        "message": {"mid": mid, "text": text},
    }
    return encode({"object": "page", "entry": [{"id": PAGE, "messaging": [item]}]})


async def test_nul_characters_are_refused_with_a_clear_400(
    http: TestClient[Any, Any], pool: AsyncConnectionPool[Any], world: World
) -> None:
    """PostgreSQL's jsonb cannot hold U+0000: every text field refuses it, naming the field."""
    guest = {**JSON, "Authorization": f"Bearer {world.guest_token}"}
    tg = {**JSON, "X-Telegram-Bot-Api-Secret-Token": BOT_SECRET}
    update = {
        "update_id": 1,
        "message": {"message_id": 1, "date": 1, "chat": {"id": 5, "type": "private"}},
    }
    cid = world.conversation_id
    cases: list[tuple[str, bytes, dict[str, str], str]] = [
        ("/webhooks/meta", _meta_message("a\x00b"), {}, "text"),
        ("/webhooks/meta", _meta_message("ok", mid="m\x00"), {}, "mid"),
        ("/webhooks/meta", _meta_message("ok", psid="P\x00"), {}, "id"),
        ("/webhooks/telegram/bot", encode(_with(update, text="a\x00b")), tg, "text"),
        ("/webhooks/telegram/bot", encode(_with(update, caption="\x00")), tg, "caption"),
        ("/widget/site/guests", encode({"username": "a\x00"}), JSON, "username"),
        (
            "/widget/site/messages",
            encode({"client_message_id": "c", "text": "\x00"}),
            guest,
            "text",
        ),
        (
            "/widget/site/messages",
            encode({"client_message_id": "c\x00", "text": "x"}),
            guest,
            "client_message_id",
        ),
        (f"/api/conversations/{cid}/messages", encode({"text": "a\x00"}), AGENT, "text"),
        (
            f"/api/conversations/{cid}/messages",
            encode({"text": "ok", "tag": "\x00"}),
            AGENT,
            "tag",
        ),
        (f"/api/conversations/{cid}/close", encode({"reason": "\x00"}), AGENT, "reason"),
        (f"/api/contacts/{world.contact_id}/identify", encode({"email": "\x00"}), AGENT, "email"),
    ]
    for path, body, headers, field in cases:
        if path == "/webhooks/meta":
            headers = meta_headers(body)
        headers = {**JSON, **headers, "Idempotency-Key": "nul"}
        status, answer = await send(http, pool, "POST", path, data=body, headers=headers)
        error = msgspec.json.decode(answer)
        assert status == 400, (path, field, status, error)
        text = f"{error.get('field', '')} {error['message']}"
        assert field in text, (path, field, error)
        assert error["error"] in ("invalid_field", "invalid_request"), error


def _with(update: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {**update, "message": {**update["message"], **fields}}


#: Bodies with one number written as ``@``: each place a huge integer must be refused.
_NUMBER_SLOTS = (
    b'{"update_id": @, "message": {"message_id": 1, "date": 1, "chat": {"id": 5, "type":'
    b' "private"}, "text": "x"}}',
    b'{"update_id": 1, "message": {"message_id": @, "date": 1, "chat": {"id": 5, "type":'
    b' "private"}, "text": "x"}}',
    b'{"update_id": 1, "message": {"message_id": 1, "date": 1, "chat": {"id": @, "type":'
    b' "private"}, "text": "x"}}',
    b'{"update_id": 1, "message": {"message_id": 1, "date": @, "chat": {"id": 5, "type":'
    b' "private"}, "text": "x"}}',
    b'{"object": "page", "entry": [{"id": "' + PAGE.encode() + b'", "messaging": [{"sender":'
    b' {"id": "P"}, "timestamp": @, "message": {"mid": "m", "text": "x"}}]}]}',
)


async def test_huge_integers_are_a_400(
    http: TestClient[Any, Any], pool: AsyncConnectionPool[Any], world: World
) -> None:
    tg = {**JSON, "X-Telegram-Bot-Api-Secret-Token": BOT_SECRET}
    # past int64 both ways, 41 digits, and past Python's 4300-digit conversion limit
    for huge in (b"9223372036854775808", b"-9223372036854775809", b"1" + b"0" * 40, b"9" * 5000):
        for template in _NUMBER_SLOTS:
            body = template.replace(b"@", huge)
            if body.startswith(b'{"object"'):
                path, headers = "/webhooks/meta", meta_headers(body)
            else:
                path, headers = "/webhooks/telegram/bot", tg
            status, _ = await send(http, pool, "POST", path, data=body, headers=headers)
            assert status == 400, body[:120]
    # a huge number in a field convstore does not read is skipped, like any unknown field
    body = b'{"update_id": 1, "unknown": ' + b"9" * 5000 + b"}"
    status, _ = await send(http, pool, "POST", "/webhooks/telegram/bot", data=body, headers=tg)
    assert status == 200


async def test_duplicate_json_keys_keep_the_last_value_and_store_once(
    http: TestClient[Any, Any], pool: AsyncConnectionPool[Any], world: World
) -> None:
    """JSON with a key twice is read one way only (the last value), on every route."""
    item = (
        b'{"sender":{"id":"PSID-dup"},"recipient":{"id":"' + PAGE.encode() + b'"},'
        b'"timestamp":1700000000000,"message":{"mid":"m_dup","text":"first","text":"second"}}'
    )
    body = b'{"object":"page","object":"page","entry":[{"id":"' + PAGE.encode() + b'",'
    body += b'"messaging":[' + item + b"]}]}"
    for _ in range(2):
        status, answer = await send(
            http, pool, "POST", "/webhooks/meta", data=body, headers=meta_headers(body)
        )
        assert status == 200, answer
    guest = {**JSON, "Authorization": f"Bearer {world.guest_token}"}
    widget = b'{"client_message_id":"d1","text":"one","client_message_id":"d2","text":"two"}'
    status, _ = await send(http, pool, "POST", "/widget/site/messages", data=widget, headers=guest)
    assert status == 201
    async with pool.connection() as conn:
        rows = await (
            await conn.execute(
                "SELECT data->>'provider_message_id', data->>'text' FROM events"
                " WHERE type = 'MessageReceived' AND data->>'provider_message_id' IN (%s, %s)",
                ("m_dup", f"{world.guest_id}:d2"),
            )
        ).fetchall()
    assert sorted(rows) == sorted([("m_dup", "second"), (f"{world.guest_id}:d2", "two")])


async def test_missing_extra_and_mistyped_fields_are_a_400(
    http: TestClient[Any, Any], pool: AsyncConnectionPool[Any], world: World
) -> None:
    guest = {**JSON, "Authorization": f"Bearer {world.guest_token}"}
    cid = world.conversation_id
    cases: list[tuple[str, Any, dict[str, str]]] = [
        ("/widget/site/messages", {"text": "no id"}, guest),
        ("/widget/site/messages", {"client_message_id": "c", "text": "x", "psid": "P"}, guest),
        ("/widget/site/messages", {"client_message_id": 5, "text": "x"}, guest),
        ("/widget/site/messages", ["client_message_id", "text"], guest),
        ("/widget/site/guests", {"username": ["ann"]}, {}),
        ("/widget/site/guests", {"contact_id": str(uuid.uuid4())}, {}),
        (f"/api/conversations/{cid}/read", {}, AGENT),
        (f"/api/conversations/{cid}/read", {"up_to_message_id": "yesterday"}, AGENT),
        (f"/api/conversations/{cid}/snooze", {"until": 12}, AGENT),
        (f"/api/conversations/{cid}/close", {"reason": "x", "by": "root"}, AGENT),
        (f"/api/contacts/{world.contact_id}/merge", {"from_contact_id": 1}, AGENT),
    ]
    for path, value, headers in cases:
        status, answer = await send(
            http,
            pool,
            "POST",
            path,
            data=encode(value),
            headers={**JSON, **headers, "Idempotency-Key": "k"},
        )
        assert status == 400, (path, value, answer)
    bad_meta = [
        {"entry": []},  # no object
        {"object": "page", "entry": {"id": PAGE}},  # entry not a list
        {"object": "page", "entry": [{"id": 1029384756, "messaging": []}]},  # id not a string
    ]
    for value in bad_meta:
        body = encode(value)
        status, _ = await send(
            http, pool, "POST", "/webhooks/meta", data=body, headers=meta_headers(body)
        )
        assert status == 400, value
    # unknown fields from the provider are allowed (Meta and Telegram add fields all the time)
    extra = encode({"object": "page", "entry": [], "new_meta_field": {"x": [1, 2]}})
    status, _ = await send(
        http, pool, "POST", "/webhooks/meta", data=extra, headers=meta_headers(extra)
    )
    assert status == 200
