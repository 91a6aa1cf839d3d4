"""The typed error hierarchy shared by every process.

Each error knows its OpenAI-shaped identity (HTTP status, ``type``, ``code``,
``param``). The edge maps it to an HTTP response in one place
(``edge.errors``); workers send it back over the bus as an ``ErrorInfo``
inside an error frame and the edge rebuilds the same error from it.
"""

from __future__ import annotations

import msgspec

# JetStream's error code when a stream (or one subject of it) is at its limit and refuses new messages.
JS_STREAM_FULL = 10077


class ErrorInfo(msgspec.Struct, frozen=True):
    """An error as it crosses a process boundary."""

    status: int
    type: str
    message: str
    code: str | None = None
    param: str | None = None


class TollgateError(Exception):
    """Base of every error a client or a bus peer may be told about."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def info(self) -> ErrorInfo:
        """Return the wire form of this error."""
        return ErrorInfo(self.status, self.type, self.message, self.code, self.param)

    @staticmethod
    def from_info(info: ErrorInfo) -> "TollgateError":
        """Rebuild an error received over the bus, keeping its status and codes."""
        cls = _BY_STATUS.get(info.status, TollgateError)
        err = cls(info.message, param=info.param, code=info.code)
        err.status, err.type = info.status, info.type
        return err


class InvalidRequest(TollgateError):
    status = 400
    type = "invalid_request_error"


class AuthenticationFailed(TollgateError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(TollgateError):
    status = 403
    type = "invalid_request_error"


class NotFound(TollgateError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Conflict(TollgateError):
    status = 409
    type = "invalid_request_error"
    code = "already_exists"


class RateLimited(TollgateError):
    """Over a rate limit; ``type`` says which (``requests`` or ``tokens``), as OpenAI does."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, kind: str, retry_after_s: float, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.type = kind
        self.retry_after_s = retry_after_s
        self.headers = headers or {}  # the limit that refused, as OpenAI's x-ratelimit-* headers say it


class InsufficientQuota(TollgateError):
    """Not enough prepaid credits (or budget) left for the request's maximum cost; OpenAI's 429."""

    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"


class WorkerFailed(TollgateError):
    """The worker running a request died or broke its reply stream."""

    status = 502
    type = "server_error"
    code = "worker_failed"


class NoCapacity(TollgateError):
    """No live worker serves the model."""

    status = 503
    type = "server_error"
    code = "model_unavailable"


class PayloadTooLarge(TollgateError):
    """A request body larger than the gateway (or its message bus) can carry."""

    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RequestTimeout(TollgateError):
    """A client that stopped sending its request body part-way."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class UsageServiceUnavailable(NoCapacity):
    """The usage query service (in the billing process) is not answering."""

    code = "usage_service_unavailable"


class QueueFull(NoCapacity):
    """The model's queue for this lane is full: refused at once, to be retried after ``retry_after_s``."""

    code = "queue_full"

    def __init__(self, message: str, *, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(TollgateError):
    status = 504
    type = "timeout"
    code = "deadline_exceeded"


class UpstreamFailed(TollgateError):
    """An upstream provider failed: its connection, a 5xx, or a stream cut short."""

    status = 502
    type = "server_error"
    code = "upstream_failed"


class UpstreamTimeout(TollgateError):
    """An upstream provider did not answer, or fell silent mid-stream, within its timeouts."""

    status = 504
    type = "timeout"
    code = "upstream_timeout"


class UpstreamRateLimited(TollgateError):
    """An upstream provider kept answering 429 after our retries."""

    status = 429
    type = "requests"
    code = "upstream_rate_limited"


class UpstreamUnavailable(NoCapacity):
    """An upstream provider refused this gateway itself (its key, its model name): the operator's to fix."""

    code = "upstream_unavailable"


class BadEnvelope(Exception):
    """A bus message that must be terminated unrun: malformed, forged, untrusted or expired."""


class BadUsage(BadEnvelope):
    """A usage report that must not be billed: unsigned, forged, or not bound to an admitted request."""


_BY_STATUS: dict[int, type[TollgateError]] = {
    cls.status: cls
    for cls in (InvalidRequest, AuthenticationFailed, PermissionDenied, NotFound, Conflict, WorkerFailed, NoCapacity, DeadlineExceeded)
}
