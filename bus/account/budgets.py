"""Spending budgets per tenant or per key: the records in NATS KV and their periods.

Billing works out what each budget has spent in its current period and keeps
it in ``tg_budget_state``; edges follow both buckets, so a hard budget is
checked with no round trip.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Iterable, Literal

import msgspec
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from bus.account.credits import MAX_MICROS
from bus.buckets import bucket_values
from bus.errors import InvalidRequest, NotFound
from bus.subjects import BUDGETS_BUCKET
from bus.account.tenants import valid_id
from bus.account.webhook_policy import WebhookPolicy

DEFAULT_THRESHOLDS = [50, 75, 90, 100]
_MAX_WINDOW_S = 31 * 86400


class Budget(msgspec.Struct, forbid_unknown_fields=True):
    """At most ``amount_micros`` per period for a tenant, or for one of its keys."""

    tenant: str
    name: str
    amount_micros: int
    period: Literal["daily", "monthly", "rolling"] = "monthly"
    window_s: int | None = None  # rolling budgets: the trailing window
    key: str | None = None  # a key id: the budget covers that key alone
    mode: Literal["hard", "soft"] = "soft"  # hard refuses requests once spent; soft only alerts
    thresholds: list[int] = msgspec.field(default_factory=lambda: list(DEFAULT_THRESHOLDS))
    webhook_url: str | None = None
    webhook_secret: str | None = None  # signs webhook bodies (HMAC-SHA256)
    created: float = 0.0

    @property
    def id(self) -> str:
        return f"{self.tenant}.{self.name}"

    def period_key(self, now: float) -> str:
        """The period ``now`` falls in; a rolling budget alerts once per threshold per window length."""
        day = datetime.fromtimestamp(now, timezone.utc)
        if self.period == "daily":
            return day.strftime("%Y-%m-%d")
        if self.period == "monthly":
            return day.strftime("%Y-%m")
        return f"w{int(now // self.window_s)}"

    def period_start(self, now: float) -> float:
        """Where spending starts to count: the period's first instant, or the window's."""
        day = datetime.fromtimestamp(now, timezone.utc)
        if self.period == "daily":
            return day.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
        if self.period == "monthly":
            return day.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()
        return now - self.window_s

    def alert_id(self, period: str, threshold: int) -> str:
        return f"{self.id}:{period}:{threshold}"


class BudgetState(msgspec.Struct, frozen=True):
    """What a budget had spent in ``period`` when billing last looked."""

    period: str
    spent_micros: int
    updated: float

    def exhausted(self, budget: Budget, now: float) -> bool:
        return self.period == budget.period_key(now) and self.spent_micros >= budget.amount_micros


_budget = msgspec.msgpack.Decoder(Budget)
_state = msgspec.msgpack.Decoder(BudgetState)


def decode_budget(data: bytes) -> Budget:
    return _budget.decode(data)


def decode_state(data: bytes) -> BudgetState:
    return _state.decode(data)


def check(budget: Budget, webhook_allow: Iterable[str] = ()) -> Budget:
    """Refuse a budget that cannot work, or whose webhook points inside the network
    (unless ``webhook_allow``, the operator's allowlist, names it); return it otherwise."""
    if not valid_id(budget.tenant) or not valid_id(budget.name):
        raise InvalidRequest("tenant and name must be 1-64 letters, digits, '-' or '_'", param="name")
    if not 0 < budget.amount_micros <= MAX_MICROS:
        raise InvalidRequest(f"amount_micros must be from 1 to {MAX_MICROS}", param="amount_micros")
    if (budget.period == "rolling") != (budget.window_s is not None) or not 60 <= (budget.window_s or 60) <= _MAX_WINDOW_S:
        # Spend is read from per-minute rollups: a window is at least a minute.
        raise InvalidRequest(f"a rolling budget needs window_s between 60 and {_MAX_WINDOW_S}, and only it",
                             param="window_s")
    if not budget.thresholds or any(not 0 < t <= 100 for t in budget.thresholds):
        raise InvalidRequest("thresholds are percentages between 1 and 100", param="thresholds")
    if budget.webhook_url is not None:
        WebhookPolicy(webhook_allow).check_url(budget.webhook_url)
    budget.thresholds = sorted(set(budget.thresholds))
    return budget


class BudgetStore:
    """Budgets in KV: set (create or replace), list, delete."""

    def __init__(self, js: JetStreamContext, kv: KeyValue):
        self._js, self._kv = js, kv

    @classmethod
    async def open(cls, js: JetStreamContext) -> "BudgetStore":
        return cls(js, await js.key_value(BUDGETS_BUCKET))

    async def put(self, budget: Budget, webhook_allow: Iterable[str] = ()) -> Budget:
        budget = check(budget, webhook_allow)
        budget.created = budget.created or time.time()
        await self._kv.put(budget.id, msgspec.msgpack.encode(budget))
        return budget

    async def list(self, tenant: str | None = None) -> list[Budget]:
        budgets = [decode_budget(value) for value in await bucket_values(self._js, self._kv, BUDGETS_BUCKET)]
        return [b for b in budgets if tenant is None or b.tenant == tenant]

    async def delete(self, budget_id: str) -> None:
        try:
            await self._kv.get(budget_id)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.InvalidKeyError):
            raise NotFound(f"no budget {budget_id!r}") from None
        await self._kv.delete(budget_id)
