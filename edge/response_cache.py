"""The exact response cache: a text generation's answer, kept so the same request asked again by the
same tenant is answered without queueing.

What is the same request: the tenant, the model, the kind and the whole bus body the edge built
(messages or prompt, ``max_tokens``, sampling and stop strings, images), all but its ``stream``
flag, hashed. The tenant is part of the key, so nothing is ever shared across tenants. Only
deterministic requests are cached — greedy (temperature 0) or seeded: a sampled request asks for a
fresh sample each time, and a kept one would quietly stop it varying.

Answers live in the KV bucket ``tg_response_cache``, shared by every edge, each with its own TTL
(the model's ``cache.ttl_s``, shortened by the tenant's ``response_cache_ttl_s``; 0 is off); the
bucket is bounded and drops its oldest answers when full. ``Cache-Control: no-cache`` skips the
lookup, ``no-store`` the write; the ``x-tollgate-cache`` header says ``hit`` or ``miss`` wherever the
cache applies. Only whole answers are kept: an error, a cancelled or cut-short request, never.

A hit is admitted like any request (limits, budgets, a prepaid hold), then replayed — whole, or as
server-sent events — and metered: a usage row with ``cache_hit``, costing the model's
``cache.price_ratio`` (default 0) of what its tokens cost. No worker ran it, so the edge signs that
usage itself; the meter takes usage from an edge only for a cache hit of a request it admitted
(``bus.envelopes.open_usage``). Identical requests in flight at once on one edge are coalesced: the
first runs, the others wait for its answer and are served it as hits (if it fails they run their own).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from dataclasses import dataclass
from typing import AsyncIterator

import msgspec
import nats.errors
import nats.js.errors
from aiohttp import web
from nats.js.kv import KeyValue

from bus import tracing
from bus.account.prices import Units
from bus.envelopes import seal_usage
from bus.protocol import ChatBody, CompletionBody, Count, Envelope, Final, RequestBody, Usage, UsageEvent, encode
from bus.publisher import Call, Publisher
from bus.settings import ModelSpec, Settings
from bus.subjects import cache_hit_usage_subject, token
from edge.admission import Admitted, Gate
from edge.auth import Principal
from edge.replies import published

log = logging.getLogger(__name__)

CACHE_HEADER = "x-tollgate-cache"
_STATUS = web.RequestKey("response_cache_status", str)


class CachedAnswer(msgspec.Struct, frozen=True):
    """One kept answer, as the bucket holds it (MessagePack; its numbers checked on decode)."""

    text: str
    finish_reason: str
    prompt_tokens: Count
    completion_tokens: Count
    stop: str | None = None


_decode = msgspec.msgpack.Decoder(CachedAnswer).decode


@dataclass(frozen=True)
class CacheUse:
    """How the cache serves one request: its key and TTL, and whether to look up and to store."""

    key: str
    ttl_s: float
    lookup: bool
    store: bool


def cacheable(body: RequestBody) -> bool:
    """Whether ``body`` asks for an answer that does not vary: greedy or seeded text generation."""
    return isinstance(body, (ChatBody, CompletionBody)) and (body.temperature == 0 or body.seed is not None)


def cache_key(tenant: str, model: str, kind: str, body: RequestBody) -> str:
    """The bucket key of a request: the tenant in clear (so an operator can purge a tenant's
    answers), then a digest of everything the answer depends on."""
    asked = msgspec.structs.replace(body, stream=False)  # streamed or not, the answer is the same
    return f"{token(tenant)}.{hashlib.sha256(encode((tenant, model, kind, asked))).hexdigest()}"


def _directives(request: web.Request) -> set[str]:
    return {part.split("=", 1)[0].strip().lower() for part in request.headers.get("Cache-Control", "").split(",")}


class Replay:
    """A kept answer with the frames interface of a ``Call``, for ``edge.replies.answer``: no queue, no worker."""

    def __init__(self, envelope: Envelope, kept: CachedAnswer):
        self.envelope = envelope
        self.final = Final(seq=0, finish_reason=kept.finish_reason, text=kept.text, stop=kept.stop,
                           usage=Usage(kept.prompt_tokens, kept.completion_tokens))

    async def frames(self) -> AsyncIterator[Final]:
        yield self.final


class Recording:
    """A worker's call whose frames pass through while its text is kept, to store once the answer is whole."""

    def __init__(self, call: Call):
        self.envelope, self._call, self._texts = call.envelope, call, []

    @property
    def final(self) -> Final | None:
        return self._call.final

    async def frames(self):
        async for frame in self._call.frames():
            self._texts.append(frame.text)
            yield frame

    def answer(self) -> CachedAnswer | None:
        """The whole answer, or None if the call did not end with its final frame."""
        final = self._call.final
        if final is None:
            return None
        return CachedAnswer("".join(self._texts), final.finish_reason, final.usage.prompt_tokens,
                            final.usage.completion_tokens, final.stop)


class ResponseCache:
    """Looks up, replays, meters and stores answers; coalesces identical requests in flight on this edge."""

    def __init__(self, kv: KeyValue, publisher: Publisher, gate: Gate, settings: Settings):
        self._kv, self._publisher, self._gate, self._settings = kv, publisher, gate, settings
        # One entry per distinct request running here that others may join: bounded by the requests in flight.
        self._flights: dict[str, asyncio.Future[CachedAnswer | None]] = {}

    def _use(self, request: web.Request, principal: Principal, spec: ModelSpec, admitted: Admitted, kind: str,
             body: RequestBody) -> CacheUse | None:
        """How the cache serves this request, or None where it does not apply (off, or a sampled request)."""
        ttl = min(spec.cache.ttl_s, self._settings.edge.response_cache_max_ttl_s)
        if principal.tenant.response_cache_ttl_s is not None:
            ttl = min(ttl, principal.tenant.response_cache_ttl_s)
        if ttl <= 0 or not cacheable(body):
            return None
        directives = _directives(request)
        return CacheUse(cache_key(admitted.tenant, admitted.model, kind, body), ttl,
                        lookup="no-cache" not in directives, store="no-store" not in directives)

    @contextlib.asynccontextmanager
    async def answered(self, request: web.Request, principal: Principal, spec: ModelSpec, admitted: Admitted, *,
                       kind: str, body: RequestBody) -> AsyncIterator[Call | Replay | Recording]:
        """Yield what answers an admitted request: a replay of a kept answer (or of an identical request
        that ran at the same time), else its call to a worker, recorded to be kept; either way, release
        what admission took when it ends."""
        use = self._use(request, principal, spec, admitted, kind, body)
        if use is None:
            async with published(self._publisher, self._gate, admitted, kind=kind, body=body) as call:
                yield call
            return
        try:
            kept = await self._lookup(use.key) if use.lookup else None
        except BaseException:  # the client left while it waited: nothing was published
            await asyncio.shield(self._gate.release(admitted, published=False))
            raise
        if kept is not None:
            request[_STATUS] = "hit"
            async with self._replayed(admitted, spec, kind, kept) as replay:
                yield replay
            return
        request[_STATUS] = "miss"
        async with self._recorded(admitted, kind, body, use) as recording:
            yield recording

    async def _lookup(self, key: str) -> CachedAnswer | None:
        """The kept answer, else that of an identical request running here (None if it failed)."""
        kept = await self._get(key)
        if kept is None and key in self._flights:
            kept = await asyncio.shield(self._flights[key])
        return kept

    @contextlib.asynccontextmanager
    async def _replayed(self, admitted: Admitted, spec: ModelSpec, kind: str,
                        kept: CachedAnswer) -> AsyncIterator[Replay]:
        now = time.time()
        envelope = Envelope(id=admitted.request_id, tenant=admitted.tenant, principal=admitted.principal,
                            issuer=self._publisher.identity.public_key, kind=kind, model=admitted.model,
                            lane=admitted.lane, created=now, deadline=now + self._publisher.deadline_s, reply="",
                            body=None, hold_micros=admitted.hold)
        tokens: int | None = None  # unknown while the usage is not known to be stored: the estimate stays
        try:
            # Shielded: a client that leaves now does not leave its usage half published.
            await asyncio.shield(self._meter(envelope, spec, kept))
            tokens = kept.prompt_tokens + kept.completion_tokens  # they count as a run's would
            yield Replay(envelope, kept)
        finally:
            # As for published work, an unknown outcome counts as billed: billing settles the hold
            # from the usage, or sweeps it if none was stored; never twice.
            await asyncio.shield(self._gate.release(admitted, published=True, used_tokens=tokens))

    @contextlib.asynccontextmanager
    async def _recorded(self, admitted: Admitted, kind: str, body: RequestBody,
                        use: CacheUse) -> AsyncIterator[Recording]:
        # A request that may store its answer leads: identical ones arriving meanwhile wait for it.
        flight = None
        if use.store and use.key not in self._flights:
            flight = self._flights[use.key] = asyncio.get_running_loop().create_future()
        try:
            async with published(self._publisher, self._gate, admitted, kind=kind, body=body) as call:
                recording = Recording(call)
                yield recording
            kept = recording.answer()
            if flight is not None:
                flight.set_result(kept)
            if kept is not None and use.store:
                await self._put(use.key, kept, use.ttl_s)
        finally:
            if flight is not None:
                if not flight.done():
                    flight.set_result(None)  # failed or left: those waiting run their own
                del self._flights[use.key]  # only once stored, so a request arriving meanwhile still joins

    async def _get(self, key: str) -> CachedAnswer | None:
        """The kept answer, or None: not kept, expired, unreadable, or the bucket unreachable (then it runs)."""
        try:
            entry = await self._kv.get(key)
            return _decode(entry.value) if entry.value else None
        except nats.js.errors.KeyNotFoundError:
            return None
        except (msgspec.DecodeError, nats.errors.Error) as exc:
            log.warning("response cache lookup failed, running the request: %s", exc)
            return None

    async def _put(self, key: str, kept: CachedAnswer, ttl_s: float) -> None:
        """Keep an answer for ``ttl_s``; one too large, already kept (by another edge) or refused is not."""
        data = encode(kept)
        if len(data) > self._settings.edge.response_cache_max_entry_bytes:
            return
        try:
            await self._kv.create(key, data, msg_ttl=ttl_s)
        except nats.js.errors.KeyWrongLastSequenceError:
            pass  # kept already: identical answers raced from two edges
        except nats.errors.Error as exc:
            log.warning("response cache write failed: %s", exc)

    async def _meter(self, envelope: Envelope, spec: ModelSpec, kept: CachedAnswer) -> None:
        """Publish the hit's usage, signed by this edge, and wait until USAGE has stored it."""
        units = Units(input_tokens=kept.prompt_tokens, output_tokens=kept.completion_tokens)
        full = spec.prices.cost(units, self._settings.lane_multipliers.get(envelope.lane, 1.0))
        event = UsageEvent(
            request_id=envelope.id, tenant=envelope.tenant, principal=envelope.principal, model=envelope.model,
            kind=envelope.kind, lane=envelope.lane, queued_at=envelope.created, started_at=envelope.created,
            first_token_at=envelope.created, finished_at=time.time(), input_units=kept.prompt_tokens,
            output_units=kept.completion_tokens, unit="tokens", cost_micros=math.ceil(full * spec.cache.price_ratio),
            status="ok", cache_hit=True, worker_id=self._publisher.publisher_id, hold_micros=envelope.hold_micros,
            trace_id=tracing.trace_id(tracing.carrier()),  # the hit's own request's trace
        )
        identity, ticket = self._publisher.identity, envelope.ticket()
        data, headers = seal_usage(event, ticket, identity.sign(encode(ticket)), identity)
        await self._publisher.js.publish(cache_hit_usage_subject(envelope.tenant), data, headers=headers)


async def mark(request: web.Request, response: web.StreamResponse) -> None:
    """Say hit or miss on every response the cache served (an ``on_response_prepare`` signal)."""
    status = request.get(_STATUS)
    if status is not None:
        response.headers[CACHE_HEADER] = status
