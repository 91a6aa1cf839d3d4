"""Pull work one message at a time, always from the highest-priority lane that has any."""

from __future__ import annotations

import asyncio
import contextlib

from nats.aio.client import Client
from nats.aio.msg import Msg

from bus.subjects import LANES, REQUESTS_STREAM, work_consumer

_NO_WAIT = b'{"batch":1,"no_wait":true}'


class LanePuller:
    """Scans the model's lane consumers in priority order with no-wait pulls.

    A no-wait pull answers at once (a message, or a 404 status), so a scan
    never parks a message with a busy worker. Lanes known to be empty are
    skipped until a doorbell (a publish on that lane) says otherwise, so a
    scan usually costs one round trip; ``rescan`` forgets what is known, for
    redeliveries, which ring no doorbell.
    """

    def __init__(self, nc: Client, model: str):
        self._nc = nc
        self._targets = {
            lane: f"$JS.API.CONSUMER.MSG.NEXT.{REQUESTS_STREAM}.{work_consumer(model, lane)}" for lane in LANES
        }
        self._maybe = set(LANES)
        self._inbox = nc.new_inbox()
        self._sub = None

    async def open(self) -> "LanePuller":
        self._sub = await self._nc.subscribe(self._inbox)
        return self

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    def ring(self, lane: str) -> None:
        """Note that ``lane`` may have work."""
        self._maybe.add(lane)

    def rescan(self) -> None:
        self._maybe = set(LANES)

    async def next(self) -> Msg | None:
        """The next message from the highest non-empty lane, or None if all are empty."""
        for lane in LANES:
            if lane not in self._maybe:
                continue
            await self._nc.publish(self._targets[lane], _NO_WAIT, reply=self._inbox)
            try:
                msg = await self._sub.next_msg(timeout=2.0)
            except (asyncio.TimeoutError, TimeoutError):
                continue
            if msg.headers and msg.headers.get("Status"):
                self._maybe.discard(lane)  # 404: nothing there now
                continue
            return msg
        return None
