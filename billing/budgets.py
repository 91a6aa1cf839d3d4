"""Budget tracking: each budget's spend in its period, and exactly one alert per threshold crossed.

Spend is read back from the usage rollups (``usage_minute``), which hold each
request once, so it is exact however the usage arrived: redelivered, in one
large request or in many small ones at once. An alert's id is the budget,
period and threshold; it is published under that id (the server drops a
repeat) and written to ``budget_alerts`` once, and ids already written are
remembered across restarts, so no threshold alerts twice in a period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import msgspec
from nats.js import JetStreamContext

from billing.clickhouse import ClickHouse, utc
from bus.account.budgets import Budget, BudgetState, decode_budget
from bus.envelopes import MSG_ID_HEADER
from bus.protocol import BudgetAlert, encode
from bus.subjects import BUDGET_STATE_BUCKET, BUDGETS_BUCKET, budget_event_subject
from bus.watched import WatchedBucket

log = logging.getLogger(__name__)

ALERT_COLUMNS = ("id", "budget_id", "tenant", "key", "threshold", "period", "spent_micros", "amount_micros",
                 "mode", "at")
# Alerts older than the longest period cannot repeat: only newer ids are remembered.
_REMEMBER_S = 32 * 86400


class BudgetTracker:
    def __init__(self, js: JetStreamContext, ch: ClickHouse, late_s: float):
        self._js, self.ch = js, ch
        # Usage of a request queued before a period ended may be stored this long after it.
        self._late_s = late_s
        self._published: dict[str, BudgetState] = {}
        self._alerted: set[str] = set()
        self._lock = asyncio.Lock()
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()

    async def start(self) -> None:
        self._budgets = WatchedBucket(await self._js.key_value(BUDGETS_BUCKET), decode_budget)
        await self._budgets.start()
        self._states = await self._js.key_value(BUDGET_STATE_BUCKET)
        rows = await self.ch.query("SELECT id FROM budget_alerts WHERE at >= {since:DateTime64(6)}",
                                   {"since": utc(time.time() - _REMEMBER_S)})
        self._alerted = {alert_id for (alert_id,) in rows}

    async def stop(self) -> None:
        await self._budgets.stop()

    def touch(self, tenants: set[str]) -> None:
        """Note that these tenants' usage changed; ``run`` follows up, off the meter's path."""
        self._dirty |= tenants
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Refresh the budgets of touched tenants, many touches at a time, until ``stop``."""
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)
            self._wake.clear()
            tenants, self._dirty = self._dirty, set()
            if tenants:
                await self.refresh(tenants)

    async def refresh(self, tenants: set[str] | None = None, now: float | None = None) -> None:
        """Bring the budgets of ``tenants`` (all when None) up to date as of ``now``."""
        now = time.time() if now is None else now
        async with self._lock:
            for budget in self._budgets.values():
                if tenants is None or budget.tenant in tenants:
                    try:
                        await self._refresh(budget, now)
                    except Exception:  # one budget's trouble must not stall the others
                        log.exception("could not bring budget %s up to date", budget.id)

    async def _refresh(self, budget: Budget, now: float) -> None:
        spent = await self._spent(budget, now)
        period = budget.period_key(now)
        state = BudgetState(period, spent, now)
        last = self._published.get(budget.id)
        if last is None or (last.period, last.spent_micros) != (period, spent):
            await self._states.put(budget.id, msgspec.msgpack.encode(state))
            self._published[budget.id] = state
        await self._alert_crossed(budget, period, spent, now)
        start = budget.period_start(now)
        if budget.period != "rolling" and now - start < self._late_s:
            # Late usage counts where it was queued: the period just ended may cross a threshold yet.
            end = start - 1e-6
            await self._alert_crossed(budget, budget.period_key(end), await self._spent(budget, end), now)

    async def _alert_crossed(self, budget: Budget, period: str, spent: int, now: float) -> None:
        for threshold in budget.thresholds:
            if spent * 100 >= threshold * budget.amount_micros and budget.alert_id(period, threshold) not in self._alerted:
                await self._alert(budget, period, threshold, spent, now)

    async def _spent(self, budget: Budget, now: float) -> int:
        where = ["tenant = {tenant:String}", "minute >= toStartOfMinute({start:DateTime64(6)})",
                 "minute <= {now:DateTime64(6)}"]
        params = {"tenant": budget.tenant, "start": utc(budget.period_start(now)), "now": utc(now)}
        if budget.key is not None:
            where.append("principal = {key:String}")
            params["key"] = budget.key
        rows = await self.ch.query(f"SELECT sum(cost_micros) FROM usage_minute WHERE {' AND '.join(where)}", params)
        return int(rows[0][0]) if rows else 0

    async def _alert(self, budget: Budget, period: str, threshold: int, spent: int, now: float) -> None:
        alert = BudgetAlert(
            id=budget.alert_id(period, threshold), budget_id=budget.id, tenant=budget.tenant, key=budget.key,
            threshold=threshold, period=period, spent_micros=spent, amount_micros=budget.amount_micros,
            mode=budget.mode, at=now,
        )
        # Published first: a crash before the row is written republishes under the same id.
        await self._js.publish(budget_event_subject(budget.tenant), encode(alert), headers={MSG_ID_HEADER: alert.id})
        await self.ch.insert("budget_alerts", [[
            alert.id, alert.budget_id, alert.tenant, alert.key, alert.threshold, alert.period, alert.spent_micros,
            alert.amount_micros, alert.mode, utc(alert.at),
        ]], ALERT_COLUMNS)
        self._alerted.add(alert.id)
        log.info("budget %s reached %d%% for %s", budget.id, threshold, period)
