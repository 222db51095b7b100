"""The widget and the agent command API through a real aiohttp server on loopback."""

from __future__ import annotations

import io
from typing import Any

from aiohttp.test_utils import TestClient
from psycopg_pool import AsyncConnectionPool

from conversations.connections import add_connection
from tests.conftest import API_TOKEN

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


async def _widget(pool: AsyncConnectionPool[Any]) -> None:
    await add_connection(pool, "site", channel="widget", external_id="w1", secret_token="s3")


async def test_guest_flow_is_idempotent_and_private(
    http: TestClient[Any, Any], pool: AsyncConnectionPool[Any]
) -> None:
    await _widget(pool)
    a = await (await http.post("/widget/site/guests", json={"username": "ann"})).json()
    b = await (await http.post("/widget/site/guests", json={})).json()
    ha = {"Authorization": f"Bearer {a['token']}"}
    hb = {"Authorization": f"Bearer {b['token']}"}
    body = {"client_message_id": "c1", "text": "hi there 👋"}
    first = await http.post("/widget/site/messages", json=body, headers=ha)
    again = await http.post("/widget/site/messages", json=body, headers=ha)
    assert first.status == 201 and again.status == 200
    assert (await again.json())["duplicate"] is True
    await http.post(
        "/widget/site/messages", json={"client_message_id": "x", "text": "b's"}, headers=hb
    )
    mine = await (await http.get("/widget/site/messages", headers=ha)).json()
    assert [m["text"] for m in mine["items"]] == ["hi there 👋"]
    # a's token with b's guest id, or a forged token, is refused
    forged = {"Authorization": f"Bearer {b['guest_id']}.{a['token'].rpartition('.')[2]}"}
    assert (await http.get("/widget/site/messages", headers=forged)).status == 401
    assert (await http.get("/widget/site/messages")).status == 401


async def test_the_widget_may_be_called_from_any_website(
    http: TestClient[Any, Any], pool: AsyncConnectionPool[Any]
) -> None:
    # The widget runs on the customer's website: the browser asks first (a preflight), then
    # lets the page read an answer only when it carries Access-Control-Allow-Origin.
    await _widget(pool)
    origin = {"Origin": "https://shop.example"}
    for path in ("/widget/site/guests", "/widget/site/messages"):
        asked = await http.options(
            path,
            headers={
                **origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert asked.status == 204, path
        assert asked.headers["Access-Control-Allow-Origin"] == "*"
        assert "POST" in asked.headers["Access-Control-Allow-Methods"]
        allowed = asked.headers["Access-Control-Allow-Headers"].lower()
        assert "authorization" in allowed and "content-type" in allowed
    guest = await http.post("/widget/site/guests", json={}, headers=origin)
    assert guest.status == 201 and guest.headers["Access-Control-Allow-Origin"] == "*"
    token = {"Authorization": f"Bearer {(await guest.json())['token']}", **origin}
    body = {"client_message_id": "c1", "text": "hello"}
    sent = await http.post("/widget/site/messages", json=body, headers=token)
    assert sent.status == 201 and sent.headers["Access-Control-Allow-Origin"] == "*"
    # errors too, so the widget can read why
    refused = await http.get("/widget/site/messages", headers=origin)
    assert refused.status == 401 and refused.headers["Access-Control-Allow-Origin"] == "*"
    assert "Retry-After" in refused.headers["Access-Control-Expose-Headers"]
    # the agent API is not for other origins
    inbox = await http.get("/api/connections/site/inbox", headers=origin)
    assert inbox.status == 401 and "Access-Control-Allow-Origin" not in inbox.headers


async def test_agent_commands_need_the_token_and_honour_if_match(
    http: TestClient[Any, Any], pool: AsyncConnectionPool[Any]
) -> None:
    await _widget(pool)
    guest = await (await http.post("/widget/site/guests", json={})).json()
    sent = await http.post(
        "/widget/site/messages",
        json={"client_message_id": "c1", "text": "help"},
        headers={"Authorization": f"Bearer {guest['token']}"},
    )
    cid = (await sent.json())["conversation_id"]
    assert (await http.post(f"/api/conversations/{cid}/close")).status == 401
    stale = await http.post(f"/api/conversations/{cid}/close", headers={**AUTH, "If-Match": '"1"'})
    assert stale.status == 409
    assert (await stale.json())["current_version"] == 2
    closed = await http.post(
        f"/api/conversations/{cid}/close",
        json={"reason": "done"},
        headers={**AUTH, "If-Match": "2"},
    )
    assert closed.status == 200 and closed.headers["ETag"] == '"3"'
    reply = await http.post(
        f"/api/conversations/{cid}/messages", json={"text": "bye"}, headers=AUTH
    )
    assert reply.status == 400 and (await reply.json())["error"] == "missing_header"


async def test_bad_bodies_get_clear_4xx(
    http: TestClient[Any, Any], pool: AsyncConnectionPool[Any]
) -> None:
    await _widget(pool)
    r = await http.post(
        "/widget/site/guests", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert r.status == 400 and (await r.json())["error"] == "malformed_json"
    r = await http.post("/widget/site/guests", data=b"{}", headers={"Content-Type": "text/plain"})
    assert r.status == 415
    r = await http.post("/widget/site/guests", json={"username": 5})
    assert r.status == 400 and "username" in (await r.json())["message"]
    r = await http.post(
        "/widget/site/guests",
        data=io.BytesIO(b"x" * (1024 * 1024 + 1)),
        headers={"Content-Type": "application/json"},
    )
    assert r.status == 413
    assert (await http.post("/widget/nope/guests", json={})).status == 404
    assert (await http.get("/healthz")).status == 200
    assert (await http.get("/readyz")).status == 200
    metrics = await (await http.get("/metrics")).text()
    assert "convstore_http_requests_total" in metrics


async def test_agent_reads_page_the_inbox_messages_and_contact(
    http: TestClient[Any, Any], pool: AsyncConnectionPool[Any]
) -> None:
    from projections import PROJECTIONS, catch_up

    await _widget(pool)
    guests = []
    for n in range(5):
        guest = await (await http.post("/widget/site/guests", json={})).json()
        headers = {"Authorization": f"Bearer {guest['token']}"}
        for m in range(3):
            r = await http.post(
                "/widget/site/messages",
                json={"client_message_id": f"{n}-{m}", "text": f"g{n} m{m}"},
                headers=headers,
            )
            assert r.status == 201
        guests.append(guest)
    await catch_up(pool, list(PROJECTIONS.values()))
    seen: list[str] = []
    cursor = None
    while True:
        query = {"status": "open", "limit": "2", **({"cursor": cursor} if cursor else {})}
        page = await (
            await http.get("/api/connections/site/inbox", params=query, headers=AUTH)
        ).json()
        seen.extend(item["conversation_id"] for item in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 5
    newest = seen[0]
    conv = await http.get(f"/api/conversations/{newest}", headers=AUTH)
    body = await conv.json()
    assert conv.status == 200 and body["message_count"] == 3 and body["version"] == 4
    assert body["unread_count"] == 3 and conv.headers["ETag"] == '"4"'
    msgs = await (
        await http.get(f"/api/conversations/{newest}/messages", params={"limit": "2"}, headers=AUTH)
    ).json()
    assert [m["text"] for m in msgs["items"]] == ["g4 m2", "g4 m1"]
    older = await (
        await http.get(
            f"/api/conversations/{newest}/messages",
            params={"limit": "2", "before": msgs["next_cursor"]},
            headers=AUTH,
        )
    ).json()
    assert [m["text"] for m in older["items"]] == ["g4 m0"] and older["next_cursor"] is None
    contact = guests[4]["contact_id"]
    mine = await (await http.get(f"/api/contacts/{contact}/conversations", headers=AUTH)).json()
    assert [c["conversation_id"] for c in mine["items"]] == [newest]
    bad = await http.get("/api/connections/site/inbox", params={"cursor": "junk"}, headers=AUTH)
    assert bad.status == 400
    assert (
        await http.get("/api/connections/site/inbox", params={"limit": "0"}, headers=AUTH)
    ).status == 400
    assert (await http.get(f"/api/conversations/{newest}")).status == 401
    missing = "00000000-0000-0000-0000-000000000000"
    assert (await http.get(f"/api/conversations/{missing}", headers=AUTH)).status == 404


async def test_connection_names_that_cannot_exist_are_404_not_500(
    http: TestClient[Any, Any],
) -> None:
    for path in ("/webhooks/telegram/%00", "/widget/%00/guests", "/webhooks/telegram/" + "x" * 80):
        r = await http.post(path, json={})
        assert r.status == 404, (path, r.status)


async def test_guest_tokens_hold_across_servers_and_restarts(
    database_url: str, pool: AsyncConnectionPool[Any]
) -> None:
    """Without a configured secret, the key is the deployment's (in the database), not a
    process's: a token from one server works on another, and after a restart."""
    from aiohttp.test_utils import TestServer

    from handlers.app import Settings, create_app

    await add_connection(pool, "open-site", channel="widget", external_id="w2")
    settings = Settings(database_url=database_url, api_token=API_TOKEN)
    async with TestClient(TestServer(create_app(settings), host="127.0.0.1")) as first:
        guest = await (await first.post("/widget/open-site/guests", json={})).json()
    token = {"Authorization": f"Bearer {guest['token']}"}
    for n in range(2):  # a restarted server, then one more beside it
        async with TestClient(TestServer(create_app(settings), host="127.0.0.1")) as server:
            sent = await server.post(
                "/widget/open-site/messages",
                json={"client_message_id": f"c{n}", "text": "still me"},
                headers=token,
            )
            assert sent.status == 201, await sent.text()
    async with pool.connection() as conn:
        keys = await (await conn.execute("SELECT count(*) FROM server_keys")).fetchone()
    assert keys == (1,)
