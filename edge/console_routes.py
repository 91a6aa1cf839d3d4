"""The built-in console: its static page under ``/console``, and the admin routes it reads that no
other module serves: lane queues, live workers and the latest dead letters.

The page's files (``edge/console/``) ship in the package and are served as they are (no build
step), under a Content-Security-Policy that lets the page run its own script and reach only this
edge. The page needs no token; everything it shows comes from ``/admin`` routes, which do.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Literal

import msgspec
import nats.js.errors
from aiohttp import web
from nats.js import JetStreamContext

from bus.dead_letters import REASON_HEADER, SUBJECT_HEADER
from bus.errors import NoCapacity
from bus.metrics import COLLECT_TIMEOUT_S
from bus.subjects import DEAD_LETTER_STREAM, LANES, REQUESTS_STREAM, work_consumer
from edge.admin import json_response
from edge.state import PUBLISHER, SETTINGS

_DIR = Path(__file__).with_name("console")
# The page's files, by the name it asks for: nothing else under the folder is ever served.
_TYPES = {"index.html": "text/html", "console.js": "text/javascript", "console.css": "text/css"}
_FILES = {name: (_DIR / name).read_bytes() for name in _TYPES}  # read once: they ship with the package
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
DEAD_LETTERS_SHOWN = 20  # the latest ones; the stream keeps the rest for an operator's tools
WORKERS_SHOWN = 1000


class LaneQueue(msgspec.Struct, frozen=True):
    """One lane of one model's queue as JetStream counts it."""

    model: str
    lane: str
    queued: int  # published and not yet taken by any worker
    running: int  # taken by a worker and not yet acknowledged


class DeadLetter(msgspec.Struct, frozen=True):
    """A message a consumer moved aside (bus/dead_letters.py), without its payload."""

    seq: int
    time: float  # unix seconds it was moved
    source: str  # what moved it: "usage" (billing) or "work" (a worker)
    subject: str  # where it was first published
    reason: str


class DeadLetters(msgspec.Struct, frozen=True):
    object: Literal["list"]
    total: int  # in the stream, of which ``data`` holds the latest
    data: list[DeadLetter]


routes = web.RouteTableDef()
# Mounted under /admin, behind the admin guard (edge.app).
admin_routes = web.RouteTableDef()


def _file(name: str) -> web.Response:
    if name not in _TYPES:
        raise web.HTTPNotFound()
    headers = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
    return web.Response(body=_FILES[name], content_type=_TYPES[name], charset="utf-8", headers=headers)


@routes.get("/console")
async def console(request: web.Request) -> web.Response:
    """The console page; it signs in with the admin token and reads the admin API."""
    return _file("index.html")


@routes.get("/console/{file}")
async def console_file(request: web.Request) -> web.Response:
    """The page's script and style sheet."""
    return _file(request.match_info["file"])


async def _bounded(work):
    """``work`` within the time a metrics scrape gives JetStream, or a 503 saying the bus is slow."""
    try:
        async with asyncio.timeout(COLLECT_TIMEOUT_S):
            return await work
    except TimeoutError:
        raise NoCapacity("The message bus did not answer in time. Try again shortly.", code="bus_unavailable") from None


async def _lane(js: JetStreamContext, model: str, lane: str) -> LaneQueue | None:
    try:
        info = await js.consumer_info(REQUESTS_STREAM, work_consumer(model, lane))
    except nats.js.errors.NotFoundError:  # no worker of the model has ever started: no queue yet
        return None
    return LaneQueue(model, lane, info.num_pending, info.num_ack_pending)


@admin_routes.get("/queues")
async def queues(request: web.Request) -> web.Response:
    """GET /admin/queues: every configured model's lanes, as the workers' shared consumers count them."""
    js = request.config_dict[PUBLISHER].js
    models = request.config_dict[SETTINGS].models
    found = await _bounded(asyncio.gather(*(_lane(js, model, lane) for model in models for lane in LANES)))
    return json_response({"object": "list", "data": [q for q in found if q is not None]})


@admin_routes.get("/workers")
async def workers(request: web.Request) -> web.Response:
    """GET /admin/workers: the workers announced live now (the edge's own watched copy: no round trip)."""
    live = sorted(request.config_dict[PUBLISHER].live.values(), key=lambda w: (w.model, w.started))
    return json_response({"object": "list", "data": live[:WORKERS_SHOWN]})


async def _dead_letter(js: JetStreamContext, seq: int) -> DeadLetter | None:
    try:
        msg = await js.get_msg(DEAD_LETTER_STREAM, seq)
    except nats.js.errors.NotFoundError:  # removed by an operator: a gap in the sequence
        return None
    headers = msg.headers or {}
    return DeadLetter(seq, msg.time.timestamp(), msg.subject.removeprefix("tg.dead."),
                      headers.get(SUBJECT_HEADER, ""), headers.get(REASON_HEADER, ""))


@admin_routes.get("/dead-letters")
async def dead_letters(request: web.Request) -> web.Response:
    """GET /admin/dead-letters: how many messages were moved aside, and the latest few with their reasons."""
    js = request.config_dict[PUBLISHER].js

    async def latest() -> DeadLetters:
        state = (await js.stream_info(DEAD_LETTER_STREAM)).state
        if not state.messages:  # an empty stream's sequences are 0, which is no message's
            return DeadLetters("list", 0, [])
        oldest = max(state.first_seq, state.last_seq - DEAD_LETTERS_SHOWN + 1)
        found = await asyncio.gather(*(_dead_letter(js, seq) for seq in range(state.last_seq, oldest - 1, -1)))
        return DeadLetters("list", state.messages, [d for d in found if d is not None])

    return json_response(await _bounded(latest()))
