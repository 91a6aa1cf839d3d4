"""A durable JetStream pull consumer read in batches: the loop every billing consumer shares."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Awaitable, Callable

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

log = logging.getLogger(__name__)


class Batches:
    """Fetch batches from ``durable`` on ``stream`` and hand each to a handler that acks what it finished."""

    def __init__(self, nc: Client, stream: str, durable: str, batch_size: int):
        self._js = nc.jetstream()
        self.stream, self.durable, self.batch_size = stream, durable, batch_size
        self._sub = None

    async def start(self) -> None:
        self._sub = await self._js.pull_subscribe_bind(self.durable, self.stream)

    async def fetch(self, timeout: float = 1.0) -> list[Msg]:
        """Up to one batch; empty if nothing came within ``timeout``."""
        try:
            return await self._sub.fetch(self.batch_size, timeout=timeout)
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            return []

    async def run(self, stop: asyncio.Event, handle: Callable[[list[Msg]], Awaitable[None]]) -> None:
        """Feed batches to ``handle`` until ``stop`` is set; a failed batch is left to be redelivered."""
        while not stop.is_set():
            msgs = await self.fetch()
            if not msgs:
                continue
            try:
                await handle(msgs)
            except Exception:
                # Unacked, the batch comes back after ack_wait: nothing is lost while a dependency is away.
                log.exception("%s could not handle a batch of %d; it will be redelivered", self.durable, len(msgs))
                await asyncio.sleep(1.0)

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()


async def ack_all(msgs: list[Msg]) -> None:
    """Ack every message; acks are fire-and-forget publishes, flushed together."""
    for msg in msgs:
        await msg.ack()
