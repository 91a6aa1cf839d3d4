"""Dynamic batching: concurrent requests' work gathered into one model call.

A backend hands each request's item to ``Batcher.submit``. The batcher takes the oldest waiting
item, gathers the others that may run with it (the same ``key``) for at most ``wait_s`` or until
``max_batch`` units of work wait (inputs, images), and runs them in one call of the backend's
``run``. Items with another key wait for a later call, oldest first. What queued up while a call
ran joins the next one at once, so under load calls fill up without waiting.

A request that leaves (its cancel event set, or its coroutine cancelled) is dropped from a call
not yet started, its result thrown away from one that has; a call whose every request left is
told so through ``Batch.abandoned``, which ``run`` may watch from its thread to stop early.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Generic, Hashable, TypeVar

from consumers import metrics

T = TypeVar("T")
R = TypeVar("R")


@dataclass(eq=False)
class _Entry(Generic[T]):
    item: T
    size: int
    key: Hashable
    done: asyncio.Future


@dataclass(eq=False)
class Batch(Generic[T]):
    """The items of one call, and an event set (from the event loop) once every one of their requests left."""

    items: list[T]
    abandoned: threading.Event = field(default_factory=threading.Event)
    _waiting: int = 0


class Batcher(Generic[T, R]):
    """Gathers items that may run together and runs them, one call at a time, with ``run``.

    ``run(batch)`` returns one result per item, in order; if it raises, every request of the call
    gets the error. ``size`` says how much of ``max_batch`` an item takes; ``key`` which items may
    share a call.
    """

    def __init__(self, run: Callable[[Batch[T]], Awaitable[list[R]]], *, kind: str, max_batch: int, wait_s: float,
                 size: Callable[[T], int] = lambda item: 1, key: Callable[[T], Hashable] = lambda item: None):
        self._run, self._kind = run, kind
        self._max_batch, self._wait_s = max_batch, wait_s
        self._size, self._key = size, key
        # Bounded by the worker's concurrency: each waiting entry is a request it is running.
        self._waiting: list[_Entry[T]] = []
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.calls = 0  # calls run: what batching saves is visible here

    async def submit(self, item: T, cancel: asyncio.Event) -> R | None:
        """``item``'s result from the call it ran in, or None if ``cancel`` was set first."""
        entry = _Entry(item, self._size(item), self._key(item), asyncio.get_running_loop().create_future())
        if self._task is None or self._task.done():
            # A context of its own: the first request's (its trace id) must not name every later call.
            self._task = asyncio.create_task(self._batch_forever(), context=contextvars.Context())
        self._waiting.append(entry)
        self._arrived.set()
        cancelled = asyncio.ensure_future(cancel.wait())
        try:
            await asyncio.wait({entry.done, cancelled}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cancelled.cancel()
            if not entry.done.done():  # left: the call skips it, or drops what it made for it
                entry.done.cancel()
        return None if entry.done.cancelled() else entry.done.result()  # a failed call fails its requests

    async def _batch_forever(self) -> None:
        while True:
            entries = await self._gather()
            batch = Batch([e.item for e in entries], _waiting=len(entries))

            def left(_: asyncio.Future, batch=batch) -> None:
                batch._waiting -= 1
                if not batch._waiting:
                    batch.abandoned.set()

            for entry in entries:
                entry.done.add_done_callback(left)
            metrics.batched(self._kind, len(entries))
            self.calls += 1
            try:
                results = await self._run(batch)
                if len(results) != len(entries):
                    raise RuntimeError(f"a batched call gave {len(results)} results for {len(entries)} requests")
            except Exception as exc:
                for entry in entries:
                    if not entry.done.done():
                        entry.done.set_exception(exc)
                continue
            for entry, result in zip(entries, results):
                if not entry.done.done():
                    entry.done.set_result(result)

    async def _gather(self) -> list[_Entry[T]]:
        """The next call's entries: the oldest waiting one's key, for up to ``wait_s`` or ``max_batch``."""
        loop = asyncio.get_running_loop()
        while True:
            self._waiting = [e for e in self._waiting if not e.done.done()]  # their requests left
            if self._waiting:
                break
            self._arrived.clear()
            await self._arrived.wait()
        key = self._waiting[0].key
        until = loop.time() + self._wait_s
        while True:
            self._waiting = [e for e in self._waiting if not e.done.done()]
            taken, total, full = [], 0, False
            for entry in (e for e in self._waiting if e.key == key):
                if taken and total + entry.size > self._max_batch:
                    full = True  # it waits for the next call
                    continue
                taken.append(entry)
                total += entry.size
            left = until - loop.time()
            if not taken or full or total >= self._max_batch or left <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:
                pass
        if not taken:  # the oldest left while the others were gathered: start again
            return await self._gather()
        self._waiting = [e for e in self._waiting if e not in taken]
        return taken
