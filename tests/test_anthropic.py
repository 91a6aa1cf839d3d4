"""POST /v1/messages and /v1/messages/count_tokens through the official anthropic SDK, unmodified,
against the stack's own chat model (SmolLM2-135M). Greedy (temperature 0) wherever texts are compared."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import anthropic
import pytest
from hypothesis import given, strategies as st

from tests.conftest import CHAT_INPUT_PRICE, CHAT_MODEL, CHAT_OUTPUT_PRICE, EMBED_MODEL, usage_rows
from tests.test_hostile_input import PROPERTY, _key, _send, _with, hostile_fragments

SYSTEM = "You are a terse assistant. Answer in one sentence."
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# The SDK no longer has sampling arguments (newer Claude models take none); the API field still exists.
GREEDY = {"extra_body": {"temperature": 0}}


@pytest.fixture
def claude(stack, meter) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=stack.base_url, api_key=stack.api_key, max_retries=0)


def _request_id(message_id: str) -> str:
    return message_id.removeprefix("msg_")


async def test_a_message_with_a_system_prompt_has_exact_metered_usage(claude, clickhouse):
    message = await claude.messages.create(model=CHAT_MODEL, max_tokens=24, system=SYSTEM, messages=QUESTION,
                                           **GREEDY)
    assert message.type == "message" and message.role == "assistant" and message.model == CHAT_MODEL
    assert [block.type for block in message.content] == ["text"] and message.content[0].text.strip()
    assert message.stop_reason in ("end_turn", "max_tokens") and message.stop_sequence is None
    counted = await claude.messages.count_tokens(model=CHAT_MODEL, system=SYSTEM, messages=QUESTION)
    assert message.usage.input_tokens == counted.input_tokens > 0
    [row] = await usage_rows(clickhouse, [_request_id(message.id)], expect=1)
    assert (row["input_units"], row["output_units"]) == (message.usage.input_tokens, message.usage.output_tokens)
    assert row["cost_micros"] == message.usage.input_tokens * CHAT_INPUT_PRICE + message.usage.output_tokens * CHAT_OUTPUT_PRICE
    assert message._request_id == _request_id(message.id)


async def test_the_system_prompt_reaches_the_model(claude):
    # Counted through the chat template, which puts the system turn in the prompt (SmolLM2's
    # template has a default system prompt of its own, used when none is given).
    with_blocks = await claude.messages.count_tokens(model=CHAT_MODEL, messages=QUESTION,
                                                     system=[{"type": "text", "text": SYSTEM}])
    as_string = await claude.messages.count_tokens(model=CHAT_MODEL, messages=QUESTION, system=SYSTEM)
    longer = await claude.messages.count_tokens(model=CHAT_MODEL, messages=QUESTION, system=SYSTEM + " Be kind.")
    assert with_blocks.input_tokens == as_string.input_tokens == longer.input_tokens - 3


async def test_a_stream_has_anthropic_events_and_the_same_text_and_usage(stack, claude):
    whole = await claude.messages.create(model=CHAT_MODEL, max_tokens=20, messages=QUESTION, **GREEDY)
    async with aiohttp.ClientSession() as http:  # raw, to see every event: the SDK drops pings
        async with http.post(stack.base_url + "/v1/messages", headers={"x-api-key": stack.api_key}, json={
                "model": CHAT_MODEL, "max_tokens": 20, "messages": QUESTION, "temperature": 0, "stream": True}) as resp:
            events = [json.loads(line[6:]) for line in (await resp.text()).splitlines() if line.startswith("data: ")]
            names = [line[7:] for line in (await resp.text()).splitlines() if line.startswith("event: ")]
    types = [event["type"] for event in events]
    assert names == types, "each event is named by its type"
    assert types[:3] == ["message_start", "content_block_start", "ping"]
    assert types[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(types[3:-3]) == {"content_block_delta"}
    assert events[-2]["usage"] == {"input_tokens": whole.usage.input_tokens, "output_tokens": whole.usage.output_tokens}
    async with claude.messages.stream(model=CHAT_MODEL, max_tokens=20, messages=QUESTION, **GREEDY) as stream:
        pieces = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert len(pieces) > 1, "text arrives as it is generated"
    assert "".join(pieces) == final.content[0].text == whole.content[0].text
    assert (final.usage.input_tokens, final.usage.output_tokens) == (whole.usage.input_tokens, whole.usage.output_tokens)
    assert final.stop_reason == whole.stop_reason


async def test_max_tokens_and_stop_sequences_end_the_text_as_anthropic_says(claude):
    capped = await claude.messages.create(model=CHAT_MODEL, max_tokens=5, messages=QUESTION, **GREEDY)
    assert (capped.stop_reason, capped.usage.output_tokens) == ("max_tokens", 5)
    full = (await claude.messages.create(model=CHAT_MODEL, max_tokens=20, messages=QUESTION, **GREEDY)).content[0].text
    word = full.split()[2]
    stopped = await claude.messages.create(model=CHAT_MODEL, max_tokens=20, messages=QUESTION, **GREEDY,
                                           stop_sequences=["never-in-the-text", word])
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", word)
    assert stopped.content[0].text == full[:full.index(word)]
    async with claude.messages.stream(model=CHAT_MODEL, max_tokens=20, messages=QUESTION, **GREEDY,
                                      stop_sequences=[word]) as stream:
        streamed = await stream.get_final_message()
    assert (streamed.stop_reason, streamed.stop_sequence, streamed.content[0].text) == (
        "stop_sequence", word, stopped.content[0].text)


async def test_a_conversation_continues_from_earlier_turns(claude):
    turns = [{"role": "user", "content": "My name is Ada."},
             {"role": "assistant", "content": [{"type": "text", "text": "Nice to meet you, Ada."}]},
             {"role": "user", "content": "What is my name?"}]
    counted = await claude.messages.count_tokens(model=CHAT_MODEL, messages=turns)
    last_alone = await claude.messages.count_tokens(model=CHAT_MODEL, messages=turns[-1:])
    reply = await claude.messages.create(model=CHAT_MODEL, max_tokens=8, messages=turns, **GREEDY,
                                         metadata={"user_id": "end-user-7"})
    assert reply.usage.input_tokens == counted.input_tokens > last_alone.input_tokens + 10, "every turn was read"
    assert reply.content[0].text


async def test_bearer_authorization_works_as_well(stack, meter):
    bearer = anthropic.AsyncAnthropic(base_url=stack.base_url, auth_token=stack.api_key, max_retries=0)
    counted = await bearer.messages.count_tokens(model=CHAT_MODEL, messages=QUESTION)
    assert counted.input_tokens > 0


async def test_errors_are_anthropic_shaped(stack, claude):
    with pytest.raises(anthropic.AuthenticationError) as bad_key:
        await anthropic.AsyncAnthropic(base_url=stack.base_url, api_key="sk-tg-000000000000-nope", max_retries=0
                                       ).messages.create(model=CHAT_MODEL, max_tokens=8, messages=QUESTION)
    assert bad_key.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError) as unknown:
        await claude.messages.create(model="claude-no-such-model", max_tokens=8, messages=QUESTION)
    assert unknown.value.body == {"type": "error", "error": {"type": "not_found_error",
                                                             "message": unknown.value.body["error"]["message"]}}
    assert "claude-no-such-model" in unknown.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as not_chat:
        await claude.messages.create(model=EMBED_MODEL, max_tokens=8, messages=QUESTION)
    assert not_chat.value.body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("body, named", [
    ({"model": CHAT_MODEL, "messages": QUESTION}, "max_tokens"),
    ({"model": CHAT_MODEL, "max_tokens": 0, "messages": QUESTION}, "max_tokens"),
    ({"model": CHAT_MODEL, "max_tokens": 8, "messages": []}, "messages"),
    ({"model": CHAT_MODEL, "max_tokens": 8, "messages": QUESTION, "temperature": 1.5}, "temperature"),
    ({"model": CHAT_MODEL, "max_tokens": 8, "messages": QUESTION, "top_k": 5}, "top_k"),
    ({"model": CHAT_MODEL, "max_tokens": 8, "messages": QUESTION, "stop_sequences": [""]}, "stop_sequences"),
    ({"model": CHAT_MODEL, "max_tokens": 8, "messages": QUESTION, "tools": []}, "tools"),
    ({"model": CHAT_MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}]}]}, "messages[0].content"),
    ({"model": CHAT_MODEL, "max_tokens": 8, "messages": [*QUESTION, {"role": "assistant", "content": "Paris"}]},
     "messages[1].role"),
    ({"model": CHAT_MODEL, "max_tokens": 10**6, "messages": QUESTION}, "max_tokens"),
])
async def test_bad_requests_are_400_invalid_request_errors_naming_the_field(stack, meter, body, named):
    async with aiohttp.ClientSession() as http:
        async with http.post(stack.base_url + "/v1/messages", json=body, headers={"x-api-key": stack.api_key}) as resp:
            answer = await resp.json()
    assert resp.status == 400, answer
    assert answer["type"] == "error" and answer["error"]["type"] == "invalid_request_error", answer
    assert named in answer["error"]["message"], answer


async def test_a_missing_key_is_an_anthropic_authentication_error(stack):
    async with aiohttp.ClientSession() as http:
        async with http.post(stack.base_url + "/v1/messages/count_tokens",
                             json={"model": CHAT_MODEL, "messages": QUESTION}) as resp:
            answer = await resp.json()
    assert resp.status == 401 and answer["error"]["type"] == "authentication_error", answer


_MESSAGES = {"model": CHAT_MODEL, "max_tokens": 1, "temperature": 0, "stop_sequences": ["x"], "metadata": {"user_id": "u"},
             "system": [{"type": "text", "text": "Be brief."}],
             "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
_FIELDS = ["model", "max_tokens", "temperature", "top_p", "top_k", "stop_sequences", "metadata", "metadata.user_id",
           "system", "system.0", "system.0.text", "messages", "messages.0", "messages.0.role", "messages.0.content",
           "messages.0.content.0", "messages.0.content.0.type", "messages.0.content.0.text", "stream"]


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
async def test_hostile_bodies_are_refused_as_anthropic_errors_never_5xx(stack, meter, path):
    _, secret = await _key(stack)
    template = _MESSAGES if path == "/v1/messages" else {k: _MESSAGES[k] for k in ("model", "system", "messages")}
    fields = [f for f in _FIELDS if f.split(".")[0] in template]

    @PROPERTY
    @given(body=st.one_of(st.binary(max_size=256), hostile_fragments(),
                          st.builds(lambda f, v: _with(template, f, v), st.sampled_from(fields), hostile_fragments())))
    def prop(body):
        status, answer = _send(stack, "POST", path, body, secret)
        assert status < 500, (status, answer, body[:200])
        if status >= 400:
            assert answer["type"] == "error" and set(answer["error"]) == {"type", "message"}, answer

    await asyncio.to_thread(prop)
