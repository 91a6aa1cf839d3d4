"""POST /v1/embeddings on the real stack with the real all-MiniLM-L6-v2 weights, through the official openai SDK."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import aiohttp
import openai
import pytest

from bus.account import credits
from bus.openai.embeddings import charge
from bus.protocol import EmbeddingsBody
from consumers.models import resolve
from consumers.serve import load_backend
from tests.conftest import CHAT_MODEL, EMBED_INPUT_PRICE, EMBED_MODEL, eventually, usage_rows
from tests.test_credits import _grant, _prepaid_tenant

FOOD, BREAD, STOCKS = "A man is eating food.", "A man is eating a piece of bread.", "The stock market fell today."


def _cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


async def test_float_and_base64_give_the_same_vectors(client):
    as_base64 = await client.embeddings.create(model=EMBED_MODEL, input=FOOD)  # the SDK asks for base64 and decodes it
    as_float = await client.embeddings.create(model=EMBED_MODEL, input=FOOD, encoding_format="float")
    assert len(as_float.data[0].embedding) == 384
    assert as_base64.data[0].embedding == as_float.data[0].embedding
    assert as_float.object == "list" and as_float.data[0].object == "embedding" and as_float.model == EMBED_MODEL
    assert math.isclose(sum(x * x for x in as_float.data[0].embedding), 1.0, rel_tol=1e-5), "Normalize is applied"


async def test_related_sentences_are_closer_than_unrelated_ones(client):
    food, bread, stocks = (d.embedding for d in (await client.embeddings.create(
        model=EMBED_MODEL, input=[FOOD, BREAD, STOCKS], encoding_format="float")).data)
    assert _cos(food, bread) > 0.6 > 0.1 > _cos(food, stocks)


async def test_a_batch_keeps_its_order_and_matches_single_requests(client):
    texts = [f"sentence number {i} about {topic}" for i, topic in enumerate(["cats", "taxes", "rain", "jazz", "soup"])]
    batch = await client.embeddings.create(model=EMBED_MODEL, input=texts, encoding_format="float")
    assert [d.index for d in batch.data] == list(range(len(texts)))
    singles = await asyncio.gather(*(client.embeddings.create(model=EMBED_MODEL, input=t, encoding_format="float")
                                     for t in texts))
    for item, single in zip(batch.data, singles):
        # Padding within a shared pass changes the arithmetic, not the meaning.
        assert _cos(item.embedding, single.data[0].embedding) > 0.99999


async def test_token_ids_embed_as_their_text(stack, client):
    from transformers import AutoTokenizer

    spec = stack.settings.model(EMBED_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(resolve(EMBED_MODEL, spec, Path(stack.settings.cache_dir)))
    ids = tokenizer(FOOD, add_special_tokens=False)["input_ids"]
    text, one, many = await asyncio.gather(
        client.embeddings.create(model=EMBED_MODEL, input=FOOD, encoding_format="float"),
        client.embeddings.create(model=EMBED_MODEL, input=ids, encoding_format="float"),
        client.embeddings.create(model=EMBED_MODEL, input=[ids, ids[:3]], encoding_format="float"),
    )
    assert len(many.data) == 2
    for other in (one.data[0].embedding, many.data[0].embedding):
        assert _cos(text.data[0].embedding, other) > 0.99999
    assert one.usage.prompt_tokens == text.usage.prompt_tokens == len(ids) + 2  # [CLS] and [SEP]


async def test_usage_row_counts_prompt_tokens_at_the_input_token_price(client, clickhouse):
    reply = await client.embeddings.create(model=EMBED_MODEL, input=[FOOD, BREAD])
    tokens = reply.usage.prompt_tokens
    assert tokens == reply.usage.total_tokens > 0
    [row] = await usage_rows(clickhouse, [reply._request_id], expect=1)
    [(kind, unit)] = await clickhouse.query("SELECT kind, unit FROM usage_events WHERE request_id = {r:String}",
                                            {"r": reply._request_id})
    assert (kind, unit, row["status"], row["lane"]) == ("embeddings", "tokens", "ok", "normal")
    assert (row["input_units"], row["output_units"]) == (tokens, 0)
    assert row["cost_micros"] == tokens * EMBED_INPUT_PRICE


async def test_a_prepaid_tenant_is_held_and_settled(stack, nc, meter, clickhouse):
    tenant = "prepaid-embeddings"
    key = await _prepaid_tenant(stack, tenant)  # known to the edge once this returns
    await _grant(stack, nc, tenant, 100_000)
    client = stack.client(api_key=key)
    reply = await client.embeddings.create(model=EMBED_MODEL, input=FOOD)
    spec, lane = stack.settings.model(EMBED_MODEL), "high"  # the enterprise tier's default lane
    held = spec.prices.cost(charge(EmbeddingsBody([FOOD])).max_units, stack.settings.lane_multipliers[lane])
    [(hold, cost)] = await eventually(lambda: clickhouse.query(
        "SELECT hold_micros, cost_micros FROM usage_events WHERE request_id = {r:String}", {"r": reply._request_id}))
    assert hold == held > cost == math.ceil(reply.usage.prompt_tokens * EMBED_INPUT_PRICE * 1.5)
    await eventually(lambda: _available_is(nc, tenant, 100_000 - cost))


async def _available_is(nc, tenant: str, amount: int) -> bool:
    return await credits.available(nc.jetstream(), tenant) == amount



@pytest.mark.parametrize("params, param", [
    ({"model": EMBED_MODEL, "input": FOOD, "dimensions": 128}, "dimensions"),
    ({"model": CHAT_MODEL, "input": FOOD}, "model"),
    ({"model": EMBED_MODEL, "input": [FOOD, [1, 2]]}, "input"),
    ({"model": EMBED_MODEL, "input": [""]}, "input"),
    ({"model": EMBED_MODEL, "input": []}, "input"),
    ({"model": EMBED_MODEL, "input": [[999_999]]}, "input"),  # outside the vocabulary: found by the worker
    ({"model": EMBED_MODEL, "input": FOOD, "encoding_format": "int8"}, "encoding_format"),
    ({"model": EMBED_MODEL, "input": FOOD, "temperature": 1}, "temperature"),
])
async def test_bad_requests_are_400s_naming_the_field(stack, meter, params, param):
    async with aiohttp.ClientSession() as http:
        async with http.post(stack.base_url + "/v1/embeddings", json=params,
                             headers={"Authorization": f"Bearer {stack.api_key}"}) as resp:
            body = await resp.json()
    assert resp.status == 400, body
    assert body["error"]["param"] == param, body


async def test_the_model_s_own_size_is_accepted_as_dimensions(client):
    reply = await client.embeddings.create(model=EMBED_MODEL, input=FOOD, dimensions=384, encoding_format="float")
    assert len(reply.data[0].embedding) == 384


async def test_an_embeddings_model_is_no_chat_model(client):
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model=EMBED_MODEL, messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["param"] == "model"


async def test_many_vectors_come_back_through_the_result_store(client):
    texts = [f"item {i}" for i in range(400)]  # 400 x 1.5 KiB of float32: past the blob threshold
    reply = await client.embeddings.create(model=EMBED_MODEL, input=texts)
    assert [d.index for d in reply.data] == list(range(400)) and len(reply.data[399].embedding) == 384


async def test_a_request_over_a_mebibyte_travels_through_the_object_store(client, clickhouse):
    """Past one NATS message (and nats-server's default 1 MiB): the body goes by blob reference."""
    long_text = "A man is eating food. " * 800  # ~17 KiB each: 64 of them make ~1.1 MiB
    reply = await client.embeddings.with_raw_response.create(model=EMBED_MODEL, input=[long_text] * 64)
    data = reply.parse().data
    assert len(data) == 64 and data[0].embedding == data[63].embedding
    [row] = await usage_rows(clickhouse, [reply.headers["x-request-id"]], expect=1)
    assert row["status"] == "ok" and row["input_units"] == 64 * 256, "each input read to the model's 256 tokens"


async def test_concurrent_requests_share_forward_passes(stack):
    """The backend itself, on the real weights: 32 concurrent one-input requests take a few passes, not 32."""
    spec = stack.settings.model(EMBED_MODEL)
    backend = await asyncio.to_thread(load_backend, spec, await asyncio.to_thread(
        resolve, EMBED_MODEL, spec, Path(stack.settings.cache_dir)))
    cancel = asyncio.Event()
    before = backend.passes
    results = await asyncio.gather(*(backend.embed(EmbeddingsBody([f"{FOOD} {i}"]), cancel) for i in range(32)))
    assert backend.passes - before <= 4, f"{backend.passes - before} passes for 32 requests"
    assert all(len(r.vectors) == 1 and len(r.vectors[0]) == 384 * 4 for r in results)
