"""POST /v1/completions (legacy) through the official openai SDK, on the real stack and SmolLM2."""

from __future__ import annotations

import math

import aiohttp
import pytest

from bus.account import credits
from bus.openai.completions import charge
from bus.protocol import CompletionBody
from tests.conftest import CHAT_INPUT_PRICE, CHAT_MODEL, CHAT_OUTPUT_PRICE, eventually, usage_rows
from tests.test_credits import _grant, _prepaid_tenant

PROMPT = "The capital of France is"


def _request_id(completion_id: str) -> str:
    return completion_id.removeprefix("cmpl-")


async def test_whole_and_streamed_greedy_completions_agree_and_are_metered(client, clickhouse):
    whole = await client.completions.create(model=CHAT_MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    assert whole.object == "text_completion" and whole.model == CHAT_MODEL
    [choice] = whole.choices
    assert choice.index == 0 and choice.logprobs is None and choice.finish_reason == "length"
    assert "Paris" in choice.text
    assert whole._request_id == _request_id(whole.id)
    assert whole.usage.completion_tokens == 12
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 12

    stream = await client.completions.create(model=CHAT_MODEL, prompt=[PROMPT], max_tokens=12, temperature=0,
                                             stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len([t for t in texts if t]) > 2, "text arrives in several chunks"
    assert "".join(texts) == choice.text
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1]) and all(c.object == "text_completion" for c in chunks)

    rows = await usage_rows(clickhouse, [_request_id(whole.id), _request_id(chunks[-1].id)], expect=2)
    assert len(rows) == 2
    for row in rows:
        assert (row["input_units"], row["output_units"]) == (whole.usage.prompt_tokens, 12)
        assert row["cost_micros"] == whole.usage.prompt_tokens * CHAT_INPUT_PRICE + 12 * CHAT_OUTPUT_PRICE
        assert (row["status"], row["model"], row["lane"]) == ("ok", CHAT_MODEL, "normal")
    kinds = await clickhouse.query("SELECT DISTINCT kind, unit FROM usage_events WHERE request_id IN {ids:Array(String)}",
                                   {"ids": [r["request_id"] for r in rows]})
    assert kinds == [("completions", "tokens")]


async def test_a_stream_without_include_usage_has_no_usage_chunk(client):
    stream = await client.completions.create(model=CHAT_MODEL, prompt=PROMPT, max_tokens=4, temperature=0, stream=True)
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices for c in chunks)


async def test_echo_puts_the_prompt_first(client):
    plain = await client.completions.create(model=CHAT_MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    echoed = await client.completions.create(model=CHAT_MODEL, prompt=PROMPT, max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    assert echoed.usage == plain.usage, "the echoed prompt is not billed as completion"
    stream = await client.completions.create(model=CHAT_MODEL, prompt=PROMPT, max_tokens=6, temperature=0, echo=True,
                                             stream=True)
    texts = [c.choices[0].text async for c in stream]
    assert texts[0] == PROMPT and "".join(texts) == echoed.choices[0].text


async def test_a_stop_string_ends_the_text(client):
    reply = await client.completions.create(model=CHAT_MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=["Paris"])
    assert reply.choices[0].finish_reason == "stop" and "Paris" not in reply.choices[0].text


@pytest.mark.parametrize("params, param", [
    ({"prompt": PROMPT, "best_of": 2}, "best_of"),
    ({"prompt": PROMPT, "logprobs": 1}, "logprobs"),
    ({"prompt": [PROMPT, "Two"]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": PROMPT, "n": 2}, "n"),
    ({"prompt": PROMPT, "temperature": 3}, "temperature"),
])
async def test_bad_requests_are_400s_naming_the_field(stack, meter, params, param):
    async with aiohttp.ClientSession() as http:
        async with http.post(stack.base_url + "/v1/completions", json={"model": CHAT_MODEL, **params},
                             headers={"Authorization": f"Bearer {stack.api_key}"}) as resp:
            body = await resp.json()
    assert resp.status == 400, body
    assert body["error"]["param"] == param, body


async def test_a_prepaid_tenant_is_held_and_settled(stack, nc, meter, clickhouse):
    tenant = "prepaid-completions"
    key = await _prepaid_tenant(stack, tenant)  # known to the edge once this returns
    await _grant(stack, nc, tenant, 100_000)
    client = stack.client(api_key=key)
    reply = await client.completions.create(model=CHAT_MODEL, prompt=PROMPT, max_tokens=5, temperature=0)
    lane = "high"  # the enterprise tier's default lane
    body = CompletionBody(PROMPT, max_tokens=5)
    held = stack.settings.model(CHAT_MODEL).prices.cost(charge(body).max_units, stack.settings.lane_multipliers[lane])
    [(hold, cost)] = await eventually(lambda: clickhouse.query(
        "SELECT hold_micros, cost_micros FROM usage_events WHERE request_id = {r:String}",
        {"r": _request_id(reply.id)}))
    used = reply.usage.prompt_tokens * CHAT_INPUT_PRICE + reply.usage.completion_tokens * CHAT_OUTPUT_PRICE
    assert hold == held > cost == math.ceil(used * 1.5)
    await eventually(lambda: _available_is(nc, tenant, 100_000 - cost))


async def _available_is(nc, tenant: str, amount: int) -> bool:
    return await credits.available(nc.jetstream(), tenant) == amount

