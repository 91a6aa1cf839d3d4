"""Every error leaves the edge here, OpenAI-shaped: ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

import logging
import math

import msgspec
import nats.errors
from aiohttp import web

from bus.errors import NoCapacity, RateLimited, TollgateError
from bus.openai_types import ErrorBody, ErrorResponse

log = logging.getLogger(__name__)



def _error_json(exc: TollgateError) -> bytes:
    return msgspec.json.encode(ErrorResponse(ErrorBody(exc.message, exc.type, exc.param, exc.code)))


def error_response(exc: TollgateError, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=exc.status, body=_error_json(exc), content_type="application/json", headers=headers)


def error_event(exc: TollgateError) -> bytes:
    """The SSE event that reports an error after a stream has begun."""
    return b"data: " + _error_json(exc) + b"\n\n"


_HTTP_TYPES = {404: ("invalid_request_error", "unknown_url"), 405: ("invalid_request_error", "method_not_allowed"),
               413: ("invalid_request_error", "request_too_large")}


@web.middleware
async def error_middleware(request: web.Request, handler):
    """Map typed errors, aiohttp's own HTTP errors and any bug to one OpenAI-shaped body."""
    try:
        return await handler(request)
    except RateLimited as exc:
        return error_response(exc, {"Retry-After": str(math.ceil(exc.retry_after_s))})
    except TollgateError as exc:
        request_id = getattr(exc, "request_id", None)
        return error_response(exc, {"x-request-id": request_id} if request_id else None)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        type_, code = _HTTP_TYPES.get(exc.status, ("invalid_request_error", None))
        err = TollgateError(f"{exc.reason}: {request.method} {request.path}", code=code)
        err.status, err.type = exc.status, type_
        return error_response(err)
    except nats.errors.Error:
        log.exception("the bus failed on %s %s", request.method, request.path)
        return error_response(NoCapacity("The gateway's message bus is unavailable right now. Try again shortly."))
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(TollgateError("The server had an error while processing your request."))
