"""A worker killed mid-request: the client gets a clear error fast, and the work never runs again."""

from __future__ import annotations

import asyncio
import signal
import time

import openai
import pytest

from bus.subjects import REQUESTS_STREAM
from infra.nats.roles import worker_role
from tests.conftest import SPARE_MODEL, eventually, request_id, usage_rows

STORY = [{"role": "user", "content": "Write a very long story about a dragon who learns to bake bread."}]


async def test_killed_worker_fails_the_request_well_within_its_deadline(stack, client, nc, clickhouse):
    worker = stack.spawn(worker_role(SPARE_MODEL), "worker", "--model", SPARE_MODEL)
    await asyncio.to_thread(stack.wait_serving, SPARE_MODEL)
    stream = await client.chat.completions.create(
        model=SPARE_MODEL, messages=STORY, temperature=0, max_tokens=1500, stream=True
    )
    chunks = aiter(stream)
    first = await anext(chunks)
    rid = request_id(first.id)
    worker.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    with pytest.raises(openai.APIError) as err:
        async for _ in chunks:
            pass
    waited = time.monotonic() - killed
    assert "stopped responding" in str(err.value)
    assert waited < stack.settings.edge.worker_silence_s + 3 < stack.settings.edge.request_timeout_s / 4

    # A new worker sees the redelivered message after ack_wait, and terminates it unrun:
    # the client has gone, so running it would bill for an answer nobody receives.
    replacement = stack.spawn(worker_role(SPARE_MODEL), "worker", "--model", SPARE_MODEL)
    js = nc.jetstream()

    async def queue_empty():
        return (await js.stream_info(REQUESTS_STREAM)).state.messages == 0

    await eventually(queue_empty, timeout=30)
    assert await usage_rows(clickhouse, [rid], expect=1, timeout=2) == []
    replacement.terminate()
    await asyncio.to_thread(replacement.wait, 15)
    await asyncio.to_thread(stack.wait_serving, SPARE_MODEL, False, 10)
