"""A local, always-current copy of a KV bucket, so hot-path lookups cost no round trip."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Generic, TypeVar

from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

log = logging.getLogger(__name__)
T = TypeVar("T")


class WatchedBucket(Generic[T]):
    """Mirror of a KV bucket kept current by a watcher; values decoded once on arrival."""

    def __init__(self, kv: KeyValue, decode: Callable[[bytes], T],
                 on_change: Callable[[str, T | None], None] | None = None):
        self._kv = kv
        self._decode = decode
        self._on_change = on_change  # keeps a caller's index in step: (key, new value or None)
        self._items: dict[str, T] = {}
        self._task: asyncio.Task | None = None
        self._watcher = None

    async def start(self) -> None:
        """Load the bucket and keep following it; returns once the initial load is done."""
        self._watcher = await self._kv.watchall()
        loaded = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._follow(loaded))
        await loaded

    async def _follow(self, loaded: asyncio.Future) -> None:
        async for entry in self._watcher:
            if entry is None:  # end of the initial values
                loaded.set_result(None)
                continue
            if entry.operation in (KV_DEL, KV_PURGE):
                self._items.pop(entry.key, None)
            else:
                try:
                    self._items[entry.key] = self._decode(entry.value)
                except Exception:
                    log.warning("ignoring undecodable value for %s in a watched bucket", entry.key)
                    continue
            if self._on_change is not None:
                self._on_change(entry.key, self._items.get(entry.key))

    async def stop(self) -> None:
        if self._watcher is not None:
            await self._watcher.stop()
        if self._task is not None:
            await self._task

    def get(self, key: str) -> T | None:
        return self._items.get(key)

    def values(self) -> list[T]:
        return list(self._items.values())
