"""Routes: one model name served by an ordered list of targets, falling back from one to the next.

A route runs here, at the edge, which publishes the request to one target's queue after
another (see ARCHITECTURE.md, *Routes*): admission, rate limits and the credit hold are
taken once for the name the client asked for; each attempt is an envelope of its own for
its target (so its ticket names the model that runs it, and its usage row records it),
and a target's failure that is worth another try — 429, 5xx, a timeout, no worker — sends
the request on to the next target, as long as nothing of the answer has reached the client.
Targets that keep failing are skipped for a cool-down, then probed by one request
(``Breaker``). Retrying one upstream with backoff happens in its provider worker
(``consumers/backends/providers/http.py``), which knows the upstream's ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import AsyncIterator

import msgspec

from bus.errors import InsufficientQuota, NoCapacity, TollgateError
from bus.ids import new_request_id
from bus.protocol import Chunk, Delta, Envelope, Final
from bus.publisher import Call, Publisher
from bus.settings import RouteSettings
from edge.quota import QuotaGate

log = logging.getLogger(__name__)


class Breaker:
    """One target's circuit breaker, in one edge process: ``failures`` in a row open it for
    ``cooldown_s``; then one request probes it, and closes it by succeeding."""

    def __init__(self, failures: int, cooldown_s: float):
        self._threshold, self._cooldown = failures, cooldown_s
        self._failures, self._open_until, self._probing = 0, 0.0, False

    def skips(self, now: float) -> bool:
        """Whether a request should pass this target by: open, or its one probe already out."""
        if self._failures < self._threshold:
            return False
        return now < self._open_until or self._probing

    def trying(self, now: float) -> None:
        """A request was sent to the target: after the cool-down, it is the probe."""
        if self._failures >= self._threshold and now >= self._open_until:
            self._probing = True

    def succeeded(self) -> None:
        self._failures, self._probing = 0, False

    def failed(self, now: float) -> None:
        self._failures += 1
        if self._failures >= self._threshold:
            self._open_until, self._probing = now + self._cooldown, False

    def settled(self) -> None:
        """The request ended saying nothing about the target's health (the client's own error, or it left)."""
        self._probing = False

    @property
    def reopens_in(self) -> float:
        return max(0.0, self._open_until - time.time())


def falls_back(exc: TollgateError) -> bool:
    """Whether a target's error is worth the next target: rate limited, failed, timed out, unavailable.
    A request's own fault (4xx) would fail anywhere; its own deadline is spent for every target."""
    return exc.status in (429, 500, 502, 503) or (exc.status == 504 and exc.code != "deadline_exceeded")


def ordered(route: RouteSettings) -> list[str]:
    """The route's targets in the order one request tries them: by priority (a target's place in the
    list unless it sets one), equals in a random order weighted by ``weight``."""
    def key(item: tuple[int, object]) -> tuple[int, float]:
        place, target = item
        priority = place if target.priority is None else target.priority
        return priority, -random.random() ** (1.0 / target.weight)  # weighted order without replacement
    return [target.model for _, target in sorted(enumerate(route.targets), key=key)]


class RoutingPublisher(Publisher):
    """The edge's publisher: a route's name is served by its targets, any other model as it is."""

    def __init__(self, *args, routes: dict[str, RouteSettings], quota: QuotaGate, **kwargs):
        super().__init__(*args, **kwargs)
        self.routes, self.quota = routes, quota
        self._breakers = {(name, t.model): Breaker(route.breaker_failures, route.breaker_cooldown_s)
                          for name, route in routes.items() for t in route.targets}

    def breaker(self, route: str, target: str) -> Breaker:
        return self._breakers[route, target]

    def check_serving(self, model: str) -> None:
        """Raise ``NoCapacity`` at once if no live worker serves ``model`` (for a route: any of its targets)."""
        route = self.routes.get(model)
        if route is None:
            return super().check_serving(model)
        if not any(self.live.serving(t.model) for t in route.targets):
            raise NoCapacity(f"No worker is serving any target of '{model}' right now. Try again shortly.")

    @contextlib.asynccontextmanager
    async def submit(self, *, model: str, **fields) -> AsyncIterator[Call]:
        """Like ``Publisher.submit``; for a route, the call is a ``RoutedCall`` over its targets."""
        if model not in self.routes:
            async with super().submit(model=model, **fields) as call:
                yield call
            return
        call = RoutedCall(self, model, fields)
        try:
            await call.next_target(None)
            yield call
        finally:
            await call.close()

    def attempt(self, **fields) -> contextlib.AbstractAsyncContextManager[Call]:
        """One target's attempt, published as any request is."""
        return super().submit(**fields)


class RoutedCall:
    """A routed request in flight: the frames of the attempt now running, and the next target's
    attempt when one fails before any output reached the client."""

    def __init__(self, router: RoutingPublisher, route: str, fields: dict):
        self._router, self._route = router, route
        self._fields = fields  # tenant, principal, lane, kind, body, request_id, hold_micros
        self._targets = ordered(router.routes[route])
        self._client_id: str = fields.pop("request_id") or new_request_id()
        self._hold: int = fields.pop("hold_micros", 0)
        self._deadline = time.time() + router.deadline_s  # shared by every attempt
        self._attempt: contextlib.AbstractAsyncContextManager[Call] | None = None
        self._call: Call | None = None
        self._target = ""
        self._first: Envelope | None = None
        self.final: Final | None = None
        self.done = False

    @property
    def envelope(self) -> Envelope:
        """The request as the client knows it (its id) and the target serving it now (its model)."""
        return msgspec.structs.replace(self._first, model=self._target)

    async def frames(self) -> AsyncIterator[Delta | Chunk | Final]:
        """The running attempt's frames; a failure worth another target, before any output, moves on."""
        while True:
            breaker, shown = self._router.breaker(self._route, self._target), False
            try:
                async for frame in self._call.frames():
                    if isinstance(frame, Final):
                        self.final, self.done = frame, True
                        breaker.succeeded()
                    else:
                        shown = True
                    yield frame
                return
            except TollgateError as exc:
                if not falls_back(exc):
                    breaker.settled()
                    raise
                breaker.failed(time.time())
                if shown:  # part of the answer reached the client: another target cannot take it back
                    raise
                log.warning("route %s: target %s failed (%d %s) for request %s; trying the next",
                            self._route, self._target, exc.status, exc.code, self._client_id)
                await self.next_target(exc)

    async def next_target(self, failure: TollgateError | None) -> None:
        """Publish the request to the next target that takes it; raise ``failure`` (or 503) if none is left."""
        await self.close()
        while self._targets:
            target, now = self._targets.pop(0), time.time()
            breaker = self._router.breaker(self._route, target)
            if breaker.skips(now) or not self._router.live.serving(target):
                continue
            breaker.trying(now)  # before any await, so two requests never both take the one probe
            # The client's id (and the hold admission took) go with the first attempt queued; a
            # later attempt holds credits of its own, since billing gives the failed one's back.
            request_id, hold = self._client_id if self._first is None else new_request_id(), self._hold
            attempt = self._router.attempt(model=target, request_id=request_id, hold_micros=hold,
                                           deadline=self._deadline, route=self._route, route_request=self._client_id,
                                           **self._fields)
            try:
                if hold and self._first is not None:
                    try:
                        # Shielded: a client leaving mid-hold still gets its hold reported, so billing's
                        # sweeper gives it back (the attempt is never published).
                        await asyncio.shield(self._router.quota.hold(self._fields["tenant"], request_id, hold,
                                                                     self._deadline))
                    except InsufficientQuota:
                        breaker.settled()
                        break
                call = await attempt.__aenter__()
            except NoCapacity as exc:  # its last worker left, or its lane is full: nothing was queued
                breaker.settled()
                if hold and self._first is not None:
                    await asyncio.shield(self._router.quota.release(self._fields["tenant"], request_id, hold))
                failure = exc
                continue
            except BaseException:
                # The client left, or the bus failed, before the attempt said anything of the target:
                # its probe (if it was one) must not stay out, or the target is skipped for good.
                breaker.settled()
                raise
            self._attempt, self._call, self._target = attempt, call, target
            self._first = self._first or call.envelope
            return
        if failure is None:
            err = NoCapacity(f"Every target of '{self._route}' is failing or unserved right now. Try again shortly.",
                             code="route_unavailable")
            err.retry_after_s = min((self._router.breaker(self._route, t.model).reopens_in
                                     for t in self._router.routes[self._route].targets), default=1.0) or 1.0
            raise err
        raise failure

    async def close(self) -> None:
        """End the running attempt (cancelled if unfinished)."""
        attempt, self._attempt = self._attempt, None
        if attempt is not None:
            if not self.done:
                self._router.breaker(self._route, self._target).settled()
            await attempt.__aexit__(None, None, None)
