"""Worker liveness: workers announce themselves in a TTL'd KV bucket, edges watch it."""

from __future__ import annotations

import asyncio
import contextlib
import time

import msgspec
from nats.js.kv import KeyValue

from bus.protocol import WorkerAnnouncement
from bus.subjects import liveness_key, token
from bus.watched import WatchedBucket

_decode = msgspec.msgpack.Decoder(WorkerAnnouncement).decode


class LiveWorkers(WatchedBucket[WorkerAnnouncement]):
    """Which models have at least one live worker right now."""

    def __init__(self, kv: KeyValue):
        super().__init__(kv, _decode)

    def serving(self, model: str) -> bool:
        prefix = token(model) + "."
        return any(key.startswith(prefix) for key in self._items)


@contextlib.asynccontextmanager
async def announced(kv: KeyValue, model: str, worker_id: str, every_s: float):
    """Keep ``worker_id`` listed as live for ``model`` while the block runs; unlist on exit."""
    key = liveness_key(model, worker_id)
    value = msgspec.msgpack.encode(WorkerAnnouncement(worker_id, model, time.time()))
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
