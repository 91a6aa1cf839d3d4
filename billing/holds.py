"""Releasing holds that no usage will ever settle.

Edges report every held request when it ends (``tg.hold.<tenant>``). Most
were settled by the meter already; a request that expired in the queue, was
cancelled before it ran or lost its worker never produces usage, and its hold
would stay taken. Once such a request is past its deadline (plus a grace for
usage still on its way) and the meter has caught up, its hold is given back
under the same message id a settlement uses, so it can never count twice.
"""

from __future__ import annotations

import logging
import time

from nats.aio.client import Client
from nats.aio.msg import Msg

from billing.batches import Batches
from billing.clickhouse import ClickHouse
from billing.meter import meter_caught_up
from bus import credits
from bus.protocol import HoldNotice, decode_hold
from bus.settings import Settings
from bus.subjects import HOLDS_CONSUMER, HOLDS_STREAM

log = logging.getLogger(__name__)

_RECHECK_S = 30.0


class HoldSweeper(Batches):
    def __init__(self, settings: Settings, nc: Client, ch: ClickHouse):
        super().__init__(nc, HOLDS_STREAM, HOLDS_CONSUMER, settings.meter.batch_size)
        self.ch = ch
        self.grace_s = settings.meter.hold_grace_s

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
        metered = {rid for (rid,) in await self.ch.query(
            "SELECT request_id FROM usage_events WHERE request_id IN {ids:Array(String)}",
            {"ids": [n.request_id for _, n in notices]},
        )}
        now = time.time()
        caught_up: bool | None = None
        for msg, notice in notices:
            if notice.request_id in metered:
                await msg.ack()  # the meter settled it
                continue
            wait = notice.deadline + self.grace_s - now
            if wait <= 0 and caught_up is None:
                caught_up = await meter_caught_up(self._js)
            if wait > 0 or not caught_up:
                await msg.nak(delay=min(max(wait, 1.0), _RECHECK_S))
                continue
            await credits.settle(self._js, notice.tenant, notice.request_id, notice.hold_micros, 0)
            log.info("released the hold of %s: it ended without usage", notice.request_id)
            await msg.ack()
