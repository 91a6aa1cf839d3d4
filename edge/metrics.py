"""The edge's Prometheus metrics: requests, latency, time to first output, refusals, requests in flight.

Labels stay bounded: a route is its pattern in the route table (never the raw path), a model
and a lane are recorded only once admission has checked them against settings (``admitted``),
and a refusal's reason is one of a fixed few. No tenant or key is ever a label.
"""

from __future__ import annotations

import asyncio
import time
from contextvars import ContextVar

import nats.errors
from aiohttp import web
from prometheus_client import Counter, Gauge, Histogram

from bus.errors import InsufficientQuota, NoCapacity, QueueFull, RateLimited, TollgateError
from bus.metrics import SECONDS_BUCKETS, serve_metrics
from bus.settings import Settings

REQUESTS = Counter("tollgate_edge_requests", "HTTP requests answered, by route, model, lane and status",
                   ["route", "model", "lane", "status"])
LATENCY = Histogram("tollgate_edge_request_seconds", "Time to answer a request in full (a stream to its end)",
                    ["route", "model"], buckets=SECONDS_BUCKETS)
FIRST_OUTPUT = Histogram("tollgate_edge_first_output_seconds",
                         "Time from a request's arrival to its first output from the model (time to first token)",
                         ["model"], buckets=SECONDS_BUCKETS)
REFUSALS = Counter("tollgate_edge_refusals", "Requests refused before they ran, by reason", ["reason"])
IN_FLIGHT = Gauge("tollgate_edge_requests_in_flight", "Requests this edge is answering now", ["route"])

# What admission settled for the request being answered: (model, lane). A request runs in one
# task, so the middleware reads back what ``Gate.admit`` set further down the same task.
_ADMITTED: ContextVar[tuple[str, str]] = ContextVar("tollgate_admitted", default=("", ""))
_ARRIVED = web.RequestKey("tollgate_arrived", float)
_UNMATCHED = "unmatched"  # 404s: the raw path is never a label
CLIENT_GONE = 499  # the client went away before its answer (nginx's code for it)


def admitted(model: str, lane: str) -> None:
    """Record that the current request was admitted for ``model`` on ``lane`` (both checked against settings)."""
    _ADMITTED.set((model, lane))


def first_output(request: web.Request, model: str) -> None:
    """Record the time from ``request``'s arrival to its first output from ``model``."""
    FIRST_OUTPUT.labels(model).observe(time.monotonic() - request[_ARRIVED])


def refusal_reason(exc: TollgateError) -> str | None:
    """Why admission or the queue turned a request away, or None if ``exc`` is no refusal."""
    if isinstance(exc, RateLimited):
        return "rate_limit"
    if isinstance(exc, InsufficientQuota):
        return "budget" if exc.code == "budget_exceeded" else "credits"
    if isinstance(exc, QueueFull):
        return "queue_full"
    if isinstance(exc, NoCapacity) and exc.code == "model_unavailable":
        return "no_worker"
    return None


def route_pattern(request: web.Request) -> str:
    """The route table's pattern the request matched (``unmatched`` for none): a bounded name for it."""
    resource = request.match_info.route.resource
    return _UNMATCHED if resource is None else resource.canonical


@web.middleware
async def metrics_middleware(request: web.Request, handler):
    """Count and time every request; sits inside ``error_middleware`` so it sees typed errors as raised."""
    request[_ARRIVED] = started = time.monotonic()
    route = route_pattern(request)
    token = _ADMITTED.set(("", ""))
    status = 500  # a bug or a cancelled request unless the handler says otherwise
    IN_FLIGHT.labels(route).inc()
    try:
        response = await handler(request)
        status = response.status
        return response
    except TollgateError as exc:
        status = exc.status
        reason = refusal_reason(exc)
        if reason is not None:
            REFUSALS.labels(reason).inc()
        raise
    except web.HTTPException as exc:
        status = exc.status
        raise
    except nats.errors.Error:
        status = 503  # error_middleware answers it bus_unavailable
        raise
    except asyncio.CancelledError:
        status = CLIENT_GONE
        raise
    finally:
        IN_FLIGHT.labels(route).dec()
        model, lane = _ADMITTED.get()
        _ADMITTED.reset(token)
        REQUESTS.labels(route, model, lane, str(status)).inc()
        LATENCY.labels(route, model).observe(time.monotonic() - started)


def exposed(settings: Settings):
    """A cleanup context serving the edge's ``/metrics`` on ``edge.metrics_port`` (0: none) for the app's life."""
    async def listener(_app: web.Application):
        runner = await serve_metrics(settings.processes.metrics_host, settings.edge.metrics_port)
        yield
        if runner is not None:
            await runner.cleanup()
    return listener
