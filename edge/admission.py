"""Admission: the one path every request takes before it is published, and back out.

After authentication (``edge.auth``): the model as the key may see it, a live
worker for it, hard budgets, the prepaid credit hold (priced from the kind's own
``Charge``), rate limits and in-flight slots. These are taken here
as one unit, and given back as one. Taking them awaits the bus; a client that
disconnects cancels its handler at any of those awaits, and what had already
been taken would leak (a hold nobody reports, a slot counted for ever). So
admission runs shielded: a cancelled caller lets it finish, then gives back
whatever it took.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from typing import Callable

import time

from bus import tracing
from bus.account.prices import Charge
from bus.account.tenants import Policy
from bus.errors import ModelNotFound
from bus.ids import new_request_id
from bus.publisher import Publisher
from bus.settings import ModelSpec, Settings
from edge.auth import Principal
from edge import metrics
from edge.ratelimit import Admission, RateLimiter
from edge.quota import QuotaGate


@dataclass
class Admitted:
    """What one request took at admission: rate-limit charges, in-flight slots and its credit hold."""

    request_id: str
    tenant: str
    principal: str  # the API key (or service) that asked
    model: str
    lane: str
    limits: Admission
    hold: int


class Gate:
    """Admits requests against a tenant's budgets, credits and limits, and releases what they took."""

    def __init__(self, settings: Settings, limiter: RateLimiter, quota: QuotaGate, publisher: Publisher):
        self._settings, self._limiter, self._quota, self._publisher = settings, limiter, quota, publisher
        self._undoing: set[asyncio.Task] = set()

    def model_for(self, principal: Principal, name: str) -> tuple[ModelSpec, Policy]:
        """The model a request names, as the caller's key may see it: a 404 if unknown or out of scope."""
        spec, policy = self._settings.model(name), principal.policy(name)
        if spec is None or not policy.model_allowed:
            raise ModelNotFound(f"The model '{name}' does not exist or you do not have access to it.", param="model")
        return spec, policy

    @tracing.traced("tollgate.admit")
    async def admit(self, *, principal: Principal, model: str, spec: ModelSpec, policy: Policy, lane: str,
                    charge: Charge, deadline_s: float | None = None) -> Admitted:
        """Take everything the request needs, or raise the refusal; safe to cancel at any point.

        A prepaid tenant holds the price of ``charge.max_units`` on ``lane``, priced by the
        one function the worker prices its usage with. ``deadline_s``: the request's life,
        the publisher's deadline unless the route answers sooner.
        """
        metrics.admitted(model, lane)  # checked by model_for: a bounded label
        self._publisher.check_serving(model)  # before anything is taken: a 503 costs the caller no quota
        tenant, key = principal.tenant.id, principal.key.id
        self._quota.check_budgets(tenant, key)
        hold = spec.prices.cost(charge.max_units, self._settings.lane_multipliers.get(lane, 1.0)) if policy.prepaid else 0
        deadline = time.time() + (deadline_s or self._publisher.deadline_s)
        admitted = functools.partial(Admitted, new_request_id(), tenant, key, model, lane)
        task = asyncio.ensure_future(self._take(admitted, policy, charge.tokens, hold, deadline))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # The caller is gone; admission runs on and gives back all it took once done.
            task.add_done_callback(self._undo_when_done)
            raise

    async def _take(self, admitted: Callable[[Admission, int], Admitted], policy: Policy, tokens: int, hold: int,
                    deadline: float) -> Admitted:
        limits = await self._limiter.admit(policy, tokens)
        request = admitted(limits, hold)
        try:
            if hold:
                await self._quota.hold(request.tenant, request.request_id, hold, deadline)
        except BaseException:
            self._limiter.finish_soon(limits, 0)
            raise
        return request

    def _undo_when_done(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is not None:
            return  # refused or failed: it gave back what it took itself
        undo = asyncio.ensure_future(self.release(task.result(), published=False))
        self._undoing.add(undo)
        undo.add_done_callback(self._undoing.discard)

    async def release(self, admitted: Admitted, *, published: bool, used_tokens: int | None = 0) -> None:
        """Give back what ``admitted`` took: slots always; the token estimate corrected to
        ``used_tokens`` (kept as charged when None: unknown); the hold too if the request was
        never published (a published one is settled by billing from its usage)."""
        self._limiter.finish_soon(admitted.limits, used_tokens)
        if admitted.hold and not published:
            await self._quota.release(admitted.tenant, admitted.request_id, admitted.hold)

    async def stop(self) -> None:
        if self._undoing:
            await asyncio.wait(self._undoing, timeout=5.0)

