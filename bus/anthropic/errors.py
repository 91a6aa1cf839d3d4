"""Anthropic's error body: ``{"type": "error", "error": {"type": ..., "message": ...}}``."""

from __future__ import annotations

import msgspec

# Anthropic's error types by HTTP status; a status not listed is an api_error (5xx) or an invalid request.
_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error", 504: "timeout_error",
}


class ErrorDetail(msgspec.Struct):
    type: str
    message: str


class ErrorResponse(msgspec.Struct, tag="error", tag_field="type"):
    error: ErrorDetail


def error_body(status: int, message: str) -> ErrorResponse:
    """The Anthropic-shaped body of an error answered with HTTP ``status``."""
    default = "api_error" if status >= 500 else "invalid_request_error"
    return ErrorResponse(ErrorDetail(_TYPES.get(status, default), message))
