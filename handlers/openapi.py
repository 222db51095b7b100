"""The OpenAPI 3.1 document of every route, served at ``GET /openapi.json``.

Request and response bodies are the msgspec Structs the handlers decode and encode, turned into
JSON Schema (2020-12, as OpenAPI 3.1 uses) by ``msgspec.json.schema_components``; where a
handler builds a dict, a Struct below names the same fields. Paths, parameters, security and
the statuses each route can answer are written out here. Two tests keep the document true:
``tests/test_openapi.py`` fails when a route the app registers is not documented (or the other
way round), and ``tests/test_openapi_fuzz.py`` sends generated valid and invalid requests to the
real server and checks that every answer's status, headers and body are documented.
"""

from __future__ import annotations

import datetime as dt
import functools
import uuid
from importlib import metadata
from typing import Any, Final, Literal

import msgspec
from aiohttp import web

from conversations.service import MAX_ID, MAX_TEXT
from projections.queries import MAX_PAGE, Conversation, Message, Page, StatusCounts

from . import agent, meta, telegram, widget

__all__ = ["add_routes", "document"]

#: The connection names ``convstore connections add`` accepts (``conversations.connections``).
CONNECTION_NAME: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
#: The most characters of a cursor the handlers accept.
MAX_CURSOR: Final = 500


# --------------------------------------------------------------------------- response bodies
# The bodies handlers build as dicts, named here field for field.


class Error(msgspec.Struct, frozen=True):
    """Every error: a stable ``error`` code, a ``message`` for people, and, for some, more.

    Codes: ``invalid_field``, ``malformed_json``, ``invalid_query``, ``invalid_header``,
    ``missing_header``, ``invalid_request`` (400); ``unauthorized`` (401); ``forbidden``
    (403); ``not_found``, ``not_projected`` (404); ``version_conflict``, ``invalid_state``,
    ``conflict`` (409); ``body_too_large`` (413); ``unsupported_media_type`` (415);
    ``messaging_window_closed`` (422); ``unavailable``, ``read_model_missing``,
    ``schema_mismatch`` (503).
    """

    error: str
    message: str
    #: the request field at fault (``invalid_field``), when one is
    field: str | None | msgspec.UnsetType = msgspec.UNSET
    #: the stream's version now (``version_conflict``, ``invalid_state``): send it in If-Match
    current_version: int | msgspec.UnsetType = msgspec.UNSET
    #: the state that refused the command (``invalid_state``)
    state: str | msgspec.UnsetType = msgspec.UNSET
    #: when the customer last wrote (``messaging_window_closed``; null: never)
    last_customer_message_at: dt.datetime | None | msgspec.UnsetType = msgspec.UNSET
    #: the message tags that would let the reply through (``messaging_window_closed``)
    permitted_tags: list[str] | msgspec.UnsetType = msgspec.UNSET


class Health(msgspec.Struct, frozen=True):
    """``/healthz`` and ``/readyz`` when all is well."""

    status: Literal["ok", "ready"]


class CommandResponse(msgspec.Struct, frozen=True):
    """A conversation command's outcome: the stream's new ``version`` (also in ``ETag``).

    ``duplicate``: nothing new was stored (a retried reply, a no-op command).
    """

    conversation_id: uuid.UUID
    version: int
    event_ids: list[uuid.UUID]
    duplicate: bool


class ConversationWithVersion(Conversation, frozen=True):
    """A conversation as the inbox shows it, with its stream ``version`` for ``If-Match``."""

    version: int


class ContactResponse(msgspec.Struct, frozen=True):
    """The surviving contact after an identify or a merge; ``merged``: it is another one."""

    contact_id: uuid.UUID
    merged: bool


class GuestSignUpResponse(msgspec.Struct, frozen=True):
    """A new widget guest: send ``token`` as ``Authorization: Bearer <token>``."""

    guest_id: str
    contact_id: uuid.UUID
    token: str


class GuestMessageResponse(msgspec.Struct, frozen=True):
    """Where a guest's message landed; ``duplicate``: its client id was stored before."""

    conversation_id: uuid.UUID
    message_id: uuid.UUID
    duplicate: bool


class GuestHistoryItem(msgspec.Struct, frozen=True):
    """One message of the guest's history: ``in`` from the guest, ``out`` from the agents."""

    message_id: uuid.UUID
    direction: Literal["in", "out"]
    text: str | None
    sent_at: dt.datetime


class TelegramAck(msgspec.Struct, frozen=True):
    """The answer to a Telegram update: what became of it (no ``method``: not a Bot API call)."""

    ok: Literal[True]
    outcome: str


# Structs whose generated names are not good component names.
_NAMES: Final = {
    "projections.queries.Message": "Message",
    "handlers.telegram.Message": "TelegramMessage",
    "_Summary": "MetaDeliverySummary",
    "Page_Conversation_": "ConversationPage",
    "Page_Message_": "MessagePage",
    "Page_GuestHistoryItem_": "GuestHistoryPage",
}

_BODIES: Final[tuple[Any, ...]] = (
    Error,
    Health,
    CommandResponse,
    ConversationWithVersion,
    ContactResponse,
    GuestSignUpResponse,
    GuestMessageResponse,
    Page[GuestHistoryItem],
    TelegramAck,
    Page[Conversation],
    Page[Message],
    StatusCounts,
    meta._Summary,
    agent.CloseBody,
    agent.EmptyBody,
    agent.SnoozeBody,
    agent.ReadBody,
    agent.ReplyBody,
    agent.IdentifyBody,
    agent.MergeBody,
    widget.GuestSignUpBody,
    widget.GuestMessageBody,
    meta.MetaDelivery,
    telegram.Update,
)


def _rename(node: Any, names: dict[str, str]) -> Any:
    """``node`` with every ``$ref`` to a renamed component pointing at its new name."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                name = value.removeprefix("#/components/schemas/")
                out[key] = f"#/components/schemas/{names.get(name, name)}"
            else:
                out[key] = _rename(value, names)
        return out
    if isinstance(node, list):
        return [_rename(item, names) for item in node]
    return node


def _schemas() -> dict[str, Any]:
    """The body types as components: msgspec's JSON Schema, some renamed."""
    _, components = msgspec.json.schema_components(
        _BODIES, ref_template="#/components/schemas/{name}"
    )
    names = dict(_NAMES)
    return {names.get(name, name): _rename(schema, names) for name, schema in components.items()}


# --------------------------------------------------------------------------- building blocks


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _param(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/parameters/{name}"}


def _header(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/headers/{name}"}


#: Each response header component's header name.
_HEADER_NAMES: Final = {
    "XRequestId": "X-Request-Id",
    "ETag": "ETag",
    "ConflictETag": "ETag",
    "RetryAfter": "Retry-After",
}


def _response(
    description: str,
    schema: dict[str, Any] | None = None,
    *,
    media: str = "application/json",
    headers: tuple[str, ...] = (),
) -> dict[str, Any]:
    """A response; ``headers`` names components (``ETag``, ``RetryAfter``, ...)."""
    response: dict[str, Any] = {
        "description": description,
        "headers": {"X-Request-Id": _header("XRequestId")}
        | {_HEADER_NAMES[name]: _header(name) for name in headers},
    }
    if schema is not None:
        response["content"] = {media: {"schema": schema}}
    return response


_ERRORS: Final = {
    400: "The request is malformed: a field, query parameter, header or JSON body.",
    401: "A bearer token is missing or wrong.",
    403: "The request is not signed with, or does not carry, the connection's secret.",
    404: "No such connection, conversation or contact (a malformed id or name names none;"
    " an unknown but well-formed connection name has an empty inbox).",
    409: "The command conflicts with the conversation's state or version.",
    413: "The body is larger than 1 MiB.",
    415: "The body is not sent as application/json.",
    422: "Meta's messaging window is closed: the customer last wrote too long ago for a reply"
    " without one of permitted_tags.",
    503: "PostgreSQL is unavailable or its schema or read model is not ready; retry later.",
}


_ERROR_HEADERS: Final = {409: ("ConflictETag",), 503: ("RetryAfter",)}


def _errors(*statuses: int) -> dict[str, Any]:
    return {
        str(status): _response(
            _ERRORS[status], _ref("Error"), headers=_ERROR_HEADERS.get(status, ())
        )
        for status in statuses
    }


def _body(name: str, *, required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": _ref(name)}}}


def _operation(
    operation_id: str,
    summary: str,
    tag: str,
    responses: dict[str, Any],
    *,
    parameters: tuple[str, ...] = (),
    body: dict[str, Any] | None = None,
    security: list[dict[str, list[str]]] | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": operation_id,
        "summary": summary,
        "tags": [tag],
        "parameters": [_param(p) for p in (*parameters, "XRequestId")],
        "responses": responses,
    }
    if body is not None:
        op["requestBody"] = body
    if security is not None:
        op["security"] = security
    return op


def _preflight(operation_id: str) -> dict[str, Any]:
    """A widget route's CORS preflight (the widget runs on the customer's website)."""
    return _operation(
        operation_id,
        "CORS preflight: any origin may call the widget routes (a bearer token, no cookies)",
        "widget",
        {"204": _response("Allowed: Access-Control-Allow-* headers, no body.")} | _errors(404),
        parameters=("WidgetConnection",),
        security=_PUBLIC,
    )


_AGENT: Final[list[dict[str, list[str]]]] = [{"agentToken": []}]
_GUEST: Final[list[dict[str, list[str]]]] = [{"guestToken": []}]
_PUBLIC: Final[list[dict[str, list[str]]]] = []

# (path suffix, operationId, summary, body Struct name or None, body required)
_COMMANDS: Final = (
    ("close", "closeConversation", "Close a conversation", "CloseBody", False),
    ("reopen", "reopenConversation", "Reopen a closed conversation", "EmptyBody", False),
    (
        "snooze",
        "snoozeConversation",
        "Snooze until a time, or until the customer's next message",
        "SnoozeBody",
        False,
    ),
    ("unsnooze", "unsnoozeConversation", "End a snooze", "EmptyBody", False),
    ("read", "markConversationRead", "Mark read up to a message", "ReadBody", True),
    ("restore", "restoreConversation", "Undo a soft delete", "EmptyBody", False),
)


def _parameters() -> dict[str, Any]:
    def header(
        name: str, description: str, schema: dict[str, Any], required: bool = False
    ) -> dict[str, Any]:
        return {
            "name": name,
            "in": "header",
            "required": required,
            "description": description,
            "schema": schema,
        }

    def query(
        name: str, description: str, schema: dict[str, Any], required: bool = False
    ) -> dict[str, Any]:
        return {
            "name": name,
            "in": "query",
            "required": required,
            "description": description,
            "schema": schema,
        }

    def path(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": name,
            "in": "path",
            "required": True,
            "description": description,
            "schema": schema,
        }

    connection = {"type": "string", "pattern": CONNECTION_NAME}
    cursor = {"type": "string", "minLength": 1, "maxLength": MAX_CURSOR}
    return {
        "ConnectionId": path("id", "The connection's name.", connection),
        "ConversationId": path(
            "id", "The conversation's id.", {"type": "string", "format": "uuid"}
        ),
        "ContactId": path("id", "The contact's id.", {"type": "string", "format": "uuid"}),
        "WidgetConnection": path("connection", "The widget connection's name.", connection),
        "TelegramConnection": path("connection", "The bot's connection name.", connection),
        "Status": query(
            "status",
            "Comma-separated statuses (open, snoozed, closed), or all. A snooze that has run"
            " out counts as open.",
            {
                "type": "string",
                "default": "open",
                "pattern": r"^(all|(open|snoozed|closed)(,(open|snoozed|closed))*)$",
            },
        ),
        "Limit": query(
            "limit",
            "Items per page.",
            {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 50},
        ),
        "Cursor": query("cursor", "The previous page's next_cursor.", cursor),
        "Before": query("before", "The previous page's next_cursor.", cursor),
        "IfMatch": header(
            "If-Match",
            'The stream version the command expects, e.g. "3" (409 with current_version if'
            " it is another).",
            {"type": "string", "pattern": r'^\s*(W/)?"?[0-9]{1,18}"?\s*$'},
        ),
        "XAgentId": header(
            "X-Agent-Id",
            "Who acts (default api).",
            {"type": "string", "minLength": 1, "maxLength": 200},
        ),
        "IdempotencyKey": header(
            "Idempotency-Key",
            "The reply's key: a retry with the same key is stored once.",
            {"type": "string", "minLength": 1, "maxLength": 200},
            required=True,
        ),
        "XRequestId": header(
            "X-Request-Id",
            "Echoed in the response and logged (at most 64 characters kept).",
            {"type": "string"},
        ),
        "HubSignature": header(
            "X-Hub-Signature-256",
            "sha256=<hex HMAC-SHA256 of the raw body with the Meta app secret>.",
            {"type": "string", "pattern": "^sha256=[0-9a-fA-F]{64}$"},
            required=True,
        ),
        "TelegramSecret": header(
            "X-Telegram-Bot-Api-Secret-Token",
            "The secret_token given to setWebhook (the connection's secret token).",
            {"type": "string"},
            required=True,
        ),
        "HubMode": query("hub.mode", "Must be subscribe.", {"type": "string"}, required=True),
        "HubVerifyToken": query(
            "hub.verify_token",
            "A Meta connection's verify token.",
            {"type": "string"},
            required=True,
        ),
        "HubChallenge": query(
            "hub.challenge", "Echoed back as the body.", {"type": "string"}, required=True
        ),
    }


def _headers() -> dict[str, Any]:
    return {
        "XRequestId": {
            "description": "The request's X-Request-Id, or a new id.",
            "required": True,
            "schema": {"type": "string"},
        },
        "ETag": {
            "description": 'The conversation\'s stream version, quoted: "3".',
            "required": True,
            "schema": {"type": "string", "pattern": '^"[0-9]+"$'},
        },
        "ConflictETag": {
            "description": 'On a version_conflict, the current version, quoted: "3".',
            "required": False,
            "schema": {"type": "string", "pattern": '^"[0-9]+"$'},
        },
        "RetryAfter": {
            "description": "Seconds to wait before retrying.",
            "required": True,
            "schema": {"type": "string", "pattern": "^[0-9]+$"},
        },
    }


# --------------------------------------------------------------------------- the paths


def _paths() -> dict[str, Any]:
    def json(name: str, description: str, headers: tuple[str, ...] = ()) -> dict[str, Any]:
        return _response(description, _ref(name), headers=headers)

    command_errors = _errors(400, 401, 404, 409, 413, 415, 503)
    command_ok = {"200": json("CommandResponse", "The command's outcome.", headers=("ETag",))}
    command_params = ("ConversationId", "IfMatch", "XAgentId")
    paths: dict[str, Any] = {
        "/healthz": {
            "get": _operation(
                "healthz",
                "Liveness: the process answers",
                "operations",
                {"200": json("Health", "Alive.")},
                security=_PUBLIC,
            )
        },
        "/readyz": {
            "get": _operation(
                "readyz",
                "Readiness: the database answers and its schema is current",
                "operations",
                {"200": json("Health", "Ready.")} | _errors(503),
                security=_PUBLIC,
            )
        },
        "/metrics": {
            "get": _operation(
                "metrics",
                "Prometheus metrics (text exposition format)",
                "operations",
                {"200": _response("The metrics.", {"type": "string"}, media="text/plain")},
                security=_PUBLIC,
            )
        },
        "/openapi.json": {
            "get": _operation(
                "openapi",
                "This document",
                "operations",
                {"200": _response("The OpenAPI 3.1 document.", {"type": "object"})},
                security=_PUBLIC,
            )
        },
        "/webhooks/meta": {
            "get": _operation(
                "metaVerify",
                "Meta's subscription handshake: echoes hub.challenge",
                "webhooks",
                {"200": _response("The challenge.", {"type": "string"}, media="text/plain")}
                | _errors(400, 403, 503),
                parameters=("HubMode", "HubVerifyToken", "HubChallenge"),
                security=_PUBLIC,
            ),
            "post": _operation(
                "metaDelivery",
                "A Messenger or Instagram delivery; 200 once its events are durable",
                "webhooks",
                {"200": json("MetaDeliverySummary", "What the delivery carried.")}
                | _errors(400, 403, 413, 415, 503),
                parameters=("HubSignature",),
                body=_body("MetaDelivery"),
                security=_PUBLIC,
            ),
        },
        "/webhooks/telegram/{connection}": {
            "post": _operation(
                "telegramUpdate",
                "A Telegram update for one bot; 200 once its events are durable",
                "webhooks",
                {"200": json("TelegramAck", "Stored, or known to need nothing.")}
                | _errors(400, 403, 404, 413, 415, 503),
                parameters=("TelegramConnection", "TelegramSecret"),
                body=_body("Update"),
                security=_PUBLIC,
            )
        },
        "/widget/{connection}/guests": {
            "options": _preflight("widgetSignUpPreflight"),
            "post": _operation(
                "widgetSignUp",
                "Sign a guest up; returns its token",
                "widget",
                {"201": json("GuestSignUpResponse", "The new guest.")}
                | _errors(400, 404, 413, 415, 503),
                parameters=("WidgetConnection",),
                body=_body("GuestSignUpBody"),
                security=_PUBLIC,
            ),
        },
        "/widget/{connection}/messages": {
            "options": _preflight("widgetMessagesPreflight"),
            "get": _operation(
                "widgetHistory",
                "The guest's own messages, oldest first",
                "widget",
                {"200": json("GuestHistoryPage", "The guest's messages.")} | _errors(401, 404, 503),
                parameters=("WidgetConnection",),
                security=_GUEST,
            ),
            "post": _operation(
                "widgetPostMessage",
                "A guest's message, stored once per client_message_id",
                "widget",
                {
                    "201": json("GuestMessageResponse", "Stored."),
                    "200": json("GuestMessageResponse", "Stored before (a retry)."),
                }
                | _errors(400, 401, 404, 413, 415, 503),
                parameters=("WidgetConnection",),
                body=_body("GuestMessageBody"),
                security=_GUEST,
            ),
        },
        "/api/connections/{id}/inbox": {
            "get": _operation(
                "inbox",
                "A connection's conversations, newest activity first",
                "agent",
                {"200": json("ConversationPage", "One page.")} | _errors(400, 401, 404, 503),
                parameters=("ConnectionId", "Status", "Limit", "Cursor"),
                security=_AGENT,
            )
        },
        "/api/connections/{id}/counts": {
            "get": _operation(
                "counts",
                "A connection's visible conversations per status",
                "agent",
                {"200": json("StatusCounts", "The counts.")} | _errors(401, 404, 503),
                parameters=("ConnectionId",),
                security=_AGENT,
            )
        },
        "/api/conversations/{id}": {
            "get": _operation(
                "conversation",
                "One conversation, with its version (also in ETag)",
                "agent",
                {"200": json("ConversationWithVersion", "The conversation.", headers=("ETag",))}
                | _errors(401, 404, 503),
                parameters=("ConversationId",),
                security=_AGENT,
            ),
            "delete": _operation(
                "deleteConversation",
                "Soft-delete a conversation (restore undoes it)",
                "agent",
                command_ok | _errors(400, 401, 404, 409, 503),
                parameters=command_params,
                security=_AGENT,
            ),
        },
        "/api/conversations/{id}/messages": {
            "get": _operation(
                "messages",
                "A conversation's messages, newest first",
                "agent",
                {"200": json("MessagePage", "One page.")} | _errors(400, 401, 404, 503),
                parameters=("ConversationId", "Limit", "Before"),
                security=_AGENT,
            ),
            "post": _operation(
                "reply",
                "An agent's reply, stored once per Idempotency-Key",
                "agent",
                command_ok | command_errors | _errors(422),
                parameters=(*command_params, "IdempotencyKey"),
                body=_body("ReplyBody"),
                security=_AGENT,
            ),
        },
        "/api/contacts/{id}/conversations": {
            "get": _operation(
                "contactConversations",
                "A contact's conversations (merged contacts' too), newest first",
                "agent",
                {"200": json("ConversationPage", "One page.")} | _errors(400, 401, 404, 503),
                parameters=("ContactId", "Limit", "Cursor"),
                security=_AGENT,
            )
        },
        "/api/contacts/{id}/identify": {
            "post": _operation(
                "identifyContact",
                "Record who a contact is; a match merges it into the existing contact",
                "agent",
                {"200": json("ContactResponse", "The surviving contact.")} | command_errors,
                parameters=("ContactId",),
                body=_body("IdentifyBody"),
                security=_AGENT,
            )
        },
        "/api/contacts/{id}/merge": {
            "post": _operation(
                "mergeContacts",
                "Merge from_contact_id into this contact",
                "agent",
                {"200": json("ContactResponse", "The surviving contact.")} | command_errors,
                parameters=("ContactId",),
                body=_body("MergeBody"),
                security=_AGENT,
            )
        },
    }
    for suffix, operation_id, summary, name, required in _COMMANDS:
        paths[f"/api/conversations/{{id}}/{suffix}"] = {
            "post": _operation(
                operation_id,
                summary,
                "agent",
                command_ok | command_errors,
                parameters=command_params,
                body=_body(name, required=required),
                security=_AGENT,
            )
        }
    return paths


@functools.cache
def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document (built once; do not mutate it)."""
    schemas = _schemas()
    try:
        version = metadata.version("convstore")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a bare checkout
        version = "0.0.0"
    return {
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "info": {
            "title": "convstore",
            "version": version,
            "summary": "An event-sourced conversation store for multi-channel inboxes.",
            "description": (
                "Provider webhooks (Meta, Telegram), the website widget, and the agent API."
                " Every answer is JSON except /metrics and the Meta handshake; every error is"
                ' {"error": <code>, "message": <text>}. Limits: MAX_TEXT'
                f" {MAX_TEXT} characters of text, ids of at most {MAX_ID}."
            ),
        },
        "tags": [
            {"name": "agent", "description": "The agent API (bearer CONVSTORE_API_TOKEN)."},
            {"name": "widget", "description": "The website widget (guest tokens)."},
            {"name": "webhooks", "description": "Provider webhooks."},
            {"name": "operations", "description": "Health, readiness, metrics, this document."},
        ],
        "paths": _paths(),
        "components": {
            "schemas": schemas,
            "parameters": _parameters(),
            "headers": _headers(),
            "securitySchemes": {
                "agentToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "Authorization: Bearer <CONVSTORE_API_TOKEN>.",
                },
                "guestToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "<guest_id>.<hmac>",
                    "description": "The token POST /widget/{connection}/guests returned.",
                },
            },
        },
    }


@functools.cache
def _encoded() -> bytes:
    return msgspec.json.encode(document())


async def serve(request: web.Request) -> web.Response:
    """``GET /openapi.json``."""
    return web.Response(body=_encoded(), content_type="application/json")


def add_routes(app: web.Application) -> None:
    """Register ``GET /openapi.json``."""
    app.router.add_get("/openapi.json", serve)
