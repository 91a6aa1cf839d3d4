"""Quota at admission: prepaid credit holds and hard budgets.

A prepaid request is admitted only once its maximum cost is held out of the
tenant's available credits (one counter add, no read-modify-write), so
however many edges admit at once, what runs is covered. A hard budget refuses
new requests once billing reports it spent; both answer OpenAI's
``insufficient_quota`` before anything is queued.
"""

from __future__ import annotations

import asyncio
import logging
import time

from nats.js import JetStreamContext

from bus.account import credits
from bus.account.budgets import Budget, BudgetState, decode_budget, decode_state
from bus.errors import InsufficientQuota
from bus.protocol import HoldNotice
from bus.subjects import BUDGET_STATE_BUCKET, BUDGETS_BUCKET
from bus.watched import WatchedBucket

log = logging.getLogger(__name__)


class QuotaGate:
    """Holds credits for prepaid requests and enforces hard budgets, from local mirrors."""

    def __init__(self, js: JetStreamContext):
        self._js = js
        self._hard: dict[str, dict[str, Budget]] = {}  # tenant -> hard budgets by id
        self._notices: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._budgets = WatchedBucket(await self._js.key_value(BUDGETS_BUCKET), decode_budget, self._index)
        self._states: WatchedBucket[BudgetState] = WatchedBucket(
            await self._js.key_value(BUDGET_STATE_BUCKET), decode_state
        )
        await self._budgets.start()
        await self._states.start()

    async def stop(self) -> None:
        if self._notices:
            await asyncio.wait(self._notices, timeout=5.0)
        await self._budgets.stop()
        await self._states.stop()

    def _index(self, budget_id: str, budget: Budget | None) -> None:
        tenant = budget_id.split(".", 1)[0]
        hard = self._hard.setdefault(tenant, {})
        hard.pop(budget_id, None)
        if budget is not None and budget.mode == "hard":
            hard[budget_id] = budget

    def state(self, budget_id: str) -> BudgetState | None:
        """What billing last reported the budget had spent."""
        return self._states.get(budget_id)

    def check_budgets(self, tenant: str, key: str) -> None:
        """Refuse the request if a hard budget over its tenant or key is spent for this period."""
        hard = self._hard.get(tenant)
        if not hard:
            return
        now = time.time()
        for budget in hard.values():
            if budget.key not in (None, key):
                continue
            state = self._states.get(budget.id)
            if state is not None and state.exhausted(budget, now):
                raise InsufficientQuota(
                    f"The budget '{budget.name}' is spent for this period ({state.spent_micros} of "
                    f"{budget.amount_micros} micro-credits).", code="budget_exceeded",
                )

    async def hold(self, tenant: str, request_id: str, amount: int, deadline: float) -> None:
        """Hold ``amount`` of the tenant's credits for one request, or refuse it.

        A hold taken is reported to billing at once, in the background, so it is
        released even if this edge dies and the request never produces usage.
        """
        if not await credits.hold(self._js, tenant, request_id, amount):
            raise InsufficientQuota(
                "You exceeded your current quota: your credits do not cover this request's maximum cost "
                f"({amount} micro-credits). Add credits or lower max_tokens."
            )
        task = asyncio.create_task(self._notify(HoldNotice(request_id, tenant, amount, deadline)))
        self._notices.add(task)
        task.add_done_callback(self._notices.discard)

    async def release(self, tenant: str, request_id: str, amount: int) -> None:
        """Give back the hold of a request refused before it was queued: no usage will ever settle it."""
        await credits.settle(self._js, tenant, request_id, amount, 0)

    async def _notify(self, notice: HoldNotice) -> None:
        delay = 0.1
        while True:  # a lost notice would leave the hold stuck if no usage ever comes
            try:
                await credits.report_hold(self._js, notice)
                return
            except Exception as exc:
                log.warning("could not report the hold of request %s (%s); retrying", notice.request_id, exc)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 5.0)
