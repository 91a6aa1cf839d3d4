"""The SDK for internal services: straight to NATS, same typed results as the edge."""

from __future__ import annotations

import pytest

from bus.errors import DeadlineExceeded, InvalidRequest, NoCapacity
from bus.issuers import register_issuer
from bus.openai.chat import ChatCompletion, ChatCompletionChunk
from bus.protocol import IssuerGrant
from bus.sdk import TollgateClient
from bus.signing import Identity
from tests.conftest import CHAT_MODEL, UNSERVED_MODEL, request_id, usage_rows

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
async def service(stack, nc):
    seed = stack.tmp / "reports.seed"
    await register_issuer(nc.jetstream(), Identity.load_or_create(seed).public_key, IssuerGrant("reports", ["default"]))
    client = await TollgateClient.connect(stack.role("svc:reports"), seed, service="reports", tenant="default",
                                          deadline_s=5)
    yield client
    await client.close()


async def test_sdk_chat_returns_the_edges_typed_result_and_is_metered(service, meter, clickhouse):
    reply = await service.chat(CHAT_MODEL, QUESTION, temperature=0)
    assert isinstance(reply, ChatCompletion)
    assert "Paris" in reply.choices[0].message.content
    [row] = await usage_rows(clickhouse, [request_id(reply.id)], expect=1)
    assert (row["input_units"], row["output_units"]) == (reply.usage.prompt_tokens, reply.usage.completion_tokens)
    assert row["tenant"] == "default"


async def test_sdk_streams_chunks_with_usage(service):
    chunks = [c async for c in service.chat_stream(CHAT_MODEL, QUESTION, temperature=0, include_usage=True)]
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert "Paris" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


async def test_sdk_raises_typed_errors(service):
    with pytest.raises(InvalidRequest) as err:
        await service.chat(CHAT_MODEL, QUESTION, temperature=9)
    assert err.value.param == "temperature"
    with pytest.raises(NoCapacity):
        await service.chat(UNSERVED_MODEL, QUESTION)


async def test_sdk_cannot_bill_a_tenant_it_was_not_granted(stack, nc):
    seed = stack.tmp / "rogue.seed"
    await register_issuer(nc.jetstream(), Identity.load_or_create(seed).public_key, IssuerGrant("rogue", ["acme"]))
    rogue = await TollgateClient.connect(stack.role("svc:rogue"), seed, service="rogue", tenant="default",
                                         deadline_s=2)
    try:
        with pytest.raises(DeadlineExceeded):  # the worker terminates it unrun: no reply, no bill
            await rogue.chat(CHAT_MODEL, QUESTION, max_tokens=2)
    finally:
        await rogue.close()
