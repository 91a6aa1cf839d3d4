"""Rate limits that hold across every edge process, with no round trip on most requests.

Per-minute budgets (requests, tokens) live in JetStream counters, one subject
per scope and minute (``Nats-Incr``). An edge claims a *lease* — a slice of
the minute's allowance — and spends it locally; the counter's total after a
claim says how much of the claim fits under the limit, and the part that does
not is given back. Claims can only under-use the limit (a lease left unspent
when the minute ends is lost), never exceed it, however many edges there are.

Requests in flight are counted in one KV entry per scope: a map of edge id ->
(count, last seen), changed by compare-and-set, so the check is exact; an
edge that dies stops counting once its entry goes stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass, field

import msgspec
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from bus.counters import add
from bus.errors import NoCapacity, RateLimited
from bus.subjects import rate_counter
from bus.account.tenants import Policy

log = logging.getLogger(__name__)

WINDOW_S = 60
_STALE_S = 30.0
_CAS_TRIES = 20


class MinuteBudget:
    """One scope's per-minute allowance of one metric, spent from local leases."""

    def __init__(self, js: JetStreamContext, metric: str, scope: str, limit: int):
        self._js, self.metric, self.scope, self.limit = js, metric, scope, limit
        self._lease = max(1, limit // 20)
        self._window, self._left, self._seen = -1, 0, 0
        self._claiming = asyncio.Lock()

    def _roll(self, window: int) -> None:
        if window != self._window:
            self._window, self._left, self._seen = window, 0, 0

    async def take(self, n: int, now: float) -> bool:
        window = int(now // WINDOW_S)
        self._roll(window)
        if n > self.limit:
            return False  # can never fit: claim nothing, so nothing is hoarded for it
        if self._left < n:
            # One claim in flight per budget: the others wait for it and spend its lease.
            async with self._claiming:
                self._roll(window)
                if self._left < n:
                    await self._claim(window, n - self._left, max(n - self._left, self._lease))
        if self._left < n:
            return False
        self._left -= n
        return True

    async def _claim(self, window: int, need: int, want: int) -> None:
        """Claim ``want`` from the shared counter; keep it only if at least ``need`` fits."""
        subject = rate_counter(self.metric, self.scope, window)
        total = await add(self._js, subject, want)
        granted = max(0, min(want, self.limit - (total - want)))
        if granted < need:
            granted = 0  # a claim that cannot cover the request is given back whole
        if granted < want:  # give back what is not kept, so nobody is refused for it
            total = await add(self._js, subject, granted - want)
        self._roll(window)
        self._seen = max(self._seen, total)
        self._left += granted

    def give_back(self, n: int, window: int) -> int:
        """Return ``n`` taken in ``window`` by a request refused elsewhere; return what exceeds a lease,
        which the caller hands back to the shared counter, so no edge sits on more than a lease."""
        if window != self._window:
            return 0  # that minute is over: its counter no longer matters
        self._left += n
        excess = max(0, self._left - self._lease)
        self._left -= excess
        return excess

    @property
    def window(self) -> int:
        """The minute this budget last spent in."""
        return self._window

    def remaining(self) -> int:
        return max(0, self.limit - self._seen) + self._left


class InFlight:
    """Exact cross-edge counts of requests in flight, one CAS'd KV entry per scope."""

    def __init__(self, kv: KeyValue, edge_id: str):
        self._kv, self._edge = kv, edge_id
        self._mine: dict[str, int] = {}
        # One change at a time per scope from this edge: only other edges can race a CAS.
        self._locks: dict[str, asyncio.Lock] = {}
        self._cache: dict[str, tuple[dict, int | None]] = {}
        self._owed: dict[str, int] = {}

    async def _change(self, scope: str, delta: int, limit: int | None) -> bool:
        lock = self._locks.setdefault(scope, asyncio.Lock())
        async with lock:
            return await self._cas(scope, delta, limit)

    async def _cas(self, scope: str, delta: int, limit: int | None) -> bool:
        # Our last write is usually still the latest: try it first, one round trip; a
        # stale copy only costs a failed CAS (or a re-read before refusing).
        cached = self._cache.get(scope)
        for attempt in range(_CAS_TRIES):
            if cached is None:
                try:
                    entry = await self._kv.get(scope)  # scopes are valid KV keys
                    cached = (msgspec.msgpack.decode(entry.value), entry.revision)
                except nats.js.errors.KeyNotFoundError:
                    cached = ({}, None)
                fresh = True
            else:
                fresh = False
            now = time.time()
            counts = {e: v for e, v in cached[0].items() if now - v[1] < _STALE_S or e == self._edge}
            if limit is not None and sum(v[0] for v in counts.values()) + delta > limit:
                if fresh:
                    return False
                cached = None
                continue
            mine = max(0, counts.get(self._edge, [0, 0])[0] + delta)
            counts[self._edge] = [mine, now]
            try:
                data = msgspec.msgpack.encode(counts)
                if cached[1] is None:
                    revision = await self._kv.create(scope, data)
                else:
                    revision = await self._kv.update(scope, data, last=cached[1])
                self._cache[scope] = (counts, revision)
                self._mine[scope] = mine
                return True
            except nats.js.errors.KeyWrongLastSequenceError:
                cached = None  # another edge changed it first
                await asyncio.sleep(random.uniform(0, 0.001 * attempt))
        raise NoCapacity(f"The in-flight count for {scope} is too contended to change; try again.",
                         code="rate_limiter_unavailable")

    async def acquire(self, scope: str, limit: int) -> bool:
        return await self._change(scope, +1, limit)

    async def release(self, scope: str) -> None:
        try:
            await self._change(scope, -1, None)
        except Exception:
            log.warning("could not release an in-flight slot for %s yet; retrying", scope)
            self._owed[scope] = self._owed.get(scope, 0) + 1

    async def keep_fresh(self) -> None:
        """Re-stamp this edge's entries so long requests are not mistaken for a dead edge's,
        and hand back slots whose release failed."""
        while True:
            await asyncio.sleep(_STALE_S / 3)
            for scope, count in list(self._mine.items()):
                owed = self._owed.pop(scope, 0)
                if count or owed:
                    try:
                        await self._change(scope, -owed, None)
                    except Exception:
                        self._owed[scope] = self._owed.get(scope, 0) + owed
            # Scopes with nothing in flight here are forgotten, so the maps grow with the requests
            # in flight, not with every key and model ever seen.
            for scope in [s for s, count in self._mine.items() if not count and s not in self._owed]:
                lock = self._locks.get(scope)
                if lock is None or not lock.locked():
                    del self._mine[scope]
                    self._cache.pop(scope, None)
                    self._locks.pop(scope, None)


def _reset(seconds: float) -> str:
    whole = math.ceil(seconds)
    return f"{whole // 60}m{whole % 60}s" if whole >= 60 else f"{whole}s"


@dataclass
class Admission:
    """What admission charged, to settle when the request ends."""

    headers: dict[str, str]
    window: int
    token_budgets: list[MinuteBudget]
    estimate: int
    in_flight: list[str] = field(default_factory=list)


class RateLimiter:
    def __init__(self, js: JetStreamContext, inflight: InFlight):
        self._js = js
        self._inflight = inflight
        self._budgets: dict[tuple[str, str, int], MinuteBudget] = {}
        self._settling: set[asyncio.Task] = set()
        self._corrections: dict[str, int] = {}
        self._pruned = -1  # the minute whose stale budgets were last dropped

    def _budget(self, metric: str, scope: str, limit: int) -> MinuteBudget:
        key = (metric, scope, limit)  # a changed limit starts a fresh local budget
        budget = self._budgets.get(key)
        if budget is None:
            budget = self._budgets[key] = MinuteBudget(self._js, metric, scope, limit)
        return budget

    async def admit(self, policy: Policy, estimate: int) -> Admission:
        """Charge one request and ``estimate`` tokens to every scope of ``policy``, or raise RateLimited.

        A refusal at any scope gives back what the scopes before it took. Not safe to
        cancel half way: run it shielded (``edge.admission``).
        """
        now = time.time()
        window = int(now // WINDOW_S)
        reset = WINDOW_S - now % WINDOW_S
        headers: dict[str, str] = {}
        token_budgets: list[MinuteBudget] = []
        taken: list[tuple[MinuteBudget, int]] = []
        for metric, limit_of, amount in (("requests", "rpm", 1), ("tokens", "tpm", estimate)):
            budgets = [self._budget(metric, scope, getattr(lim, limit_of)) for scope, lim in policy.limits
                       if getattr(lim, limit_of) is not None]
            for budget in budgets:
                if not await budget.take(amount, now):
                    await self._give_back(taken, window)
                    who = "this API key" if budget.scope.startswith("k.") else "your organization"
                    model = " for this model" if ".m." in budget.scope else ""
                    raise RateLimited(
                        f"Rate limit reached for {who}{model} on {metric} per minute: limit {budget.limit}. "
                        f"Try again in {_reset(reset)}.",
                        kind=metric,
                        retry_after_s=reset,
                        headers={f"x-ratelimit-limit-{metric}": str(budget.limit),
                                 f"x-ratelimit-remaining-{metric}": str(budget.remaining()),
                                 f"x-ratelimit-reset-{metric}": _reset(reset)},
                    )
                taken.append((budget, amount))
            if budgets:
                tightest = min(budgets, key=MinuteBudget.remaining)
                headers[f"x-ratelimit-limit-{metric}"] = str(tightest.limit)
                headers[f"x-ratelimit-remaining-{metric}"] = str(tightest.remaining())
                headers[f"x-ratelimit-reset-{metric}"] = _reset(reset)
            if metric == "tokens":
                token_budgets = budgets
        admission = Admission(headers, int(now // WINDOW_S), token_budgets, estimate)
        limited = [(scope, lim.concurrency) for scope, lim in policy.limits if lim.concurrency is not None]
        if limited:
            # Every scope in parallel: one round trip, not one each.
            got = await asyncio.gather(*(self._inflight.acquire(scope, limit) for scope, limit in limited),
                                       return_exceptions=True)
            admission.in_flight = [scope for (scope, _), ok in zip(limited, got) if ok is True]
            if not all(ok is True for ok in got):
                await self._give_back(taken, window)
                await self._release(admission)
                failure = next((ok for ok in got if isinstance(ok, BaseException)), None)
                if failure is not None:
                    raise NoCapacity("The rate limiter is unavailable right now. Try again shortly.",
                                     code="rate_limiter_unavailable") from failure
                limit = min(limit for (_, limit), ok in zip(limited, got) if ok is False)
                raise RateLimited(
                    f"Too many requests in flight: limit {limit}. Try again when one finishes.",
                    kind="requests",
                    retry_after_s=1,
                )
        return admission

    async def _give_back(self, taken: list[tuple[MinuteBudget, int]], window: int) -> None:
        for budget, amount in taken:
            excess = budget.give_back(amount, window)
            if excess:  # more than a lease: back to the shared counter now, for every edge to use
                with contextlib.suppress(Exception):  # lost, it only under-admits until the minute ends
                    await add(self._js, rate_counter(budget.metric, budget.scope, window), -excess)

    def finish_soon(self, admission: Admission, actual_tokens: int | None) -> None:
        """``finish`` off the response's path: the client need not wait for the bookkeeping."""
        self._correct(admission, actual_tokens)
        if admission.in_flight:
            task = asyncio.create_task(self._release(admission))
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)

    async def finish(self, admission: Admission, actual_tokens: int | None) -> None:
        """Free the in-flight slots and correct the token estimate by what was really used."""
        self._correct(admission, actual_tokens)
        await self._release(admission)

    async def _release(self, admission: Admission) -> None:
        for scope in admission.in_flight:
            await self._inflight.release(scope)

    def _correct(self, admission: Admission, actual_tokens: int | None) -> None:
        if actual_tokens is None or actual_tokens == admission.estimate:
            return
        for budget in admission.token_budgets:
            subject = rate_counter("tokens", budget.scope, admission.window)
            self._corrections[subject] = self._corrections.get(subject, 0) + actual_tokens - admission.estimate

    async def flush_corrections(self, every_s: float = 0.2) -> None:
        """Apply token corrections in batches: one counter update per scope and tick, not per request."""
        while True:
            await asyncio.sleep(every_s)
            window = int(time.time() // WINDOW_S)
            if window != self._pruned:
                # Once a minute: a budget of a minute gone holds nothing usable (its lease lapsed).
                self._pruned = window
                self._budgets = {k: b for k, b in self._budgets.items() if b.window >= window - 1}
            pending, self._corrections = self._corrections, {}
            for subject, delta in pending.items():
                if delta:
                    with contextlib.suppress(Exception):
                        await add(self._js, subject, delta)
