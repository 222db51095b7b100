"""Errors to HTTP responses, in one place: ``{"error": <code>, "message": <text>}``."""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from conversations.errors import (
    ConnectionExists,
    ConnectionNotFound,
    ContactNotFound,
    ConversationNotFound,
    InvalidCommand,
    InvalidTransition,
    MessagingWindowClosed,
    RetriesExhausted,
)
from eventstore.errors import (
    ConvstoreError,
    DatabaseUnavailable,
    DuplicateEvent,
    InvalidAppend,
    SchemaMismatch,
    WrongExpectedVersion,
)
from projections.base import ReadModelMissing
from projections.queries import InvalidQuery

__all__ = ["HTTPError", "error_response", "response_for"]

_ENCODER = msgspec.json.Encoder()

#: seconds a provider or client should wait before retrying when the database is away
RETRY_AFTER = "5"


class HTTPError(Exception):
    """Raised by handlers for a client error with a code and a message."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> web.Response:
    """A JSON error response."""
    body = {"error": code, "message": message, **extra}
    return web.Response(
        status=status,
        body=_ENCODER.encode(body),
        content_type="application/json",
        headers=headers,
    )


def response_for(exc: BaseException) -> web.Response | None:
    """The HTTP response for an error we know; ``None`` for anything else (a 500)."""
    if isinstance(exc, HTTPError):
        return error_response(exc.status, exc.code, exc.message, **exc.extra)
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return error_response(413, "body_too_large", "the request body is larger than 1 MiB")
    if isinstance(exc, msgspec.ValidationError):
        return error_response(400, "invalid_field", str(exc))
    if isinstance(exc, msgspec.DecodeError):
        return error_response(400, "malformed_json", f"the body is not valid JSON: {exc}")
    if not isinstance(exc, ConvstoreError):
        return None
    if isinstance(exc, InvalidCommand):
        return error_response(400, "invalid_field", str(exc), field=exc.field)
    if isinstance(exc, MessagingWindowClosed):
        return error_response(
            422,
            "messaging_window_closed",
            str(exc),
            last_customer_message_at=exc.last_customer_message_at,
            permitted_tags=list(exc.permitted_tags),
        )
    if isinstance(exc, InvalidQuery):
        return error_response(400, "invalid_query", str(exc))
    if isinstance(exc, ReadModelMissing):
        return error_response(
            503, "read_model_missing", str(exc), headers={"Retry-After": RETRY_AFTER}
        )
    if isinstance(exc, InvalidAppend):
        return error_response(400, "invalid_request", str(exc))
    if isinstance(exc, ConnectionNotFound | ConversationNotFound | ContactNotFound):
        return error_response(404, "not_found", str(exc))
    if isinstance(exc, WrongExpectedVersion):
        return error_response(
            409,
            "version_conflict",
            str(exc),
            current_version=exc.actual,
            headers={"ETag": f'"{exc.actual}"'},
        )
    if isinstance(exc, InvalidTransition):
        return error_response(
            409, "invalid_state", str(exc), state=exc.state, current_version=exc.version
        )
    if isinstance(exc, ConnectionExists | DuplicateEvent):
        return error_response(409, "conflict", str(exc))
    if isinstance(exc, DatabaseUnavailable | RetriesExhausted | SchemaMismatch):
        return error_response(
            503,
            "unavailable",
            "the database is unavailable; retry later",
            headers={"Retry-After": RETRY_AFTER},
        )
    return None
