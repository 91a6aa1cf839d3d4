"""W3C trace context across the bus: a client's ``traceparent`` (or a new trace) rides in the envelope's
``trace`` carrier, its trace id lands in the request's usage row and in every log line written for it.

The current request's ``traceparent`` is a context variable: the edge sets it per HTTP request,
a worker per message it runs, and the publisher and the log filter read it from there.
"""

from __future__ import annotations

import logging
import os
import re
from contextvars import ContextVar

HEADER = "traceparent"
# version 00 (the only one defined); an all-zero trace or parent id is invalid (W3C Trace Context).
_TRACEPARENT = re.compile(r"00-(?!0{32})([0-9a-f]{32})-(?!0{16})([0-9a-f]{16})-([0-9a-f]{2})")

CURRENT: ContextVar[str] = ContextVar("tollgate_traceparent", default="")


def continued(header: str | None) -> str:
    """The ``traceparent`` this hop sends on: the caller's trace with a parent id of our own, or a new trace."""
    match = _TRACEPARENT.fullmatch(header.strip().lower()) if header else None
    trace_id, flags = (match.group(1), match.group(3)) if match else (os.urandom(16).hex(), "00")
    return f"00-{trace_id}-{os.urandom(8).hex()}-{flags}"


def carrier() -> dict[str, str]:
    """The envelope's ``trace`` carrier for the current request (a new trace if none is current)."""
    return {HEADER: CURRENT.get() or continued(None)}


def trace_id(carrier: dict[str, str]) -> str:
    """The trace id an envelope's carrier holds, or "" if it holds no valid ``traceparent``."""
    match = _TRACEPARENT.fullmatch(carrier.get(HEADER, ""))
    return match.group(1) if match else ""


class TraceIds(logging.Filter):
    """Gives every log record the current trace id as ``trace_id`` ("-" outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.trace_id = trace_id({HEADER: CURRENT.get()}) or "-"
        return True
