"""The official openai SDK against the edge, with the real SmolLM2 worker behind NATS."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import openai
import pytest

from tests.conftest import CHAT_MODEL, UNSERVED_MODEL, admin, leave_a_stream, request_id, usage_rows

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


async def test_answers_with_the_real_model_and_meters_exact_usage(client, clickhouse):
    reply = await client.chat.completions.create(model=CHAT_MODEL, messages=QUESTION, temperature=0)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    assert reply.object == "chat.completion" and reply.model == CHAT_MODEL
    assert reply._request_id == request_id(reply.id), "x-request-id names the request, as usage rows do"
    assert reply.usage.prompt_tokens > 10 and reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    [row] = await usage_rows(clickhouse, [request_id(reply.id)], expect=1)
    assert (row["input_units"], row["output_units"]) == (reply.usage.prompt_tokens, reply.usage.completion_tokens)
    assert (row["status"], row["model"], row["lane"], row["tenant"]) == ("ok", CHAT_MODEL, "normal", "default")


async def test_default_sampling_still_answers(client):
    reply = await client.chat.completions.create(model=CHAT_MODEL, messages=QUESTION, seed=7)
    assert "Paris" in reply.choices[0].message.content


async def test_streams_tokens_and_ends_with_usage_chunk(client, clickhouse):
    stream = await client.chat.completions.create(
        model=CHAT_MODEL, messages=QUESTION, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 2, "tokens arrive as separate chunks"
    assert "Paris" in "".join(pieces)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1
    [row] = await usage_rows(clickhouse, [request_id(last.id)], expect=1)
    assert (row["input_units"], row["output_units"]) == (last.usage.prompt_tokens, last.usage.completion_tokens)


async def test_stream_without_include_usage_has_no_usage_chunk(client):
    stream = await client.chat.completions.create(model=CHAT_MODEL, messages=QUESTION, temperature=0, stream=True)
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.choices for c in chunks)


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_max_tokens_gives_length(client, field):
    reply = await client.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "Count from 1 to 50."}], temperature=0, **{field: 5}
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5


async def test_stop_sequence_cuts_the_text(client):
    full = await client.chat.completions.create(model=CHAT_MODEL, messages=QUESTION, temperature=0)
    assert "Paris" in full.choices[0].message.content
    cut = await client.chat.completions.create(model=CHAT_MODEL, messages=QUESTION, temperature=0, stop=["Paris"])
    text = cut.choices[0].message.content
    assert cut.choices[0].finish_reason == "stop"
    assert "Paris" not in text
    assert full.choices[0].message.content.startswith(text)
    assert cut.usage.completion_tokens < full.usage.completion_tokens


async def test_same_seed_same_sample(client):
    kw = dict(model=CHAT_MODEL, messages=[{"role": "user", "content": "Tell me a story."}], temperature=1.0, seed=42, max_tokens=20)
    first = await client.chat.completions.create(**kw)
    second = await client.chat.completions.create(**kw)
    assert first.choices[0].message.content == second.choices[0].message.content


async def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as err:
        await client.chat.completions.create(model="no-such-model", messages=QUESTION)
    assert err.value.code == "model_not_found"
    assert err.value.body["param"] == "model"


async def test_bad_body_names_the_field(client):
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model=CHAT_MODEL, messages=QUESTION, temperature=3)
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model=CHAT_MODEL, messages=[])
    assert err.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "wizard", "content": "hi"}])
    assert err.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model=CHAT_MODEL, messages=QUESTION, extra_body={"frobnicate": 1})
    assert err.value.body["param"] == "frobnicate"
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model=CHAT_MODEL, messages=[{"content": "hi"}])
    assert err.value.body["param"] == "messages[0].role" and "Missing required" in err.value.message


async def test_options_sent_at_their_defaults_change_nothing_and_others_are_refused_by_name(client):
    kw = dict(model=CHAT_MODEL, messages=QUESTION, temperature=0, max_tokens=8)
    plain = await client.chat.completions.create(**kw)
    # What clients such as LangChain send on every call, each at the value that asks for nothing.
    defaults = dict(frequency_penalty=0, presence_penalty=0, logit_bias={}, logprobs=False, store=False,
                    metadata={"team": "search"}, parallel_tool_calls=False, tool_choice="none",
                    response_format={"type": "text"}, modalities=["text"], prompt_cache_key="k", safety_identifier="u")
    assert (await client.chat.completions.create(**kw, **defaults)).choices[0].message.content == \
        plain.choices[0].message.content
    stream = await client.chat.completions.create(**kw, stream=True, stream_options={
        "include_usage": True, "include_obfuscation": False})
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == \
        plain.choices[0].message.content
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    for asked, param in ((dict(frequency_penalty=0.5), "frequency_penalty"), (dict(logprobs=True), "logprobs"),
                         (dict(tools=[tool]), "tools"), (dict(tool_choice="required"), "tool_choice"),
                         (dict(response_format={"type": "json_object"}), "response_format"),
                         (dict(store=True), "store"), (dict(top_logprobs=2), "top_logprobs")):
        with pytest.raises(openai.BadRequestError) as err:
            await client.chat.completions.create(**kw, **asked)
        assert (err.value.body["param"], err.value.code) == (param, "unsupported_parameter"), asked


async def test_invalid_json_is_a_400(stack, meter):
    async with aiohttp.ClientSession() as http:
        async with http.post(stack.base_url + "/v1/chat/completions", data=b"{not json",
                             headers={"Authorization": f"Bearer {stack.api_key}"}) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["type"] == "invalid_request_error"


async def test_missing_or_wrong_key_is_rejected(stack, meter):
    with pytest.raises(openai.AuthenticationError):
        await stack.client().chat.completions.create(
            model=CHAT_MODEL, messages=QUESTION, extra_headers={"Authorization": openai.Omit()}
        )
    with pytest.raises(openai.AuthenticationError) as err:
        await stack.client(api_key="sk-wrong").chat.completions.create(model=CHAT_MODEL, messages=QUESTION)
    assert err.value.code == "invalid_api_key"


async def test_context_overflow_is_a_400_from_the_worker(client):
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model=CHAT_MODEL, messages=QUESTION, max_tokens=10**6)
    assert err.value.code == "context_length_exceeded"


async def test_model_without_live_worker_fails_fast_with_503(client):
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as err:
        await client.chat.completions.create(model=UNSERVED_MODEL, messages=QUESTION)
    assert err.value.status_code == 503
    assert time.monotonic() - started < 1.0


async def test_models_lists_the_registry(client):
    models = await client.models.list()
    assert {m.id for m in models.data} >= {CHAT_MODEL, UNSERVED_MODEL}


async def test_client_disconnect_cancels_the_work(client, clickhouse):
    [row] = await usage_rows(clickhouse, [await leave_a_stream(client)], expect=1)
    assert row["status"] == "cancelled"
    assert row["output_units"] < 400


async def test_any_int64_seed_is_accepted(client):
    reply = await client.chat.completions.create(model=CHAT_MODEL, messages=QUESTION, seed=-1, max_tokens=3)
    assert reply.usage.completion_tokens == 3


async def test_a_request_abandoned_while_queued_never_runs(stack, meter, clickhouse):
    status, body = await admin(stack, "POST", "/admin/tenants", json={"id": "impatient", "tier": "pro"})
    assert status == 201
    _, body = await admin(stack, "POST", "/admin/tenants/impatient/keys", json={})
    client = stack.client(api_key=body["key"])
    long = await client.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "Write a long story."}], max_tokens=150,
        temperature=0, stream=True,
    )
    # The worker runs one request at a time: this one waits in the queue, and its client gives up.
    queued = asyncio.create_task(client.chat.completions.create(model=CHAT_MODEL, messages=QUESTION))
    await asyncio.sleep(0.3)
    queued.cancel()
    async for _ in long:
        pass
    # Work runs in queue order: once a later request is metered, the abandoned one would have been too.
    later = await client.chat.completions.create(model=CHAT_MODEL, messages=QUESTION, max_tokens=2)
    await usage_rows(clickhouse, [request_id(later.id)], expect=1)
    rows = await clickhouse.query("SELECT status FROM usage_events WHERE tenant = 'impatient'")
    assert rows == [("ok",), ("ok",)], "only the finished and the later request ran"
