"""Continuous batching: sequences decoding together each get exactly what they would get alone."""

from __future__ import annotations

import asyncio
import time

import pytest

from bus.subjects import LANES, REQUESTS_STREAM, work_consumer
from tests.conftest import admin, eventually, request_id, usage_rows

BATCH8, BATCH2 = "smollm2-135m-batch8", "smollm2-135m-batch2"
COUNTING = "1, 2, 3, 4, 5, 6,"  # a raw prompt the model keeps counting after: no early end token

# Eight requests that differ in everything a sequence keeps to itself.
EIGHT = [
    dict(messages="What is the capital of France?", temperature=0, max_tokens=12),
    dict(messages="Name three colors.", temperature=0.7, top_p=0.9, seed=7, max_tokens=16),
    dict(messages="Count to five.", temperature=0, stop=["."], max_tokens=20),
    dict(messages="Say hello in Spanish.", temperature=1.0, seed=11, max_tokens=17),
    dict(messages="What is 2+2?", temperature=0, max_tokens=10),
    dict(messages="Write a haiku about the sea.", temperature=0.5, top_p=0.8, seed=3, stop=["sea"], max_tokens=18),
    dict(messages="Who wrote Hamlet?", temperature=0, stop=["\n"], max_tokens=21),
    dict(messages="What is water made of?", temperature=0.9, seed=5, max_tokens=22),
]


@pytest.fixture(scope="module")
def batch_workers(stack):
    stack.serve(BATCH8)
    stack.serve(BATCH2)


async def _stream(client, model: str, ask: dict) -> dict:
    """Stream one chat request; its text, finish, usage, and when its first and last pieces came."""
    ask = dict(ask)
    messages = [{"role": "user", "content": ask.pop("messages")}]
    out = {"text": "", "first": None}
    stream = await client.chat.completions.create(model=model, messages=messages, stream=True,
                                                  stream_options={"include_usage": True}, **ask)
    async for chunk in stream:
        out["id"] = request_id(chunk.id)
        if chunk.usage:
            out["usage"] = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
        for choice in chunk.choices:
            if choice.delta.content:
                out["first"] = out["first"] or time.monotonic()
                out["text"] += choice.delta.content
            if choice.finish_reason:
                out["finish"] = choice.finish_reason
    out["last"] = time.monotonic()
    return out


async def test_eight_streams_decoding_together_each_get_what_they_get_alone(stack, batch_workers, meter, clickhouse):
    client = stack.client()
    alone = [await _stream(client, BATCH8, ask) for ask in EIGHT]
    together = await asyncio.gather(*(_stream(client, BATCH8, ask) for ask in EIGHT))
    for ask, a, b in zip(EIGHT, alone, together):
        assert (b["text"], b["finish"], b["usage"]) == (a["text"], a["finish"], a["usage"]), ask
        assert a["usage"][1] <= ask["max_tokens"]
    # They decoded as one batch: every long one had begun before any of them ended.
    long = [b for b in together if b["usage"][1] >= 8]
    assert len(long) >= 4
    assert max(b["first"] for b in long) < min(b["last"] for b in long)
    # Billed exactly what each stream reported.
    rows = await usage_rows(clickhouse, [b["id"] for b in together], expect=8)
    assert sorted((r["input_units"], r["output_units"]) for r in rows) == sorted(b["usage"] for b in together)


async def _counting(client, max_tokens: int, into: dict) -> dict:
    """Stream a greedy completion of ``COUNTING`` from the two-sequence worker into ``into``: its id,
    when its first and last pieces came, its finish. (The call returns once the first piece is out.)"""
    stream = await client.completions.create(model=BATCH2, prompt=COUNTING, max_tokens=max_tokens, temperature=0,
                                             stream=True)
    async for chunk in stream:
        into["id"] = chunk.id.removeprefix("cmpl-")
        if chunk.choices and chunk.choices[0].text:
            into["first"] = into.get("first") or time.monotonic()
            if into.get("leave"):
                await stream.close()
                break
        if chunk.choices and chunk.choices[0].finish_reason:
            into["finish"] = chunk.choices[0].finish_reason
    into["last"] = time.monotonic()
    return into


async def _queued(nc) -> int:
    """Requests for the two-sequence worker waiting in its lanes, not yet taken."""
    js = nc.jetstream()
    return sum([(await js.consumer_info(REQUESTS_STREAM, work_consumer(BATCH2, lane))).num_pending
                for lane in LANES])


async def _queued_are(nc, n: int) -> bool:
    return await _queued(nc) == n


async def _started(*streams: dict) -> bool:
    return all("first" in s for s in streams)


async def test_a_stream_cancelled_mid_batch_frees_its_slot_while_the_others_go_on(stack, batch_workers, meter,
                                                                                 clickhouse):
    client = stack.client()
    left, stays, waiting = {"leave": True}, {}, {}
    stays_task = asyncio.create_task(_counting(client, 60, stays))
    await eventually(lambda: _started(stays), 60)
    leaves_at_once = asyncio.create_task(_counting(client, 100, left))
    await eventually(lambda: _started(left), 60)  # both slots were taken; this one has left since
    waits = asyncio.create_task(_counting(client, 5, waiting))
    await asyncio.wait_for(asyncio.gather(stays_task, leaves_at_once, waits), 120)
    # The third request ran in the slot the cancelled one freed, while the other was still decoding.
    assert waiting["first"] < stays["last"]
    assert stays["finish"] == "length" and waiting["finish"] == "length"
    rows = {r["request_id"]: r for r in await usage_rows(clickhouse, [left["id"], stays["id"], waiting["id"]],
                                                         expect=3)}
    assert rows[left["id"]]["status"] == "cancelled" and rows[left["id"]]["output_units"] < 100
    assert rows[stays["id"]]["output_units"] == 60 and rows[waiting["id"]]["output_units"] == 5


async def test_a_priority_request_joins_the_batch_before_queued_normal_ones(stack, nc, batch_workers, meter):
    status, _ = await admin(stack, "POST", "/admin/tenants", json={"id": "batch-vip", "tier": "enterprise"})
    assert status == 201
    _, body = await admin(stack, "POST", "/admin/tenants/batch-vip/keys", json={})
    vip, client = stack.client(api_key=body["key"]), stack.client()
    # Two long requests fill both slots; they end apart, so one slot frees at a time.
    busy = [{}, {}]
    running = [asyncio.create_task(_counting(client, n, into)) for n, into in zip((20, 40), busy)]
    await eventually(lambda: _started(*busy), 60)
    normal = [{} for _ in range(3)]
    running += [asyncio.create_task(_counting(client, 3, into)) for into in normal]
    await eventually(lambda: _queued_are(nc, 3), 30)  # the normal ones wait in their lane
    urgent: dict = {}
    running.append(asyncio.create_task(_counting(vip, 3, urgent)))  # an enterprise tenant's: the high lane
    await asyncio.wait_for(asyncio.gather(*running), 120)
    assert urgent["first"] < min(into["first"] for into in normal)
