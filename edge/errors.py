"""Every error leaves the edge here, OpenAI-shaped: ``{"error": {message, type, param, code}}``; on
Anthropic's routes (``/v1/messages``) Anthropic-shaped: ``{"type": "error", "error": {type, message}}``."""

from __future__ import annotations

import logging
import math
from typing import Callable

import msgspec
import nats.errors
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from bus.anthropic.errors import error_body as anthropic_error_body
from bus.errors import InvalidRequest, NoCapacity, PayloadTooLarge, TollgateError
from bus.openai.errors import ErrorBody, ErrorResponse
from edge.bodies import body_deadline
from edge.forms import route_takes_form

log = logging.getLogger(__name__)

# Media types a JSON route takes. `application/octet-stream` is what HTTP libraries send for raw
# bytes with no type given; it labels nothing, so it is read as JSON like a body with no type.
_JSON_TYPES = ("application/json", "application/octet-stream")


def check_body(request: web.Request) -> None:
    """Refuse, before any work, a body the route cannot read as JSON or that is over the edge's limit.

    The bus carries anything under that limit (large bodies go by blob, bus/blobs.py).
    """
    if request.method not in ("POST", "PUT", "PATCH") or not request.body_exists:
        return
    if request.match_info.http_exception is not None:
        return  # no route: its 404 or 405 says more than anything about the body
    kind = request.content_type  # aiohttp's default when the header is absent is octet-stream
    form = route_takes_form(request)  # edge.forms.read_form takes its multipart body, or says what it wants
    if not form and kind not in _JSON_TYPES and not kind.endswith("+json"):
        raise InvalidRequest(f"Content-Type {kind} is not supported: send a JSON body with "
                             "Content-Type: application/json.", code="unsupported_content_type")
    if (request.content_length or 0) > request.client_max_size:
        raise _too_large(request.client_max_size)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The request body is larger than this gateway takes ({limit} bytes at most).")


def _error_json(exc: TollgateError) -> bytes:
    return msgspec.json.encode(ErrorResponse(ErrorBody(exc.message, exc.type, exc.param, exc.code)))


def _anthropic_json(exc: TollgateError) -> bytes:
    # Anthropic's body has no ``param``: the message names the field, as Anthropic's own do ("max_tokens: ...").
    message = exc.message if not exc.param or exc.param in exc.message else f"{exc.param}: {exc.message}"
    return msgspec.json.encode(anthropic_error_body(exc.status, message))


# Where Anthropic's clients call: their errors take Anthropic's shape (the status and the mapping are the same).
ANTHROPIC_PATHS = "/v1/messages"


def _shape(request: web.Request) -> Callable[[TollgateError], bytes]:
    return _anthropic_json if request.path.startswith(ANTHROPIC_PATHS) else _error_json


def error_response(exc: TollgateError, headers: dict[str, str] | None = None,
                   shape: Callable[[TollgateError], bytes] = _error_json) -> web.Response:
    return web.Response(status=exc.status, body=shape(exc), content_type="application/json", headers=headers)


def error_event(exc: TollgateError) -> bytes:
    """The SSE event that reports an error after a stream has begun."""
    return b"data: " + _error_json(exc) + b"\n\n"


def anthropic_error_event(exc: TollgateError) -> bytes:
    """The SSE event that reports an error after an Anthropic stream has begun (the SDK raises it)."""
    return b"event: error\ndata: " + _anthropic_json(exc) + b"\n\n"


_HTTP_TYPES = {404: ("invalid_request_error", "unknown_url"), 405: ("invalid_request_error", "method_not_allowed")}


@web.middleware
async def error_middleware(request: web.Request, handler):
    """Map typed errors, aiohttp's own HTTP errors and any bug to one error body, shaped for the route's API."""
    shape = _shape(request)
    try:
        check_body(request)
        async with body_deadline(request):  # a body that stops arriving is a 408, not a hang
            return await handler(request)
    except TollgateError as exc:
        headers = {}
        if getattr(exc, "request_id", None):
            headers["x-request-id"] = exc.request_id
        if getattr(exc, "retry_after_s", None) is not None:  # rate limits, a full queue
            headers["Retry-After"] = str(math.ceil(exc.retry_after_s))
        headers.update(getattr(exc, "headers", {}))  # a rate limit's x-ratelimit-*
        return error_response(exc, headers or None, shape)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 413:  # aiohttp's own, for a body sent without a Content-Length
            return error_response(_too_large(request.client_max_size), shape=shape)
        type_, code = _HTTP_TYPES.get(exc.status, ("invalid_request_error", None))
        err = TollgateError(f"{exc.reason}: {request.method} {request.path}", code=code)
        err.status, err.type = exc.status, type_
        return error_response(err, shape=shape)
    except RequestPayloadError as exc:  # a body whose Content-Encoding does not decode, or cut short
        return error_response(InvalidRequest(f"The request body could not be read: {exc.__cause__ or exc}",
                                             code="invalid_body"), shape=shape)
    except nats.errors.Error:
        log.exception("the bus failed on %s %s", request.method, request.path)
        return error_response(NoCapacity("The gateway's message bus is unavailable right now. Try again shortly.",
                                         code="bus_unavailable"), shape=shape)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(TollgateError("The server had an error while processing your request."), shape=shape)
