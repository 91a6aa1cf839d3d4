"""Admission: the one path every request takes before it is published, and back out.

Budgets, prepaid credit holds, rate limits and in-flight slots are taken here
as one unit, and given back as one. Taking them awaits the bus; a client that
disconnects cancels its handler at any of those awaits, and what had already
been taken would leak (a hold nobody reports, a slot counted for ever). So
admission runs shielded: a cancelled caller lets it finish, then gives back
whatever it took.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from bus.account.prices import Charge
from bus.account.tenants import Policy
from bus.settings import ModelSpec, Settings
from edge.ratelimit import Admission, RateLimiter
from edge.quota import QuotaGate


@dataclass
class Admitted:
    """What one request took at admission: rate-limit charges, in-flight slots and its credit hold."""

    request_id: str
    tenant: str
    limits: Admission
    hold: int


class Gate:
    """Admits requests against a tenant's budgets, credits and limits, and releases what they took."""

    def __init__(self, settings: Settings, limiter: RateLimiter, quota: QuotaGate):
        self._settings, self._limiter, self._quota = settings, limiter, quota
        self._undoing: set[asyncio.Task] = set()

    async def admit(self, *, request_id: str, tenant: str, key: str, policy: Policy, spec: ModelSpec, lane: str,
                    charge: Charge, deadline: float) -> Admitted:
        """Take everything the request needs, or raise the refusal; safe to cancel at any point.

        A prepaid tenant holds the price of ``charge.max_units`` on ``lane``, priced by the
        one function the worker prices its usage with.
        """
        self._quota.check_budgets(tenant, key)
        hold = spec.prices.cost(charge.max_units, self._settings.lane_multipliers.get(lane, 1.0)) if policy.prepaid else 0
        task = asyncio.ensure_future(self._take(request_id, tenant, policy, charge.tokens, hold, deadline))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # The caller is gone; admission runs on and gives back all it took once done.
            task.add_done_callback(self._undo_when_done)
            raise

    async def _take(self, request_id: str, tenant: str, policy: Policy, tokens: int, hold: int,
                    deadline: float) -> Admitted:
        limits = await self._limiter.admit(policy, tokens)
        try:
            if hold:
                await self._quota.hold(tenant, request_id, hold, deadline)
        except BaseException:
            self._limiter.finish_soon(limits, 0)
            raise
        return Admitted(request_id, tenant, limits, hold)

    def _undo_when_done(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is not None:
            return  # refused or failed: it gave back what it took itself
        undo = asyncio.ensure_future(self.release(task.result(), published=False))
        self._undoing.add(undo)
        undo.add_done_callback(self._undoing.discard)

    async def release(self, admitted: Admitted, *, published: bool, used_tokens: int = 0) -> None:
        """Give back what ``admitted`` took: slots and unused tokens always; the hold too if the
        request was never published (a published one is settled by billing from its usage)."""
        self._limiter.finish_soon(admitted.limits, used_tokens)
        if admitted.hold and not published:
            await self._quota.release(admitted.tenant, admitted.request_id, admitted.hold)

    async def stop(self) -> None:
        if self._undoing:
            await asyncio.wait(self._undoing, timeout=5.0)

