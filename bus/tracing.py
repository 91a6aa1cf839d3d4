"""W3C trace context across the bus, and the OpenTelemetry spans each process exports over OTLP/HTTP.

A client's ``traceparent`` (or a new trace) rides in the envelope's ``trace`` carrier, its trace id
lands in the request's usage row and in every log line written for it. The current request's
``traceparent`` is a context variable: the edge sets it per HTTP request, a worker per message it
runs, and the publisher and the log filter read it from there.

Spans are off unless ``[tracing] otlp_endpoint`` is set. A serving process (edge, worker, billing)
installs one tracer at its entry point (``install``); while none is installed every helper here
returns at once, without touching OpenTelemetry, which is not even imported. A span's parent is
always a ``traceparent`` string — the current one, or one given — so the spans of one request join
up the same way across processes as within one: the edge's server span is the parent the envelope
carries, and the worker's and billing's spans are its children.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import time
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterable, Mapping, TypeVar

if TYPE_CHECKING:
    from bus.protocol import Envelope, UsageEvent
    from bus.settings import TracingSettings

HEADER = "traceparent"
# version 00 (the only one defined); an all-zero trace or parent id is invalid (W3C Trace Context).
_TRACEPARENT = re.compile(r"00-(?!0{32})([0-9a-f]{32})-(?!0{16})([0-9a-f]{16})-([0-9a-f]{2})")

CURRENT: ContextVar[str] = ContextVar("tollgate_traceparent", default="")

_T = TypeVar("_T")


def continued(header: str | None) -> str:
    """The ``traceparent`` this hop sends on: the caller's trace with a parent id of our own, or a new trace."""
    match = _TRACEPARENT.fullmatch(header.strip().lower()) if header else None
    trace_id, flags = (match.group(1), match.group(3)) if match else (os.urandom(16).hex(), "00")
    return f"00-{trace_id}-{os.urandom(8).hex()}-{flags}"


def carrier() -> dict[str, str]:
    """The envelope's ``trace`` carrier for the current request (a new trace if none is current)."""
    return {HEADER: CURRENT.get() or continued(None)}


def trace_id(carrier: Mapping[str, str]) -> str:
    """The trace id an envelope's carrier (or a message's headers) holds, or "" if no valid ``traceparent``."""
    match = _TRACEPARENT.fullmatch(carrier.get(HEADER, ""))
    return match.group(1) if match else ""


class TraceIds(logging.Filter):
    """Gives every log record the current trace id as ``trace_id`` ("-" outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.trace_id = trace_id({HEADER: CURRENT.get()}) or "-"
        return True


class _Otel:
    """This process's tracer and the few OpenTelemetry names the helpers use, imported by ``install``."""

    def __init__(self, settings: TracingSettings, role: str, resource: Mapping[str, str]):
        from opentelemetry import context, trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        # A request whose traceparent says sampled (or not) is kept (or not) everywhere; new traces by ratio.
        self.provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
            resource=Resource.create({"service.name": f"{settings.service_name}-{role}", **resource}))
        # Export happens in the processor's thread; its queue is bounded (the oldest spans go when full).
        exporter = OTLPSpanExporter(endpoint=traces_url(settings.otlp_endpoint), timeout=settings.export_timeout_s)
        self.provider.add_span_processor(BatchSpanProcessor(
            exporter, max_queue_size=settings.max_queued_spans,
            max_export_batch_size=min(512, settings.max_queued_spans),
            schedule_delay_millis=settings.export_interval_s * 1000,
            export_timeout_millis=settings.export_timeout_s * 1000))
        self.tracer = self.provider.get_tracer("tollgate")
        self.root = context.Context()  # no parent: the span begins a trace
        self.kinds = {kind.name.lower(): kind for kind in trace.SpanKind}
        self.trace = trace

    def context(self, traceparent: str):
        """The context whose remote parent is ``traceparent``, or None if it does not parse."""
        match = _TRACEPARENT.fullmatch(traceparent.strip().lower())
        if match is None:
            return None
        trace = self.trace
        parent = trace.SpanContext(int(match.group(1), 16), int(match.group(2), 16), is_remote=True,
                                   trace_flags=trace.TraceFlags(int(match.group(3), 16)))
        return trace.set_span_in_context(trace.NonRecordingSpan(parent))

    def start(self, name: str, parent: Any, kind: str, start: float | None, attributes: Mapping[str, Any] | None):
        return self.tracer.start_span(name, parent, self.kinds[kind], attributes,
                                      start_time=None if start is None else round(start * 1e9))

    def failed(self, span, description: str) -> None:
        span.set_status(self.trace.Status(self.trace.StatusCode.ERROR, description))


_otel: _Otel | None = None  # None: tracing off, and every helper returns at once


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL for a collector's ``endpoint``: its base URL, or the traces URL itself."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else endpoint + "/v1/traces"


def install(settings: TracingSettings, role: str, **resource: str) -> None:
    """Export this process's spans as service ``<service_name>-<role>`` if ``settings`` name a collector.

    Called once at a process's entry point; ``resource`` adds attributes that describe the process."""
    global _otel
    if settings.otlp_endpoint:
        _otel = _Otel(settings, role, resource)


def uninstall() -> None:
    """Stop tracing and export the spans still queued: blocks until they are sent, at most about 30 s
    (the SDK's bound, reached only with the collector away), so call it in a thread."""
    global _otel
    otel, _otel = _otel, None
    if otel is not None:
        otel.provider.shutdown()


def enabled() -> bool:
    """Whether this process exports spans."""
    return _otel is not None


def _attributes(envelope: Envelope | None, attributes: Mapping[str, Any] | None) -> dict[str, Any] | None:
    # Two attributes name the request on each of its spans; the rest of it goes on the run span alone
    # (``finished``): every attribute costs the SDK a few microseconds on the request's path.
    if envelope is None:
        return attributes and dict(attributes)
    return {"tollgate.request_id": envelope.id, "tollgate.model": envelope.model, **(attributes or {})}


@contextlib.contextmanager
def _ended(otel: _Otel, span):
    """End ``span`` when the block leaves: a cancellation or a reader closing early is an event on it
    (its caller left: a client gone, a process stopping), any other exception a failure."""
    try:
        yield span
    except (GeneratorExit, asyncio.CancelledError):
        span.add_event("cancelled")
        raise
    except BaseException as exc:
        span.record_exception(exc)
        otel.failed(span, type(exc).__name__)
        raise
    finally:
        span.end()


@contextlib.contextmanager
def _current_span(otel: _Otel, name: str, parent: str, kind: str, attributes: dict[str, Any] | None):
    span = otel.start(name, otel.context(parent) or otel.root, kind, None, attributes)
    token = CURRENT.set(traceparent(span))  # its children, the envelope and log lines take it up
    try:
        with _ended(otel, span):
            yield span
    finally:
        CURRENT.reset(token)


def span(name: str, *, parent: str | None = None, kind: str = "internal", envelope: Envelope | None = None,
         attributes: Mapping[str, Any] | None = None) -> contextlib.AbstractContextManager:
    """A span around a block, child of ``parent`` (a ``traceparent``; the current one if None; a new
    trace if it does not parse), and the current ``traceparent`` inside it. An exception leaving the
    block marks it failed; a cancellation is only an event (the caller left). Yields the span, or None
    while tracing is off. ``envelope``: the request it is about, named in its attributes. ``kind``:
    internal, server, client, producer or consumer."""
    otel = _otel
    if otel is None:
        return contextlib.nullcontext()
    return _current_span(otel, name, CURRENT.get() if parent is None else parent, kind,
                         _attributes(envelope, attributes))


def traceparent(span) -> str:
    """The ``traceparent`` that makes ``span`` a child's parent."""
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def traced(name: str) -> Callable:
    """Decorate a coroutine function: each call runs in a span called ``name`` (see ``span``)."""
    def decorate(function):
        @functools.wraps(function)
        async def traced_call(*args, **kwargs):
            if _otel is None:
                return await function(*args, **kwargs)
            with span(name):
                return await function(*args, **kwargs)
        return traced_call
    return decorate


def record(name: str, start: float, end: float | None = None, *, parents: Iterable[str] | None = None,
           kind: str = "internal", envelope: Envelope | None = None,
           attributes: Mapping[str, Any] | None = None) -> None:
    """A span that has happened, from ``start`` to ``end`` (now if None; wall-clock seconds), child of
    the current ``traceparent``; or, given ``parents``, one such span under each of them that parses."""
    otel = _otel
    if otel is None:
        return
    end_ns = round((time.time() if end is None else end) * 1e9)
    attributes = _attributes(envelope, attributes)
    if parents is None:
        otel.start(name, otel.context(CURRENT.get()) or otel.root, kind, start, attributes).end(end_ns)
        return
    for parent in parents:
        context = otel.context(parent)
        if context is not None:
            otel.start(name, context, kind, start, attributes).end(end_ns)


def sent_in(headers: Mapping[str, str] | None, trace: str) -> str:
    """The ``traceparent`` a message's ``headers`` carry if it is in the trace ``trace``, else ""."""
    headers = headers or {}
    return headers[HEADER] if trace and trace_id(headers) == trace else ""


def finished(span, usage: UsageEvent) -> None:
    """Put a request's outcome, from its usage event, on its run ``span`` (None: tracing off); an error
    marks the span failed."""
    if span is None:
        return
    span.set_attributes({"tollgate.status": usage.status, "tollgate.tenant": usage.tenant, "tollgate.lane": usage.lane,
                         "tollgate.kind": usage.kind, "tollgate.input_units": usage.input_units,
                         "tollgate.output_units": usage.output_units})
    if usage.status == "error":
        failed(span, usage.error_code or "error")


def failed(span, description: str) -> None:
    """Mark ``span`` failed (its status an error), saying why; nothing once tracing has stopped."""
    otel = _otel
    if otel is not None:
        otel.failed(span, description)


def relayed(frames: AsyncIterator[_T], envelope: Envelope) -> AsyncIterator[_T]:
    """``frames`` as they are, timed by a ``tollgate.relay`` span from the first wait to the last frame,
    with a ``first frame`` event when the first one comes (``frames`` itself while tracing is off)."""
    return frames if _otel is None else _relay(_otel, frames, envelope)


async def _relay(otel: _Otel, frames: AsyncIterator[_T], envelope: Envelope) -> AsyncIterator[_T]:
    # Not made current: this generator may be closed from another context than it started in.
    span = otel.start("tollgate.relay", otel.context(CURRENT.get()) or otel.root, "internal", None,
                      _attributes(envelope, None))
    first = True
    with _ended(otel, span):
        async with contextlib.aclosing(frames):
            async for frame in frames:
                if first:
                    span.add_event("first frame")
                    first = False
                yield frame
