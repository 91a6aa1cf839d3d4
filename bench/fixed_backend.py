"""A benchmark-only backend that answers at once, so a run measures the gateway, not a model."""

from __future__ import annotations

import asyncio
import sys
from typing import AsyncIterator

from bus.protocol import ChatBody
from consumers.backends.base import ChatResult

ANSWER = "The capital of France is Paris."


class FixedBackend:
    kinds = frozenset({"chat"})

    async def chat(self, body: ChatBody, cancel: asyncio.Event) -> AsyncIterator[str | ChatResult]:
        yield ANSWER
        yield ChatResult("stop", 12, 8)


if __name__ == "__main__":
    # python bench/fixed_backend.py MODEL: a worker process serving MODEL with this backend.
    import uvloop

    from bus.settings import load_settings
    from consumers.serve import serve_model

    uvloop.install()  # as `tollgate worker` does: the benchmark measures the loop real workers run on
    asyncio.run(serve_model(load_settings(), sys.argv[1], backend=FixedBackend()))
