"""A durable JetStream pull consumer read in batches: the loop every billing consumer shares."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Awaitable, Callable

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

log = logging.getLogger(__name__)

_HEARTBEAT = "100"
# After the first message of a quiet spell, how long to let a burst gather into one batch.
_LINGER_S = 0.005
_RETRY_S = 1.0


class Batches:
    """Fetch batches from ``durable`` on ``stream`` and hand each to a handler that acks what it finished.

    Pull requests are sent by hand to one inbox with a callback: nats-py's
    ``fetch`` awaits each message with a timeout of its own, which costs more
    than storing it does at tens of thousands of events a second.
    """

    def __init__(self, nc: Client, stream: str, durable: str, batch_size: int, min_interval_s: float = 0.0):
        self._nc, self._js = nc, nc.jetstream()
        self.stream, self.durable, self.batch_size = stream, durable, batch_size
        # A batch short of batch_size waits until this long after the last one began: a steady
        # trickle then makes a few larger inserts a second instead of one per message.
        self.min_interval_s = min_interval_s
        self._last_batch = 0.0
        self._sub = None
        self._ready: list[Msg] = []
        self._ended = 0  # pull requests the server has ended with a status
        self._arrived = asyncio.Event()  # a message or a status came in

    async def start(self) -> None:
        await self._js.consumer_info(self.stream, self.durable)  # fail early if it is missing
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_msg)

    async def _on_msg(self, msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if status == _HEARTBEAT:
            return
        if status is None:
            self._ready.append(msg)
        else:  # no messages (404), expired (408), or the request was cut short (409)
            self._ended += 1
        self._arrived.set()

    async def _pull(self, request: dict, done, wait_s: float) -> None:
        """Send one pull request; wait until ``done()`` or ``wait_s`` passes."""
        await self._nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.durable}",
                               msgspec.json.encode(request), reply=self._inbox)
        with contextlib.suppress(asyncio.TimeoutError):
            async with asyncio.timeout(wait_s):
                while not done():
                    self._arrived.clear()
                    await self._arrived.wait()

    async def fetch(self, timeout: float = 1.0) -> list[Msg]:
        """Up to one batch: what is stored now, else the first messages to arrive within ``timeout``."""
        want = self.batch_size
        await self._stored(timeout)
        if not self._ready:
            # Nothing stored: wait for the first arrivals (the request lingers server-side and
            # anything it still delivers lands in the next batch).
            await self._pull({"batch": want, "expires": int(timeout * 1e9)}, lambda: bool(self._ready), timeout)
            await asyncio.sleep(_LINGER_S)
        early = self._last_batch + self.min_interval_s - time.monotonic()
        if self._ready and len(self._ready) < want and early > 0:
            await asyncio.sleep(early)
            await self._stored(timeout)
        if self._ready:
            self._last_batch = time.monotonic()
        batch, self._ready = self._ready[:want], self._ready[want:]
        return batch

    async def _stored(self, timeout: float) -> None:
        """Top the batch up with what the stream holds now (no_wait: the server sends what it
        has, then ends the request with a status)."""
        want = self.batch_size
        if len(self._ready) < want:
            ended = self._ended
            await self._pull({"batch": want - len(self._ready), "no_wait": True},
                             lambda: len(self._ready) >= want or self._ended > ended, timeout)

    async def run(self, stop: asyncio.Event, handle: Callable[[list[Msg], bool], Awaitable[None]]) -> None:
        """Feed batches to ``handle(msgs, retry)`` until ``stop`` is set.

        The next batch is fetched while the last one is handled (its ClickHouse work runs
        in a thread), but batches are handled one at a time, in order, and a batch that
        fails is retried until it succeeds before any later one: with an ack-all consumer,
        acking a later batch would ack the failed one too, and lose it. ``retry`` tells
        the handler a batch may have been partly handled before.
        """
        handling: asyncio.Task | None = None
        batch: list[Msg] = []
        while not stop.is_set():
            try:
                msgs = await self.fetch()
            except Exception:  # the connection is away: nats-py reconnects, we wait
                log.exception("%s could not fetch; trying again", self.durable)
                msgs = []
                await asyncio.sleep(_RETRY_S)
            if handling is not None and not await self._finish(handling, batch, handle, stop):
                return  # stopped with a batch unhandled: nothing after it may be acked
            handling = None
            if msgs:
                batch, handling = msgs, asyncio.create_task(handle(msgs, False))
        if handling is not None:
            await self._finish(handling, batch, handle, stop)

    async def _finish(self, handling: asyncio.Task, batch: list[Msg], handle, stop: asyncio.Event) -> bool:
        """Wait for a batch, retrying it until it is handled (True) or ``stop`` is set (False)."""
        while True:
            try:
                await handling
                return True
            except Exception:
                log.exception("%s could not handle a batch of %d; retrying it", self.durable, len(batch))
            # Nothing is acked meanwhile: a stop here leaves the batch to be redelivered.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), _RETRY_S)
            if stop.is_set():
                return False
            handling = asyncio.create_task(handle(batch, True))

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()


async def ack_each(msgs: list[Msg]) -> None:
    """Ack every message; acks are fire-and-forget publishes, flushed together."""
    for msg in msgs:
        await msg.ack()


def delivery(msg: Msg) -> tuple[int, int]:
    """How many times JetStream has delivered ``msg``, and its stream sequence, from its ack subject.

    ``msg.metadata`` parses every field; at tens of thousands a second only these are wanted.
    ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.…`` (9 tokens) or, with a domain
    and account hash, ``$JS.ACK.<domain>.<hash>.<stream>.<consumer>.<delivered>.…`` (11 or 12).
    """
    tokens = msg.reply.split(".")
    at = 4 if len(tokens) == 9 else 6
    return int(tokens[at]), int(tokens[at + 1])
