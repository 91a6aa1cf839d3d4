"""The worker runtime: pull by priority, verify, run, stream, meter, ack.

Order of effects for each message (DESIGN.md): verify -> run -> final frame
-> usage event published and acked by JetStream (retried until stored) ->
work message acked. A crash anywhere before the work ack gets the message
redelivered; its usage event carries the request id as ``Nats-Msg-Id``, so a
second copy is dropped by the server and nothing is billed twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
import uuid

import msgspec
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from bus import tracing
from bus.blobs import inline, store_result
from bus.envelopes import MSG_ID_HEADER, TICKET_HEADER, open_envelope, seal_usage
from bus.errors import JS_STREAM_FULL, BadEnvelope, DeadlineExceeded, TollgateError, WorkerFailed
from bus.issuers import watch_issuers
from bus.dead_letters import dead_letter
from bus.liveness import LivePublishers, announced
from bus.protocol import (
    Chunk, Delta, Envelope, Failed, Final, Heartbeat, Started, Usage, UsageEvent, WorkerAnnouncement, encode,
)
from bus.provision import ensure_work_consumers
from bus.settings import ModelSpec, Settings
from bus.signing import Identity
from bus.subjects import (
    CANCEL_WILDCARD, CANCELLED_BUCKET, PUBLISHERS_BUCKET, WORKERS_BUCKET, liveness_key, bell_wildcard, usage_subject,
)
from consumers.backends.base import Backend
from consumers import metrics
from consumers.kinds import KINDS, Outcome
from consumers.lanes import LanePuller
from consumers.tokenize_service import serve_tokenize

log = logging.getLogger(__name__)

# How long an idle worker waits before scanning every lane without a doorbell:
# only redeliveries (which publish nothing) need this.
_IDLE_POLL_S = 1.0
# Cancels remembered for requests still queued; a flood of cancels cannot grow the worker without bound.
_MAX_REMEMBERED_CANCELS = 100_000


def _publisher_of(envelope: Envelope) -> str:
    """The id of the edge or service that published ``envelope``: its reply subject's third token."""
    return envelope.reply.split(".")[2]


class _Replies:
    """Numbered frames to one request's reply subject; a kind's ``Output``."""

    def __init__(self, nc: Client, subject: str):
        self._nc, self._subject, self._seq = nc, subject, 0

    async def send(self, frame_type, **fields) -> None:
        seq, self._seq = self._seq, self._seq + 1  # taken before the await: senders interleave
        await self._nc.publish(self._subject, encode(frame_type(seq=seq, **fields)))

    async def text(self, text: str) -> None:
        await self.send(Delta, text=text)

    async def data(self, data: bytes) -> None:
        await self.send(Chunk, data=data)


class Worker:
    """Serves one model from its lane consumers, running up to ``spec.concurrency`` requests at once."""

    def __init__(self, settings: Settings, model: str, backend: Backend, nc: Client, identity: Identity,
                 worker_id: str | None = None):
        self.settings = settings
        self.identity = identity  # signs usage reports; registered with role "worker"
        self.model = model
        self.spec: ModelSpec = settings.models[model]
        self.backend = backend
        self.nc = nc
        self.js = nc.jetstream()
        self.worker_id = worker_id or uuid.uuid4().hex[:12]
        # Results larger than this go through tg_results; capped so a final frame always fits max_payload.
        self._result_threshold = min(settings.edge.blob_threshold_bytes, nc.max_payload // 2)
        self._doorbell = asyncio.Event()
        self._stopping = False
        self._running: dict[str, asyncio.Event] = {}
        # Requests cancelled while possibly still queued, oldest first: checked on every
        # delivery with no round trip, forgotten once used or past the longest deadline.
        self._cancelled_ids: OrderedDict[str, float] = OrderedDict()

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then finish the requests in hand and leave."""
        await ensure_work_consumers(self.js, self.settings, self.model)
        self._issuers = await watch_issuers(self.js)
        self._publishers = LivePublishers(await self.js.key_value(PUBLISHERS_BUCKET))
        await self._publishers.start()
        self._cancelled = await self.js.key_value(CANCELLED_BUCKET)
        subs = [
            await self.nc.subscribe(CANCEL_WILDCARD, cb=self._on_cancel),
            await self.nc.subscribe(bell_wildcard(self.model), cb=self._on_doorbell),
            *await serve_tokenize(self.nc, self.model, self.backend),  # answered beside the work, never queued
        ]
        workers_kv = await self.js.key_value(WORKERS_BUCKET)
        self._puller = await LanePuller(self.nc, self.model, self.settings.worker.lane_weights).open()
        dispatcher = asyncio.create_task(self._dispatch())
        try:
            announcement = msgspec.msgpack.encode(WorkerAnnouncement(self.worker_id, self.model, time.time()))
            async with announced(workers_kv, liveness_key(self.model, self.worker_id), announcement,
                                 self.settings.worker.liveness_s):
                log.info("worker %s serving %s", self.worker_id, self.model)
                await stop.wait()
                self._stopping = True
                self._doorbell.set()
                await dispatcher
        finally:
            dispatcher.cancel()
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            await self._puller.close()
            await self._issuers.stop()
            await self._publishers.stop()

    @property
    def busy(self) -> int:
        """Requests running now."""
        return len(self._running)

    async def _on_doorbell(self, msg: Msg) -> None:
        self._puller.ring(msg.subject.split(".")[2])
        self._doorbell.set()

    async def _on_cancel(self, msg: Msg) -> None:
        request_id = msg.subject.rsplit(".", 1)[-1]
        event = self._running.get(request_id)
        if event is not None:
            event.set()
            return
        now = time.time()
        self._cancelled_ids[request_id] = now
        horizon = now - self.settings.max_deadline_s
        remembered = self._cancelled_ids
        while next(iter(remembered.values())) < horizon or len(remembered) > _MAX_REMEMBERED_CANCELS:
            # Past the bound the oldest are forgotten: a redelivery is still checked in tg_cancelled.
            self._cancelled_ids.popitem(last=False)

    async def _dispatch(self) -> None:
        """Take one message whenever a slot is free; on stop, wait for the requests in hand."""
        slots = asyncio.Semaphore(self.spec.concurrency)
        running: set[asyncio.Task] = set()
        while not self._stopping:
            await slots.acquire()
            waiting = time.monotonic()
            try:
                msg = await self._next()
            except Exception:  # the bus is away: nats-py reconnects; the dispatcher must live on
                log.exception("pulling work failed; trying again")
                msg = None
                await asyncio.sleep(_IDLE_POLL_S)
            if msg is None:
                slots.release()
                continue
            metrics.pulled(self.model, time.monotonic() - waiting)
            task = asyncio.create_task(self.handle(msg))
            running.add(task)
            task.add_done_callback(lambda t: (running.discard(t), slots.release()))
        if running:
            await asyncio.wait(running)

    async def _next(self) -> Msg | None:
        """The next message by priority, waiting for a doorbell while all lanes are empty."""
        while not self._stopping:
            msg = await self._puller.next()
            if msg is None:
                # Clear, then look once more, so a doorbell rung during the scan is not lost.
                self._doorbell.clear()
                msg = await self._puller.next()
            if msg is not None:
                return msg
            try:
                await asyncio.wait_for(self._doorbell.wait(), _IDLE_POLL_S)
            except asyncio.TimeoutError:
                self._puller.rescan()  # redeliveries ring no doorbell
        return None

    async def handle(self, msg: Msg) -> None:
        """Run one work message to completion, or terminate it unrun if it must not run."""
        pulled = time.time()  # the end of its queue wait
        try:
            envelope = open_envelope(msg.data, msg.headers, msg.subject, self._issuers.get, pulled,
                                     self.settings.max_deadline_s)
            tracing.CURRENT.set(envelope.trace.get(tracing.HEADER, ""))  # this task's log lines name its trace
            if envelope.model != self.model:
                raise BadEnvelope(f"envelope for {envelope.model} on {self.model}'s queue")
            if envelope.kind not in self.backend.kinds or envelope.kind not in KINDS:
                raise BadEnvelope(f"{self.model} does not serve {envelope.kind!r} requests")
            if self._cancelled_ids.pop(envelope.id, None) is not None or (
                msg.metadata.num_delivered > 1 and await self._was_cancelled(envelope.id)
            ):
                raise BadEnvelope("its client had gone before it ran")
            if not await self._publishers.alive(_publisher_of(envelope)):
                # Its edge (or service) is gone, and with it the client: nobody would get the answer.
                await dead_letter(self.js, msg, "work", "its publisher is gone: nobody would receive the answer")
                return
            envelope = await inline(self.js, envelope)  # a body sent as a blob, fetched only for work that runs
        except BadEnvelope as exc:
            log.warning("terminated work message %s: %s", (msg.headers or {}).get(MSG_ID_HEADER), exc)
            await msg.term()
            return
        except Exception:
            # Not the message's fault (a bus call timed out while a leader moved, say): it is
            # redelivered, up to max_deliver times, rather than dropped unrun.
            log.exception("could not check work message %s yet; it will be redelivered",
                          (msg.headers or {}).get(MSG_ID_HEADER))
            with contextlib.suppress(Exception):
                await msg.nak(delay=_IDLE_POLL_S)
            return
        # Spans (if on) under the envelope's traceparent: queued since the edge published it, then run.
        tracing.record("tollgate.queue_wait", envelope.created, pulled, envelope=envelope)
        with tracing.span("tollgate.run", kind="consumer", envelope=envelope) as span:
            usage = await self._run(envelope, msg)
            tracing.finished(span, usage)
        metrics.ran(usage)
        await self._meter(usage, envelope, msg)
        await msg.ack()

    async def _was_cancelled(self, request_id: str) -> bool:
        try:
            await self._cancelled.get(request_id)
            return True
        except nats.js.errors.KeyNotFoundError:
            return False

    async def _run(self, envelope: Envelope, msg: Msg) -> UsageEvent:
        """Execute the request under its kind, send its final or error frame, and return its usage."""
        replies = _Replies(self.nc, envelope.reply)
        cancel = asyncio.Event()
        self._running[envelope.id] = cancel
        deadline = asyncio.get_running_loop().call_later(max(0.0, envelope.deadline - time.time()), cancel.set)
        started = time.time()
        outcome = Outcome("cancelled")
        status, error_code = "ok", None
        await replies.send(Started, worker=self.worker_id)
        keepalive = asyncio.create_task(self._keepalive(replies, msg, _publisher_of(envelope), cancel))
        try:
            outcome = await KINDS[envelope.kind].execute(
                self.backend, envelope.body, cancel, replies)
            if outcome.finish_reason == "cancelled" or cancel.is_set():
                status = "cancelled"
                if time.time() >= envelope.deadline:
                    err = DeadlineExceeded("the request's deadline passed while it ran")
                    error_code = err.code
                    await replies.send(Failed, error=err.info())
            else:
                result, blob = outcome.result, None
                if len(result) > self._result_threshold:  # e.g. many embeddings: kept apart, sent by reference
                    result, blob = b"", await store_result(self.js, envelope.id, result)
                await replies.send(Final, finish_reason=outcome.finish_reason, text=outcome.text,
                                   usage=Usage(outcome.input_units, outcome.output_units), result=result, blob=blob,
                                   stop=outcome.stop)
        except TollgateError as exc:
            status, error_code = "error", exc.code or exc.type
            await replies.send(Failed, error=exc.info())
        except Exception:
            log.exception("request %s failed in the backend", envelope.id)
            err = WorkerFailed("the model backend failed while running this request")
            status, error_code = "error", err.code
            await replies.send(Failed, error=err.info())
        finally:
            keepalive.cancel()
            deadline.cancel()
            self._running.pop(envelope.id, None)
        return self._usage(envelope, outcome, started, status, error_code)

    def _usage(self, envelope: Envelope, outcome: Outcome, started: float, status: str,
               error_code: str | None) -> UsageEvent:
        """The request's one usage event, priced by the one price function the edge's hold used too."""
        return UsageEvent(
            request_id=envelope.id,
            tenant=envelope.tenant,
            principal=envelope.principal,
            model=envelope.model,
            kind=envelope.kind,
            lane=envelope.lane,
            queued_at=envelope.created,
            started_at=started,
            first_token_at=outcome.first_output_at,
            finished_at=time.time(),
            input_units=outcome.input_units,
            output_units=outcome.output_units,
            unit=outcome.unit,
            cost_micros=self.spec.prices.cost(outcome.units, self.settings.lane_multipliers.get(envelope.lane, 1.0)),
            status=status,
            cache_hit=False,
            worker_id=self.worker_id,
            error_code=error_code,
            hold_micros=envelope.hold_micros,
            cached_input_units=outcome.units.cached_input_tokens,
            input_images=outcome.units.input_images,
            route=envelope.route,
            route_request_id=envelope.route_request,
            trace_id=tracing.trace_id(envelope.trace),
        )

    async def _keepalive(self, replies: _Replies, msg: Msg, publisher: str, cancel: asyncio.Event) -> None:
        """Tell the edge this request is alive, and JetStream not to redeliver it yet; stop the request
        once its publisher is gone (an edge that died took its client with it: nobody would receive
        the rest, so it is not made, and the request is billed as cancelled with what it used)."""
        while True:
            await asyncio.sleep(self.settings.worker.heartbeat_s)
            with contextlib.suppress(Exception):  # not known to be gone is alive: a bus hiccup stops nothing
                if not cancel.is_set() and not await self._publishers.alive(publisher):
                    log.warning("stopped a request: its publisher %s is gone", publisher)
                    cancel.set()
            with contextlib.suppress(Exception):  # one lost beat must not end the beating
                await replies.send(Heartbeat)
                await msg.in_progress()

    async def _meter(self, usage: UsageEvent, envelope: Envelope, msg: Msg) -> None:
        """Publish the signed usage report and wait until JetStream has stored it, however long that takes.

        The report carries the request's ticket and its issuer's signature, so the meter can
        tell it belongs to a request that was admitted. The work message is kept in progress
        meanwhile, so it is neither redelivered nor acked before its usage is safe.
        """
        data, headers = seal_usage(usage, envelope.ticket(), msg.headers[TICKET_HEADER], self.identity)
        if tracing.HEADER in envelope.trace:  # billing's store span joins the request's trace
            headers[tracing.HEADER] = envelope.trace[tracing.HEADER]
        subject = usage_subject(usage.tenant)
        delay = 0.1
        while True:
            try:
                await self.js.publish(subject, data, headers=headers)
            except Exception as exc:
                if isinstance(exc, nats.js.errors.APIError) and exc.err_code == JS_STREAM_FULL:
                    log.error("usage for %s waits: the USAGE stream is full (billing is down or far behind); "
                              "retrying", headers[MSG_ID_HEADER])
                else:
                    log.warning("usage for %s not stored yet (%s); retrying", headers[MSG_ID_HEADER], exc)
            else:
                return
            with contextlib.suppress(Exception):
                await msg.in_progress()
            await asyncio.sleep(delay)
            delay = min(2 * delay, 2.0)
