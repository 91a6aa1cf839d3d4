"""Releasing holds that no usage will ever settle.

Edges report every hold as they take it (``tg.hold.<tenant>``). Most are
settled by the meter from the request's usage; a request that expired in the
queue, was cancelled before it ran or lost its worker never produces usage,
and its hold would stay taken. Once such a request is past its deadline (plus
a grace for usage still on its way) and the meter has stored everything
published until then, its hold is given back under the message id a
settlement uses (``settle-<request>``), so the two cannot both count.
"""

from __future__ import annotations

import logging
import time

from nats.aio.client import Client
from nats.aio.msg import Msg

from billing.batches import Batches
from billing.clickhouse import ClickHouse
from billing.meter import Watermark
from bus.account import credits
from bus.protocol import HoldNotice, decode_hold
from bus.settings import Settings
from bus.subjects import HOLDS_CONSUMER, HOLDS_STREAM

log = logging.getLogger(__name__)

_RECHECK_S = 1.0
# A hold's notice is looked at again this often until usage settles it, so a notice stays in the
# stream only about as long as its request is open (grant expiry waits for the tenant's oldest).
_LOOK_AGAIN_S = 5.0


class HoldSweeper(Batches):
    def __init__(self, settings: Settings, nc: Client, ch: ClickHouse):
        super().__init__(nc, HOLDS_STREAM, HOLDS_CONSUMER, settings.meter.batch_size)
        self.ch = ch
        self.grace_s = settings.meter.hold_grace_s
        self._watermark = Watermark(self._js)
        self._settle_window_s = credits.settle_window_s(settings)

    async def handle(self, msgs: list[Msg], retry: bool = False) -> None:
        notices: list[tuple[Msg, HoldNotice]] = []
        for msg in msgs:
            try:
                notices.append((msg, decode_hold(msg.data)))
            except Exception:
                log.error("terminated a malformed hold notice on %s", msg.subject)
                await msg.term()
        if not notices:
            return
        metered = await self._metered([n.request_id for _, n in notices])
        now = time.time()
        due: list[tuple[Msg, HoldNotice]] = []
        for msg, notice in notices:
            if notice.request_id in metered:
                self._watermark.forget(notice.request_id)
                await self._close(msg, notice, metered)
                continue
            wait = notice.deadline + self.grace_s - now
            if wait > 0:
                await msg.nak(delay=min(wait, _LOOK_AGAIN_S))
            elif not await self._watermark.passed(notice.request_id):
                await msg.nak(delay=_RECHECK_S)  # usage published before now is not all stored yet
            else:
                due.append((msg, notice))
        # Looked up once more: the usage may have been stored since the first look.
        metered = await self._metered([n.request_id for _, n in due]) if due else {}
        for msg, notice in due:
            await self._close(msg, notice, metered)

    async def _close(self, msg: Msg, notice: HoldNotice, metered: dict[str, tuple[int, bool]]) -> None:
        """Settle what the meter did not, then let the notice go.

        Usage stored in time was settled by the meter; usage stored late (past the counter's
        dedupe window) is settled here, once, for the recorded hold; no usage at all, once the
        watermark has passed, means the whole hold goes back.
        """
        if notice.request_id not in metered:
            await credits.settle(self._js, notice.tenant, notice.request_id, notice.hold_micros, 0)
            log.info("released the hold of %s: it ended without usage", notice.request_id)
        else:
            cost, late = metered[notice.request_id]
            if late:
                await credits.settle(self._js, notice.tenant, notice.request_id, notice.hold_micros,
                                     min(cost, notice.hold_micros))
        await msg.ack()

    async def _metered(self, request_ids: list[str]) -> dict[str, tuple[int, bool]]:
        """The stored requests among ``request_ids``: their cost, and whether they were stored too late
        for the meter to settle them (``credits.settle_window_s`` after they were queued)."""
        rows = await self.ch.query(
            "SELECT request_id, any(cost_micros), "
            # The meter's own test, on the ``inserted_at`` it stamped: exactly one of the two settles.
            "min(toUnixTimestamp64Micro(inserted_at) - toUnixTimestamp64Micro(queued_at)) >= {window:Float64} * 1e6 "
            "FROM usage_events WHERE request_id IN {ids:Array(String)} GROUP BY request_id",
            {"ids": request_ids, "window": self._settle_window_s})
        return {request_id: (cost, bool(late)) for request_id, cost, late in rows}
