"""Pull work one message at a time, lanes sharing the worker by weight."""

from __future__ import annotations

import asyncio
import contextlib

from nats.aio.client import Client
from nats.aio.msg import Msg

from bus.subjects import LANES, REQUESTS_STREAM, work_consumer

_NO_WAIT = b'{"batch":1,"no_wait":true}'


class LanePuller:
    """Pulls the model's lane consumers one message at a time, sharing the worker by lane weight.

    Lanes with work are served in proportion to their weights (stride scheduling):
    each lane keeps a *pass*, advanced by ``1 / weight`` whenever it is served, and
    the lane with the lowest pass goes first, ties to the higher lane. A flood on a
    high lane therefore slows the lower ones but never stops them; an idle lane banks
    no credit (its pass restarts at the clock), so a returning lane cannot monopolise
    the worker either.

    A no-wait pull answers at once (a message, or a 404 status), so a scan never parks
    a message with a busy worker. Lanes known to be empty are skipped until a doorbell
    (a publish on that lane) says otherwise, so a scan usually costs one round trip;
    ``rescan`` forgets what is known, for redeliveries, which ring no doorbell.
    """

    def __init__(self, nc: Client, model: str, weights: dict[str, int]):
        self._nc = nc
        self._targets = {
            lane: f"$JS.API.CONSUMER.MSG.NEXT.{REQUESTS_STREAM}.{work_consumer(model, lane)}" for lane in LANES
        }
        self._stride = {lane: 1.0 / max(1, weights.get(lane, 1)) for lane in LANES}
        self._pass = dict.fromkeys(LANES, 0.0)
        self._clock = 0.0
        self._maybe = set(LANES)
        # Doorbells per lane: a scan's "empty" is believed only if no doorbell rang since its pull
        # left, or a publish whose doorbell lands while the server answers "nothing there" is lost
        # until the next rescan (a second's stall, seen on a few percent of requests).
        self._rings = dict.fromkeys(LANES, 0)
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
        """Note that ``lane`` may have work (a subject's lane token, so only a known lane counts)."""
        if lane in self._targets:
            self._maybe.add(lane)
            self._rings[lane] += 1

    def rescan(self) -> None:
        self._maybe = set(LANES)

    def _served(self, lane: str) -> None:
        start = max(self._pass[lane], self._clock)
        self._clock = start
        self._pass[lane] = start + self._stride[lane]

    async def next(self) -> Msg | None:
        """The next message by lane share, or None if all lanes are empty."""
        for lane in sorted(self._maybe, key=lambda lane: (max(self._pass[lane], self._clock), LANES.index(lane))):
            rings = self._rings[lane]
            await self._nc.publish(self._targets[lane], _NO_WAIT, reply=self._inbox)
            try:
                msg = await self._sub.next_msg(timeout=2.0)
            except (asyncio.TimeoutError, TimeoutError):
                continue
            if msg.headers and msg.headers.get("Status"):
                if self._rings[lane] == rings:
                    self._maybe.discard(lane)  # 404: nothing there now
                continue
            self._served(lane)
            return msg
        return None
