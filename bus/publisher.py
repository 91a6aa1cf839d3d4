"""Publishing signed work and relaying the reply frames that come back for it.

The edge and the SDK for internal services both publish through a
``Publisher``: one identity, one wildcard reply subscription, one local view
of which models have live workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import AsyncIterator

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from bus import tracing
from bus.blobs import BLOB_THRESHOLD_BYTES, outline
from bus.envelopes import seal
from bus.errors import JS_STREAM_FULL, DeadlineExceeded, NoCapacity, QueueFull, TollgateError, WorkerFailed
from bus.ids import new_request_id
from bus.liveness import LiveWorkers, announced
from bus.protocol import Chunk, Delta, Envelope, Failed, Final, Frame, RequestBody, Started, decode_frame
from bus.signing import Identity
from bus.subjects import CANCELLED_BUCKET, PUBLISHERS_BUCKET, WORKERS_BUCKET, bell_subject, cancel_subject, reply_subject, reply_wildcard, request_subject

log = logging.getLogger(__name__)


class Call:
    """One request in flight: its frames in order, with deadline and worker-silence checks."""

    def __init__(self, envelope: Envelope, silence_s: float):
        self.envelope = envelope
        self._silence = silence_s
        self._queue: asyncio.Queue[Frame] = asyncio.Queue()
        self.done = False
        self.final: Final | None = None

    def deliver(self, frame: Frame) -> None:
        self._queue.put_nowait(frame)

    def frames(self) -> AsyncIterator[Delta | Chunk | Final]:
        """Yield deltas (text) or chunks (binary), then the final frame; raise the request's error if it fails.

        Until a worker takes the request only the deadline applies; once one
        has, it must keep talking (heartbeats), or the request fails fast.
        With spans on, the wait is the request's relay span.
        """
        return tracing.relayed(self._frames(), self.envelope)

    async def _frames(self) -> AsyncIterator[Delta | Chunk | Final]:
        expected, started = 0, False
        while True:
            remaining = self.envelope.deadline - time.time()
            if remaining <= 0:
                raise DeadlineExceeded("The request did not complete before its deadline.")
            try:
                frame = await asyncio.wait_for(self._queue.get(), min(remaining, self._silence) if started else remaining)
            except asyncio.TimeoutError:
                if started and remaining > self._silence:
                    raise WorkerFailed("The worker running this request stopped responding.") from None
                continue
            if frame.seq != expected:
                raise WorkerFailed("The reply stream from the worker lost frames.")
            expected += 1
            if isinstance(frame, Failed):
                self.done = True
                raise TollgateError.from_info(frame.error)
            if isinstance(frame, Started):
                started = True
            elif isinstance(frame, (Delta, Chunk, Final)):
                if isinstance(frame, Final):
                    self.done, self.final = True, frame
                yield frame
                if self.done:
                    return


class Publisher:
    """Signs and publishes work as ``publisher_id`` and routes the replies back to each caller."""

    def __init__(self, nc: Client, identity: Identity, publisher_id: str, *, deadline_s: float, silence_s: float,
                 liveness_s: float = 2.0, blob_threshold: int = BLOB_THRESHOLD_BYTES):
        self.nc = nc
        # Larger bodies go by blob; capped so the rest of the envelope and its headers always fit
        # the server's max_payload, whatever the operator set it to.
        self.blob_threshold = min(blob_threshold, nc.max_payload // 2)
        self.liveness_s = liveness_s
        self.js = nc.jetstream()
        self.identity = identity
        self.publisher_id = publisher_id
        self.deadline_s = deadline_s
        self.silence_s = silence_s
        self._calls: dict[str, Call] = {}
        self._sub = None

    async def start(self) -> None:
        self.live = LiveWorkers(await self.js.key_value(WORKERS_BUCKET))
        await self.live.start()
        self._cancelled = await self.js.key_value(CANCELLED_BUCKET)
        self._sub = await self.nc.subscribe(reply_wildcard(self.publisher_id), cb=self._on_reply)
        # Workers drop work whose publisher is no longer announced: its answer would reach nobody.
        self._announcement = announced(await self.js.key_value(PUBLISHERS_BUCKET), self.publisher_id,
                                       self.identity.public_key.encode(), self.liveness_s)
        await self._announcement.__aenter__()

    async def stop(self) -> None:
        """Leave: cancel what is still in flight (its clients are being cut off), then unannounce."""
        await asyncio.gather(*(self._cancel(request_id) for request_id in list(self._calls)))
        await self._announcement.__aexit__(None, None, None)
        if self._sub is not None:
            await self._sub.unsubscribe()
        await self.live.stop()

    async def _on_reply(self, msg: Msg) -> None:
        call = self._calls.get(msg.subject.rsplit(".", 1)[-1])
        if call is None:
            return  # a request this publisher already finished
        try:
            call.deliver(decode_frame(msg.data))
        except Exception:
            log.warning("dropped an undecodable reply frame on %s", msg.subject)

    def check_serving(self, model: str) -> None:
        """Raise ``NoCapacity`` at once if no live worker serves ``model``."""
        if not self.live.serving(model):
            raise NoCapacity(f"No worker is serving the model '{model}' right now. Try again shortly.")

    @contextlib.asynccontextmanager
    async def submit(self, *, tenant: str, principal: str, model: str, lane: str, kind: str, body: RequestBody,
                     request_id: str | None = None, hold_micros: int = 0, deadline: float | None = None,
                     route: str = "", route_request: str = ""):
        """Publish one signed request and yield its ``Call``; cancel it if left unfinished.

        A caller that held credits for the request passes its id and the hold. A body over
        the blob threshold is stored first and the envelope carries its reference. A route
        (edge/routing.py) passes the deadline its attempts share, its name and the client's
        request id.
        """
        self.check_serving(model)
        now = time.time()
        request_id = request_id or new_request_id()
        envelope = Envelope(
            id=request_id,
            tenant=tenant,
            principal=principal,
            issuer=self.identity.public_key,
            kind=kind,
            model=model,
            lane=lane,
            created=now,
            deadline=deadline or now + self.deadline_s,
            reply=reply_subject(self.publisher_id, request_id),
            body=body,
            hold_micros=hold_micros,
            route=route,
            route_request=route_request,
            trace=tracing.carrier(),  # the current request's traceparent, or a new trace
        )
        try:
            envelope = await outline(self.js, envelope, self.blob_threshold)
        except nats.js.errors.APIError as exc:
            if exc.err_code == JS_STREAM_FULL:  # nothing queued yet: refused like a full lane
                raise QueueFull("The gateway's store for large requests is full right now. Try again shortly.") from None
            raise
        data, headers = seal(envelope, self.identity, envelope.deadline - now)
        call = Call(envelope, self.silence_s)
        self._calls[request_id] = call
        queued = True  # unless refused: a publish whose answer was lost may have landed
        try:
            try:
                await self.js.publish(request_subject(lane, model), data, headers=headers)
            except nats.js.errors.APIError as exc:
                if exc.err_code == JS_STREAM_FULL:  # this model's lane holds max_queued already
                    queued = False
                    raise QueueFull(f"The queue for '{model}' is full right now. Try again shortly.") from None
                raise
            except nats.errors.MaxPayloadError:
                queued = False  # refused by the client library before anything was sent
                raise
            await self.nc.publish(bell_subject(lane, model), b"")
            tracing.record("tollgate.publish", now, kind="producer", envelope=envelope)  # stored, and the bell rung
            yield call
        finally:
            del self._calls[request_id]
            if queued and not call.done:
                await asyncio.shield(self._cancel(request_id))

    async def _cancel(self, request_id: str) -> None:
        """Stop a running request, and make sure a queued or redelivered copy never runs."""
        with contextlib.suppress(Exception):
            await self.nc.publish(cancel_subject(request_id), b"")
            await self._cancelled.put(request_id, b"")
