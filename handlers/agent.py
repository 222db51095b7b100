"""The agent API (bearer token): conversation commands and contact identification.

Every command honours ``If-Match: <version>`` (or ``"<version>"``) and answers 409 with the
current version on a conflict; responses carry the new version in the body and in ``ETag``.
"""

from __future__ import annotations

import datetime as dt
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import msgspec
from aiohttp import web

from conversations.service import CommandResult
from projections.queries import InboxQueries

from .app import METRICS, POOL, SERVICE, decode_json, json_response, require_api_token
from .errors import HTTPError

__all__ = [
    "add_routes",
    "agent_of",
    "connection_name",
    "conversation_id_of",
    "if_match",
    "text_header",
]


_T = TypeVar("_T", bound=msgspec.Struct)
#: ASCII digits only: str.isdigit() also accepts "²" and "٣", which int() refuses.
_DIGITS = re.compile(r"[0-9]+")
#: Text stored in an event: PostgreSQL's jsonb cannot hold U+0000, so it is refused by name.
NoNul = Annotated[str, msgspec.Meta(pattern=r"^[^\x00]*$")]


class CloseBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``POST /api/conversations/{id}/close``."""

    reason: NoNul | None = None


class EmptyBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Commands that take no fields."""


class SnoozeBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``POST .../snooze``: until a time, or (no ``until``) until the customer's next message."""

    until: dt.datetime | None = None


class ReadBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``POST .../read``: read up to and including this message."""

    up_to_message_id: uuid.UUID


class ReplyBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``POST .../messages``: an agent reply (with an ``Idempotency-Key`` header)."""

    text: str
    tag: NoNul | None = None


class IdentifyBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``POST /api/contacts/{id}/identify``."""

    client_id: str | None = None
    username: str | None = None
    email: str | None = None
    phone: str | None = None


class MergeBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``POST /api/contacts/{into}/merge``."""

    from_contact_id: uuid.UUID


def conversation_id_of(request: web.Request, name: str = "id") -> uuid.UUID:
    """The UUID in the path, or 404 (a malformed id names no conversation)."""
    try:
        return uuid.UUID(request.match_info[name])
    except ValueError:
        raise HTTPError(404, "not_found", f"no conversation {request.match_info[name]!r}") from None


def if_match(request: web.Request) -> int | None:
    """The version in ``If-Match``, if any; 400 when it is not a version."""
    raw = request.headers.get("If-Match")
    if raw is None:
        return None
    text = raw.strip().removeprefix("W/").strip('"')
    if not _DIGITS.fullmatch(text) or len(text) > 18:
        raise HTTPError(400, "invalid_header", 'If-Match must be a stream version, e.g. "3"')
    return int(text)


def text_header(request: web.Request, name: str, default: str = "") -> str:
    """A header's value, stripped; 400 when its bytes are not UTF-8 (aiohttp keeps such bytes
    as lone surrogates, which cannot be encoded again, hashed or stored)."""
    value = request.headers.get(name, default).strip()
    try:
        value.encode()
    except UnicodeEncodeError:
        raise HTTPError(400, "invalid_header", f"{name} must be UTF-8 text") from None
    return value


def agent_of(request: web.Request) -> str:
    """Who acts: ``X-Agent-Id`` (default ``api``)."""
    agent = text_header(request, "X-Agent-Id", "api")
    if not agent or len(agent) > 200:
        raise HTTPError(400, "invalid_header", "X-Agent-Id must be 1-200 characters")
    return agent


async def _body(request: web.Request, type_: type[_T]) -> _T:
    if not request.can_read_body:
        return msgspec.convert({}, type_)
    return await decode_json(request, type_)


def _result(result: CommandResult, status: int = 200) -> web.Response:
    return json_response(
        {
            "conversation_id": result.conversation_id,
            "version": result.version,
            "event_ids": result.event_ids,
            "duplicate": result.duplicate,
        },
        status=status,
        headers={"ETag": f'"{result.version}"'},
    )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _command(run: Callable[[web.Request, uuid.UUID, int | None, str], Awaitable[Any]]) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        require_api_token(request)
        conversation_id = conversation_id_of(request)
        started = time.perf_counter()
        result = await run(request, conversation_id, if_match(request), agent_of(request))
        request.app[METRICS].append_latency.labels("agent_command").observe(
            time.perf_counter() - started
        )
        return _result(result)

    return handler


async def _close(request: web.Request, cid: uuid.UUID, version: int | None, by: str) -> Any:
    body = await _body(request, CloseBody)
    return await request.app[SERVICE].close(
        cid, by=by, reason=body.reason, expected_version=version
    )


async def _reopen(request: web.Request, cid: uuid.UUID, version: int | None, by: str) -> Any:
    await _body(request, EmptyBody)
    return await request.app[SERVICE].reopen(cid, by=by, expected_version=version)


async def _snooze(request: web.Request, cid: uuid.UUID, version: int | None, by: str) -> Any:
    body = await _body(request, SnoozeBody)
    return await request.app[SERVICE].snooze(cid, by=by, until=body.until, expected_version=version)


async def _unsnooze(request: web.Request, cid: uuid.UUID, version: int | None, by: str) -> Any:
    await _body(request, EmptyBody)
    return await request.app[SERVICE].unsnooze(cid, by=by, expected_version=version)


async def _read(request: web.Request, cid: uuid.UUID, version: int | None, by: str) -> Any:
    body = await decode_json(request, ReadBody)
    return await request.app[SERVICE].mark_read(
        cid, by=by, up_to_message_id=body.up_to_message_id, expected_version=version
    )


async def _delete(request: web.Request, cid: uuid.UUID, version: int | None, by: str) -> Any:
    return await request.app[SERVICE].delete(cid, by=by, expected_version=version)


async def _restore(request: web.Request, cid: uuid.UUID, version: int | None, by: str) -> Any:
    await _body(request, EmptyBody)
    return await request.app[SERVICE].restore(cid, by=by, expected_version=version)


async def _reply(request: web.Request, cid: uuid.UUID, version: int | None, by: str) -> Any:
    key = text_header(request, "Idempotency-Key")
    if not key:
        raise HTTPError(400, "missing_header", "send an Idempotency-Key header with a reply")
    body = await decode_json(request, ReplyBody)
    result = await request.app[SERVICE].reply(
        cid, by=by, text=body.text, idempotency_key=key, expected_version=version, tag=body.tag
    )
    if not result.duplicate:
        request.app[METRICS].replies.labels("queued").inc()
    return result


async def identify(request: web.Request) -> web.Response:
    """Identify a contact; on a match it is merged into the existing contact."""
    require_api_token(request)
    contact_id = conversation_id_of(request)
    body = await decode_json(request, IdentifyBody)
    survivor = await request.app[SERVICE].identify(
        contact_id,
        client_id=body.client_id,
        username=body.username,
        email=body.email,
        phone=body.phone,
    )
    return json_response({"contact_id": survivor, "merged": survivor != contact_id})


async def merge(request: web.Request) -> web.Response:
    """Merge ``from_contact_id`` into the contact in the path."""
    require_api_token(request)
    into = conversation_id_of(request)
    body = await decode_json(request, MergeBody)
    survivor = await request.app[SERVICE].merge_contacts(body.from_contact_id, into)
    return json_response({"contact_id": survivor, "merged": True})


def connection_name(request: web.Request, key: str = "id") -> str:
    """The connection name in the path; 404 when no connection can have it (a NUL, which
    PostgreSQL text cannot hold)."""
    name = request.match_info[key]
    if "\x00" in name:
        raise HTTPError(404, "not_found", f"no connection {name!r}")
    return name


def _queries(request: web.Request) -> InboxQueries:
    return InboxQueries(request.app[POOL])


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", "50")
    if not _DIGITS.fullmatch(raw) or len(raw) > 3 or not 1 <= int(raw) <= 500:
        raise HTTPError(400, "invalid_query", "limit must be a whole number from 1 to 500")
    return int(raw)


def _cursor(request: web.Request, name: str = "cursor") -> str | None:
    value = request.query.get(name)
    if value is not None and (not value or len(value) > 500):
        raise HTTPError(400, "invalid_query", f"{name} is not a cursor of this list")
    return value


async def inbox(request: web.Request) -> web.Response:
    """A connection's inbox: ``?status=open|snoozed|closed|all&limit=&cursor=``."""
    require_api_token(request)
    status = request.query.get("status", "open")
    parts = [s for s in status.split(",") if s] or ["open"]
    statuses: str | list[str] = parts[0] if len(parts) == 1 else parts
    page = await _queries(request).inbox(
        connection_name(request), statuses, limit=_limit(request), cursor=_cursor(request)
    )
    return json_response(page)


async def conversation(request: web.Request) -> web.Response:
    """One conversation as the inbox shows it, with its stream version (for ``If-Match``)."""
    require_api_token(request)
    conversation_id = conversation_id_of(request)
    state = await request.app[SERVICE].conversation(conversation_id)
    row = await _queries(request).conversation(conversation_id)
    if row is None:
        raise HTTPError(
            404, "not_projected", f"conversation {conversation_id} is not in the inbox yet; retry"
        )
    body = {**msgspec.structs.asdict(row), "version": state.version}
    return json_response(body, headers={"ETag": f'"{state.version}"'})


async def messages(request: web.Request) -> web.Response:
    """A conversation's messages, newest first: ``?limit=&before=<cursor>``."""
    require_api_token(request)
    conversation_id = conversation_id_of(request)
    await request.app[SERVICE].conversation(conversation_id)  # 404 for an unknown id
    page = await _queries(request).messages(
        conversation_id, limit=_limit(request), cursor=_cursor(request, "before")
    )
    return json_response(page)


async def contact_conversations(request: web.Request) -> web.Response:
    """A contact's conversations, newest first (merged contacts' included)."""
    require_api_token(request)
    contact_id = conversation_id_of(request)
    page = await _queries(request).contact_conversations(
        contact_id, limit=_limit(request), cursor=_cursor(request)
    )
    return json_response(page)


async def counts(request: web.Request) -> web.Response:
    """Visible conversations per status for one connection."""
    require_api_token(request)
    name = connection_name(request)
    rows = await _queries(request).counts(name)
    return json_response(
        rows[0] if rows else {"connection": name, "open": 0, "snoozed": 0, "closed": 0}
    )


def add_routes(app: web.Application) -> None:
    """Register the agent API routes."""
    app.router.add_get("/api/connections/{id}/inbox", inbox)
    app.router.add_get("/api/connections/{id}/counts", counts)
    app.router.add_get("/api/conversations/{id}", conversation)
    app.router.add_get("/api/conversations/{id}/messages", messages)
    app.router.add_get("/api/contacts/{id}/conversations", contact_conversations)
    for suffix, run in (
        ("close", _close),
        ("reopen", _reopen),
        ("snooze", _snooze),
        ("unsnooze", _unsnooze),
        ("read", _read),
        ("restore", _restore),
    ):
        app.router.add_post(f"/api/conversations/{{id}}/{suffix}", _command(run))
    app.router.add_post("/api/conversations/{id}/messages", _command(_reply))
    app.router.add_delete("/api/conversations/{id}", _command(_delete))
    app.router.add_post("/api/contacts/{id}/identify", identify)
    app.router.add_post("/api/contacts/{id}/merge", merge)
