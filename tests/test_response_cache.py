"""The exact response cache on the real stack: SmolLM2 served as a model whose answers are kept a
minute (tests/stack_models/response_cache.toml). Worker runs are counted by usage rows: a run has
``cache_hit`` false, an answer served from the cache true."""

from __future__ import annotations

import asyncio
import uuid

import aiohttp
import anthropic
import pytest

from bus.account.tenants import Limits, Tenant
from bus.envelopes import seal_usage
from bus.issuers import register_issuer
from bus.protocol import IssuerGrant, Ticket, encode
from bus.signing import Identity
from bus.subjects import cache_hit_usage_subject
from bus.account import credits
from tests.conftest import UsageSigner, admin, eventually, fresh_minute, usage_event, usage_rows
from tests.test_credits import _grant, _prepaid_tenant
from tests.test_usage_trust import _dead_letters

CACHED = "smollm2-135m-cached"
HEADER = "x-tollgate-cache"


@pytest.fixture(scope="module")
def cached_model(stack) -> str:
    stack.serve(CACHED)
    return CACHED


def _ask(nonce: str) -> list[dict]:
    """A question no other test asks: each test's answers are its own."""
    return [{"role": "user", "content": f"Say hello to {nonce}."}]


async def _chat(client, messages, headers: dict | None = None, **params):
    """The answer, its x-tollgate-cache header (None if absent) and its request id."""
    raw = await client.chat.completions.with_raw_response.create(
        model=CACHED, messages=messages, extra_headers=headers or {}, **{"temperature": 0, "max_tokens": 6, **params})
    completion = raw.parse()
    return completion, raw.headers.get(HEADER), completion.id.removeprefix("chatcmpl-")


async def _rows(clickhouse, request_ids: list[str]) -> dict[str, tuple]:
    """(cache_hit, input_units, output_units, cost_micros, worker_id) by request id, once all are stored."""
    async def stored():
        rows = await clickhouse.query(
            "SELECT request_id, cache_hit, input_units, output_units, cost_micros, worker_id FROM usage_events "
            "WHERE request_id IN {ids:Array(String)}", {"ids": request_ids})
        return rows if len(rows) == len(request_ids) else None

    return {r[0]: tuple(r[1:]) for r in await eventually(stored, timeout=20)}


async def _tenant(stack, tenant_id: str, **fields) -> str:
    """A tenant (pro tier unless ``fields`` say otherwise) and a key for it, once the edge knows it."""
    await stack.tenancy(lambda store: store.create_tenant(Tenant(id=tenant_id, tier="pro", **fields)))
    return await _key(stack, tenant_id)


async def _key(stack, tenant_id: str, **fields) -> str:
    """A new key of the tenant, once the edge knows it."""
    _, key = await stack.tenancy(lambda store: store.create_key(tenant_id, name="cache", **fields))

    async def edge_knows_it():
        async with aiohttp.ClientSession() as http:
            async with http.get(stack.base_url + "/v1/models", headers={"Authorization": f"Bearer {key}"}) as resp:
                return resp.status == 200

    await eventually(edge_knows_it)
    return key


async def test_a_hit_replays_the_answer_without_a_run_and_is_metered_as_one(cached_model, stack, client, clickhouse):
    question = _ask(uuid.uuid4().hex)
    first, first_says, first_id = await _chat(client, question)
    again, again_says, again_id = await _chat(client, question)
    assert (first_says, again_says) == ("miss", "hit")
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.usage == first.usage and again.choices[0].finish_reason == first.choices[0].finish_reason
    assert again_id != first_id, "a hit is a request of its own"
    stream = await client.chat.completions.create(model=CACHED, messages=question, max_tokens=6, temperature=0,
                                                  stream=True)
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == first.choices[0].message.content
    rows = await _rows(clickhouse, [first_id, again_id])
    run, hit = rows[first_id], rows[again_id]
    assert run[0] is False and run[3] > 0 and not run[4].startswith("edge-")
    assert hit == (True, run[1], run[2], 0, hit[4]) and hit[4].startswith("edge-"), "same units, no cost, the edge's"


async def test_sampled_requests_are_not_cached_and_seeded_ones_are(cached_model, client):
    question = _ask(uuid.uuid4().hex)
    _, sampled, _ = await _chat(client, question, temperature=0.7)
    assert sampled is None, "a sampled request is a fresh sample every time"
    assert [(await _chat(client, question, temperature=0.7, seed=7))[1] for _ in range(2)] == ["miss", "hit"]


async def test_no_store_skips_the_write_and_no_cache_the_lookup(cached_model, client, clickhouse):
    question = _ask(uuid.uuid4().hex)
    says = [(await _chat(client, question, headers=headers))[1:] for headers in (
        {"Cache-Control": "no-store"}, {}, {}, {"Cache-Control": "no-cache"})]
    assert [status for status, _ in says] == ["miss", "miss", "hit", "miss"]
    rows = await _rows(clickhouse, [request_id for _, request_id in says])
    assert [rows[request_id][0] for _, request_id in says] == [False, False, True, False], "no-cache ran again"


async def test_tenants_never_share_answers_and_a_tenant_may_opt_out(cached_model, stack, client, clickhouse):
    question = _ask(uuid.uuid4().hex)
    assert [(await _chat(client, question))[1] for _ in range(2)] == ["miss", "hit"]
    other = stack.client(api_key=await _tenant(stack, f"cache-other-{uuid.uuid4().hex[:8]}"))
    assert (await _chat(other, question))[1] == "miss", "another tenant's answer is never served"
    tenant = f"cache-off-{uuid.uuid4().hex[:8]}"
    opted_out = stack.client(api_key=await _tenant(stack, tenant))
    status, body = await admin(stack, "PATCH", f"/admin/tenants/{tenant}", json={"response_cache_ttl_s": 0})
    assert status == 200 and body["response_cache_ttl_s"] == 0, body  # an operator opts a tenant out later
    answers = [await _chat(opted_out, question) for _ in range(2)]
    assert [says for _, says, _ in answers] == [None, None]
    rows = await _rows(clickhouse, [request_id for _, _, request_id in answers])
    assert [hit for hit, *_ in rows.values()] == [False, False], "each of its requests ran"


async def test_hits_are_limited_like_any_request(cached_model, stack):
    tenant = f"cache-rpm-{uuid.uuid4().hex[:8]}"
    question = _ask(uuid.uuid4().hex)
    assert (await _chat(stack.client(api_key=await _tenant(stack, tenant)), question))[1] == "miss"
    # Another key of the tenant, limited to two requests a minute: all three fall in one calendar minute.
    limited = stack.client(api_key=await _key(stack, tenant, limits=Limits(rpm=2)))
    await fresh_minute()
    assert [(await _chat(limited, question))[1] for _ in range(2)] == ["hit", "hit"]
    with pytest.raises(Exception) as refused:
        await _chat(limited, question)
    assert getattr(refused.value, "status_code", None) == 429


async def test_a_prepaid_hit_holds_like_a_run_and_gives_the_hold_back(cached_model, stack, nc, clickhouse):
    tenant = f"cache-prepaid-{uuid.uuid4().hex[:8]}"
    prepaid = stack.client(api_key=await _prepaid_tenant(stack, tenant))
    await _grant(stack, nc, tenant, 1_000_000)
    question = _ask(uuid.uuid4().hex)
    (_, first, run_id), (_, again, hit_id) = [await _chat(prepaid, question) for _ in range(2)]
    assert (first, again) == ("miss", "hit")
    rows = await _rows(clickhouse, [run_id, hit_id])
    run_cost = rows[run_id][3]
    assert run_cost > 0 and rows[hit_id][0] is True and rows[hit_id][3] == 0

    async def settled():  # both holds settled: only the run is paid for
        return await credits.available(nc.jetstream(), tenant) == 1_000_000 - run_cost

    await eventually(settled, timeout=20)


async def test_ten_identical_requests_at_once_run_once(cached_model, client, clickhouse):
    question = _ask(uuid.uuid4().hex)
    answers = await asyncio.gather(*(_chat(client, question, max_tokens=12) for _ in range(10)))
    assert len({completion.choices[0].message.content for completion, _, _ in answers}) == 1
    assert sorted(says for _, says, _ in answers) == ["hit"] * 9 + ["miss"]
    rows = await _rows(clickhouse, [request_id for _, _, request_id in answers])
    assert sorted(hit for hit, *_ in rows.values()) == [False] + [True] * 9, "one worker run, nine answers from it"


async def test_errors_are_never_cached(cached_model, client, clickhouse):
    question = _ask(uuid.uuid4().hex)
    for _ in range(2):  # the worker refuses it (no room for 8192 more tokens after the prompt), both times
        with pytest.raises(Exception) as refused:
            await _chat(client, question, max_tokens=8192)
        assert refused.value.status_code == 400 and refused.value.response.headers[HEADER] == "miss"


async def test_completions_and_messages_go_through_the_same_cache(cached_model, stack, client, clickhouse):
    prompt = f"Count to three for {uuid.uuid4().hex}:"
    said = []
    for _ in range(2):
        raw = await client.completions.with_raw_response.create(model=CACHED, prompt=prompt, max_tokens=6, temperature=0)
        said.append(raw.headers[HEADER])
    assert said == ["miss", "hit"]
    question = _ask(uuid.uuid4().hex)
    chat, _, _ = await _chat(client, question, max_tokens=8)  # an OpenAI chat request runs and is kept
    claude = anthropic.AsyncAnthropic(base_url=stack.base_url, api_key=stack.api_key, max_retries=0)
    raw = await claude.messages.with_raw_response.create(model=CACHED, max_tokens=8, messages=question,
                                                          extra_body={"temperature": 0})
    message = await raw.parse()
    assert raw.headers[HEADER] == "hit", "the same conversation asked through Anthropic's API"
    assert message.content[0].text == chat.choices[0].message.content
    assert (message.usage.input_tokens, message.usage.output_tokens) == (chat.usage.prompt_tokens,
                                                                        chat.usage.completion_tokens)
    async with claude.messages.stream(model=CACHED, max_tokens=8, messages=question,
                                      extra_body={"temperature": 0}) as stream:
        replayed = await stream.get_final_message()
    assert replayed.content[0].text == chat.choices[0].message.content, "a hit replays as Anthropic's events"


async def test_the_meter_takes_usage_from_an_edge_only_for_a_cache_hit_it_admitted(stack, nc, meter, clickhouse):
    js, edge = nc.jetstream(), UsageSigner.current.edge
    other_edge = Identity.generate()
    await register_issuer(js, other_edge.public_key, IssuerGrant("edge-other", ["*"], role="edge"))

    def signed_by_edge(event, issuer: Identity) -> tuple[bytes, dict[str, str]]:
        ticket = Ticket(event.request_id, event.tenant, event.principal, issuer.public_key, event.kind, event.model,
                        event.lane, event.queued_at, event.queued_at + 60, event.hold_micros)
        return seal_usage(event, ticket, issuer.sign(encode(ticket)), edge)

    tenant = "cache-usage"
    not_a_hit = usage_event(tenant=tenant, cache_hit=False)
    anothers = usage_event(tenant=tenant, cache_hit=True)  # a hit, but of a request another edge admitted
    good = usage_event(tenant=tenant, cache_hit=True)
    conn = await stack.connect("edge")  # what an edge may publish: usage on tg.usage.hit.<tenant> alone
    for event, issuer in ((not_a_hit, edge), (anothers, other_edge), (good, edge)):
        data, headers = signed_by_edge(event, issuer)
        await conn.jetstream().publish(cache_hit_usage_subject(tenant), data, headers=headers)
    await conn.close()
    assert len(await usage_rows(clickhouse, [good.request_id], expect=1)) == 1, "the meter got past the others"
    assert await usage_rows(clickhouse, [not_a_hit.request_id, anothers.request_id], expect=0, timeout=0) == []
    dead = await _dead_letters(js, {not_a_hit.request_id, anothers.request_id})
    assert all("not a cache hit it served" in reason for reason in dead.values()) and len(dead) == 2, dead
