"""POST /v1/tokenize and /v1/detokenize: the worker's real tokenizer, answered beside generation."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from tests.conftest import CHAT_MODEL, EMBED_MODEL

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
TEXT = "Tokenizers split text: ünïcödé, ☃ and 🙂 too.\n\n  Spaces stay."


async def _post(stack, path: str, payload: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.post(stack.base_url + path, json=payload,
                             headers={"Authorization": f"Bearer {stack.api_key}"}) as resp:
            return resp.status, await resp.json()


async def test_a_messages_count_is_what_chat_reports_and_a_prompt_s_what_completions_report(stack, client):
    status, counted = await _post(stack, "/v1/tokenize", {"model": CHAT_MODEL, "messages": QUESTION})
    assert status == 200, counted
    chat = await client.chat.completions.create(model=CHAT_MODEL, messages=QUESTION, max_tokens=1)
    assert counted["count"] == len(counted["tokens"]) == chat.usage.prompt_tokens
    assert counted["max_model_len"] == stack.settings.model(CHAT_MODEL).context_tokens

    status, counted = await _post(stack, "/v1/tokenize", {"model": CHAT_MODEL, "prompt": TEXT})
    assert status == 200, counted
    completion = await client.completions.create(model=CHAT_MODEL, prompt=TEXT, max_tokens=1)
    assert counted["count"] == completion.usage.prompt_tokens


async def test_detokenize_gives_back_the_text(stack, meter):
    status, counted = await _post(stack, "/v1/tokenize", {"model": CHAT_MODEL, "prompt": TEXT})
    assert status == 200, counted
    status, back = await _post(stack, "/v1/detokenize", {"model": CHAT_MODEL, "tokens": counted["tokens"]})
    assert (status, back) == (200, {"prompt": TEXT})


async def test_tokenize_answers_while_the_worker_generates(stack, client):
    stream = await client.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "Write a long story about a lighthouse."}],
        max_tokens=400, temperature=0, stream=True)
    try:
        async for _ in stream:
            break  # generating now, with hundreds of tokens to go
        started = time.monotonic()
        status, counted = await _post(stack, "/v1/tokenize", {"model": CHAT_MODEL, "prompt": TEXT})
        took = time.monotonic() - started
        assert status == 200 and counted["count"] > 0
        assert took < 1.0, f"tokenize waited {took:.2f}s behind generation"
        next_chunk = await asyncio.wait_for(stream.__anext__(), 10)
        assert next_chunk.choices[0].finish_reason is None, "the story was still being generated"
    finally:
        await stream.close()


@pytest.mark.parametrize("path, payload, param", [
    ("/v1/tokenize", {"model": CHAT_MODEL}, "prompt"),
    ("/v1/tokenize", {"model": CHAT_MODEL, "prompt": "a", "messages": QUESTION}, "messages"),
    ("/v1/tokenize", {"model": CHAT_MODEL, "prompt": "a", "add_special_tokens": True}, "add_special_tokens"),
    ("/v1/tokenize", {"model": EMBED_MODEL, "prompt": "a"}, "model"),
    ("/v1/detokenize", {"model": CHAT_MODEL, "tokens": [10**6]}, "tokens"),  # outside the vocabulary: the worker says
    ("/v1/detokenize", {"model": CHAT_MODEL, "tokens": [-1]}, "tokens[0]"),
])
async def test_bad_requests_are_400s_naming_the_field(stack, meter, path, payload, param):
    status, body = await _post(stack, path, payload)
    assert status == 400, body
    assert body["error"]["param"] == param, body
