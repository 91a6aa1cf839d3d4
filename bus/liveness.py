"""Liveness: workers and publishers announce themselves in TTL'd KV buckets, and are watched.

Edges watch the workers (a model without one is a fast 503); workers watch the
publishers (work whose edge or service is gone would be run for nobody, and billed).
"""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
from nats.js.kv import KeyValue

import nats.js.errors

from bus.protocol import WorkerAnnouncement
from bus.subjects import token
from bus.watched import WatchedBucket

_decode = msgspec.msgpack.Decoder(WorkerAnnouncement).decode


class LiveWorkers(WatchedBucket[WorkerAnnouncement]):
    """Which models have at least one live worker right now."""

    def __init__(self, kv: KeyValue):
        super().__init__(kv, _decode)

    def serving(self, model: str) -> bool:
        prefix = token(model) + "."
        return any(key.startswith(prefix) for key in self._items)


class LivePublishers(WatchedBucket[bytes]):
    """Which publishers (edge processes, SDK services) are alive, by the id their replies go to."""

    def __init__(self, kv: KeyValue):
        super().__init__(kv, bytes)

    async def alive(self, publisher: str) -> bool:
        """True if ``publisher`` is announced; a local miss is checked on the server (it may be new)."""
        if publisher in self._items:
            return True
        try:
            await self._kv.get(publisher)
            return True
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return False


@contextlib.asynccontextmanager
async def announced(kv: KeyValue, key: str, value: bytes, every_s: float):
    """Keep ``key`` listed as live while the block runs (re-put every ``every_s``); unlist on exit."""
    await kv.put(key, value)

    async def renew():
        while True:
            await asyncio.sleep(every_s)
            with contextlib.suppress(Exception):  # a missed renewal is retried next tick
                await kv.put(key, value)

    task = asyncio.create_task(renew())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(Exception):
            await kv.delete(key)
