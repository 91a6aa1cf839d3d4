"""Provider workers and routes, end to end: the openai SDK -> edge -> provider worker -> a local
double of each upstream (tests/provider_doubles) -> usage rows in ClickHouse."""

from __future__ import annotations

import asyncio
import base64
import io
import time
import wave

import openai
import pytest
from PIL import Image

from bus.account import credits
from bus.openai.audio import SpeechRequest, to_speech
from bus.settings import RouteSettings, RouteTarget, SettingsError, load_settings
from edge.routing import ordered
from infra.nats import roles
from tests.conftest import eventually
from tests.provider_doubles.server import (
    CACHED, HEARD, KEYS, SPEECH_RATE, SPEECH_SAMPLES_PER_CHARACTER, Behaviour, Double, reply_to, start, tone,
)
from tests.test_credits import _grant, _prepaid_tenant

MODELS = ("up-gpt", "up-gpt-b", "up-embed", "up-claude", "up-gemini", "up-misconfigured", "up-whisper", "up-tts",
          "up-image", "up-whisper-misconfigured")
ENV = {"TG_TEST_OPENAI_KEY": KEYS["openai"], "TG_TEST_ANTHROPIC_KEY": KEYS["anthropic"],
       "TG_TEST_GEMINI_KEY": KEYS["gemini"], "TG_TEST_WRONG_KEY": "sk-wrong-key-0badc0ffee"}
QUESTION = "what is the capital of France"
ANSWER = "".join(reply_to(QUESTION))
PROMPT_WORDS = len(QUESTION.split())


@pytest.fixture(scope="module")
async def double(stack):
    double = Double()
    runner = await start(double, "127.0.0.77", 18931)  # the address tests/stack_models/providers.toml names
    for model in MODELS:
        stack.spawn(roles.worker_role(model), "worker", "--model", model, env=ENV)
    for model in MODELS:
        await asyncio.to_thread(stack.wait_serving, model, timeout=60)
    yield double
    await runner.cleanup()


@pytest.fixture
def fresh(double):
    double.reset()
    return double


async def rows(ch, where: str, params: dict, expect: int, timeout: float = 15.0) -> list[dict]:
    keys = ("request_id", "model", "status", "error_code", "input_units", "cached_input_units", "output_units",
            "cost_micros", "route", "route_request_id")
    deadline = time.monotonic() + timeout
    while True:
        found = await ch.query(f"SELECT {', '.join(keys)} FROM usage_events FINAL WHERE {where} ORDER BY started_at",
                               params)
        if len(found) >= expect or time.monotonic() > deadline:
            return [dict(zip(keys, r)) for r in found]
        await asyncio.sleep(0.2)


def request_id(completion) -> str:
    return completion.id.split("-", 1)[1]


# -- each wire format, streamed and not --------------------------------------------


@pytest.mark.parametrize("model, prices", [("up-gpt", (3, 1, 7)), ("up-claude", (5, 1, 11)), ("up-gemini", (2, 1, 4))])
async def test_chat_whole_and_streamed_with_the_upstreams_usage(model, prices, fresh, client, clickhouse):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": QUESTION}]
    whole = await client.chat.completions.create(model=model, messages=messages, max_tokens=50)
    assert whole.choices[0].message.content == ANSWER
    assert whole.model == model and whole.choices[0].finish_reason == "stop"
    chunks = [c async for c in await client.chat.completions.create(
        model=model, messages=messages, max_tokens=50, stream=True, stream_options={"include_usage": True})]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # streamed, not one piece
    assert chunks[-1].usage.completion_tokens == len(reply_to(QUESTION)) == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    # The upstream's usage, its cached prompt tokens priced at the cached price.
    found = await rows(clickhouse, "request_id IN {ids:Array(String)}",
                       {"ids": [request_id(whole), request_id(chunks[0])]}, 2)
    input_price, cached_price, output_price = prices
    for row in found:
        assert row["model"] == model and row["status"] == "ok" and row["route"] == ""
        assert (row["input_units"], row["cached_input_units"], row["output_units"]) == (
            whole.usage.prompt_tokens, CACHED, whole.usage.completion_tokens)
        assert row["cost_micros"] == ((row["input_units"] - CACHED) * input_price + CACHED * cached_price
                                      + row["output_units"] * output_price)


async def test_what_the_upstreams_received(fresh, client):
    await client.chat.completions.create(model="up-claude", messages=[
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], temperature=1.5, stop=["x"])
    await client.chat.completions.create(model="up-gemini", messages=[
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], max_tokens=3, top_p=0.5)
    claude, gemini = fresh.received[-2]["body"], fresh.received[-1]["body"]
    assert claude["system"] == "be brief" and claude["messages"] == [{"role": "user", "content": "hi"}]
    assert claude["temperature"] == 1.0 and claude["stop_sequences"] == ["x"] and claude["max_tokens"] == 1024
    assert gemini["systemInstruction"] == {"parts": [{"text": "be brief"}]}
    assert gemini["contents"] == [{"role": "user", "parts": [{"text": "hi"}]}]
    assert gemini["generationConfig"] == {"maxOutputTokens": 3, "topP": 0.5}


async def test_completions_and_embeddings_through_an_openai_compatible_upstream(fresh, client, clickhouse):
    done = await client.completions.create(model="up-gpt", prompt=QUESTION, max_tokens=50)
    assert done.choices[0].text == ANSWER
    streamed = [c async for c in await client.completions.create(model="up-gpt", prompt=QUESTION, max_tokens=50,
                                                                  stream=True)]
    assert "".join(c.choices[0].text for c in streamed if c.choices) == ANSWER
    vectors = await client.embeddings.create(model="up-embed", input=["one two", "three"])
    assert [v.embedding[:2] for v in vectors.data] == [[7.0, 8.0], [5.0, 6.0]]
    assert vectors.usage.prompt_tokens == 3
    found = await rows(clickhouse, "model = 'up-embed' AND status = 'ok'", {}, 1)
    assert found[-1]["input_units"] == 3 and found[-1]["cost_micros"] == 6


async def test_a_chat_only_upstream_refuses_raw_prompts_with_a_400(fresh, client):
    with pytest.raises(openai.BadRequestError) as caught:
        await client.completions.create(model="up-claude", prompt="hello")
    assert caught.value.body["param"] == "model"


# -- audio and images through an OpenAI-compatible upstream ------------------------


def silence(seconds: float, rate: int = 16_000) -> bytes:
    """A mono 16-bit WAV of ``seconds`` of silence."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\0\0" * int(seconds * rate))
    return out.getvalue()


def png(side: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (side, side), (255, 0, 0)).save(out, format="PNG")
    return out.getvalue()


async def test_a_transcription_and_a_translation_billed_by_the_upstreams_duration(fresh, client, clickhouse):
    heard = await client.audio.transcriptions.create(
        model="up-whisper", file=("hi.wav", silence(2.5)), response_format="verbose_json", language="en",
        timestamp_granularities=["word", "segment"])
    assert heard.text == HEARD and heard.duration == 2.5
    assert [w.word for w in heard.words] == HEARD.split() and heard.segments[0].end == 2.5
    sent = fresh.received[-1]
    assert sent["path"] == "/openai/v1/audio/transcriptions" and sent["headers"]["Content-Type"].startswith(
        "multipart/form-data") and sent["headers"]["Authorization"] == f"Bearer {KEYS['openai']}"
    assert sent["body"]["file"].filename == "audio.wav" and sent["body"]["model"] == "whisper-test"
    assert sent["body"]["response_format"] == "verbose_json" and sent["body"]["language"] == "en"
    assert sent["body"]["timestamp_granularities[]"] == ["segment", "word"]
    translated = await client.audio.translations.create(model="up-whisper", file=("hi.wav", silence(1.2)))
    assert translated.text == "translated: " + HEARD
    assert fresh.received[-1]["path"] == "/openai/v1/audio/translations"
    assert "timestamp_granularities[]" not in fresh.received[-1]["body"]
    found = await rows(clickhouse, "model = 'up-whisper' AND status = 'ok'", {}, 2)
    assert [(r["input_units"], r["cost_micros"]) for r in found[-2:]] == [(3, 15), (2, 10)]  # started seconds, 5 each


async def test_speech_streams_the_upstreams_audio_and_bills_its_characters(fresh, client, clickhouse):
    text = "Read this aloud, please."
    gate = asyncio.Event()
    fresh.plan("tts-test", Behaviour("hold", gate=gate))
    async with client.audio.speech.with_streaming_response.create(model="up-tts", voice="nova", input=text,
                                                                  response_format="pcm") as response:
        pieces = response.iter_bytes()
        async with asyncio.timeout(10):  # the first piece comes while the upstream holds back the rest
            first = await anext(pieces)
        gate.set()
        rest = [data async for data in pieces]
    assert first + b"".join(rest) == tone(len(text))  # the upstream's samples, unchanged
    sent = fresh.received[-1]["body"]
    assert sent == {"model": "tts-test", "input": text, "voice": "nova-upstream", "response_format": "pcm",
                    "speed": 1.0}
    wav = await client.audio.speech.create(model="up-tts", voice="alloy", input=text, response_format="wav")
    with wave.open(io.BytesIO(wav.content)) as w:  # re-encoded as the client asked
        assert w.getframerate() == SPEECH_RATE  # a streamed WAV's header cannot say its length: its data does
        assert len(w.readframes(2**31 - 1)) == 2 * len(text) * SPEECH_SAMPLES_PER_CHARACTER
    found = await rows(clickhouse, "model = 'up-tts' AND status = 'ok'", {}, 2)
    assert [(r["input_units"], r["cost_micros"]) for r in found[-2:]] == [(len(text), 3 * len(text))] * 2


async def test_images_drawn_and_edited_upstream_billed_by_size(fresh, client, clickhouse):
    drawn = await client.images.generate(model="up-image", prompt="a red square", size="64x64", n=2,
                                         response_format="b64_json")
    assert [Image.open(io.BytesIO(base64.b64decode(d.b64_json))).size for d in drawn.data] == [(64, 64)] * 2
    assert fresh.received[-1]["body"] == {"model": "image-test", "prompt": "a red square", "n": 2, "size": "64x64",
                                          "response_format": "b64_json"}
    edited = await client.images.edit(model="up-image", image=("in.png", png(32)), mask=("m.png", png(32)),
                                      prompt="make it blue", size="32x32", response_format="b64_json")
    assert Image.open(io.BytesIO(base64.b64decode(edited.data[0].b64_json))).size == (32, 32)
    sent = fresh.received[-1]
    assert sent["path"] == "/openai/v1/images/edits" and sent["body"]["image"].filename == "image.png"
    assert sent["body"]["mask"].filename == "mask.png" and sent["body"]["size"] == "32x32"
    found = await rows(clickhouse, "model = 'up-image' AND status = 'ok'", {}, 2)
    assert [(r["output_units"], r["cost_micros"]) for r in found[-2:]] == [(2, 1400), (1, 200)]


async def test_an_upstream_400_on_audio_is_the_clients_unbilled_and_a_bad_key_stays_hidden(fresh, stack, client,
                                                                                            clickhouse):
    fresh.plan("whisper-test", Behaviour("status", 400))
    with pytest.raises(openai.BadRequestError) as caught:
        await client.audio.transcriptions.create(model="up-whisper", file=("hi.wav", silence(1.0)))
    assert "scripted 400" in caught.value.message and fresh.calls["whisper-test"] == 1
    with pytest.raises(openai.APIStatusError) as refused:  # the double quotes the wrong key back, as OpenAI does
        await client.audio.transcriptions.create(model="up-whisper-misconfigured", file=("hi.wav", silence(1.0)))
    assert refused.value.status_code == 503 and refused.value.body["code"] == "upstream_unavailable"
    assert fresh.received[-1]["headers"]["Authorization"] == f"Bearer {ENV['TG_TEST_WRONG_KEY']}"  # it was sent
    found = await rows(clickhouse, "model IN ('up-whisper', 'up-whisper-misconfigured') AND status = 'error'", {}, 2)
    assert len(found) >= 2 and all(r["cost_micros"] == 0 for r in found)
    logs = b"".join(path.read_bytes() for path in stack.tmp.glob("*.log"))
    for secret in ENV["TG_TEST_WRONG_KEY"], KEYS["openai"]:
        assert secret not in refused.value.response.text and secret not in caught.value.response.text
        assert secret.encode() not in logs


# -- errors ------------------------------------------------------------------------


async def test_an_upstream_400_is_the_clients_and_a_tool_message_is_refused_before_it(fresh, client, clickhouse):
    fresh.plan("gpt-test", Behaviour("status", 400))
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="up-gpt", messages=[{"role": "user", "content": "hi"}])
    assert "scripted 400" in caught.value.message
    assert fresh.calls["gpt-test"] == 1  # a client's mistake is not retried
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="up-claude", messages=[{"role": "tool", "content": "x"}])
    assert caught.value.body["param"] == "messages[0].role" and fresh.calls["claude-test"] == 0


async def test_429_with_retry_after_is_honoured_then_answered(fresh, client):
    fresh.plan("gpt-test", Behaviour("status", 429, retry_after="1"))
    started = time.monotonic()
    done = await client.chat.completions.create(model="up-gpt", messages=[{"role": "user", "content": QUESTION}])
    assert done.choices[0].message.content == ANSWER
    assert time.monotonic() - started >= 1.0 and fresh.calls["gpt-test"] == 2


async def test_an_upstream_that_keeps_failing_is_a_502_after_its_retries(fresh, client, clickhouse):
    fresh.plan("gpt-test", Behaviour("status", 500), Behaviour("status", 503))
    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(model="up-gpt", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 502 and caught.value.body["code"] == "upstream_failed"
    assert fresh.calls["gpt-test"] == 2  # attempts = 2
    found = await rows(clickhouse, "request_id = {id:String}", {"id": caught.value.response.headers["x-request-id"]}, 1)
    assert found[0]["status"] == "error" and found[0]["error_code"] == "upstream_failed" and found[0]["cost_micros"] == 0


async def test_a_provider_key_never_leaves_the_worker(fresh, stack, client, clickhouse, nc):
    seen: list[bytes] = []

    async def envelope(msg) -> None:
        seen.append(msg.data + repr(msg.headers).encode())
    sub = await nc.subscribe("tg.req.>", cb=envelope)
    with pytest.raises(openai.APIStatusError) as caught:  # the double quotes the wrong key back, as OpenAI does
        await client.chat.completions.create(model="up-misconfigured", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 503 and caught.value.body["code"] == "upstream_unavailable"
    [c async for c in await client.chat.completions.create(model="up-gpt", messages=[{"role": "user", "content": "hi"}],
                                                           stream=True)]
    await sub.unsubscribe()
    assert fresh.received[-2]["headers"]["Authorization"] == f"Bearer {ENV['TG_TEST_WRONG_KEY']}"  # it was sent
    secrets = [*KEYS.values(), ENV["TG_TEST_WRONG_KEY"]]
    found = await rows(clickhouse, "model IN ('up-misconfigured', 'up-gpt')", {}, 2)
    logs = b"".join(path.read_bytes() for path in stack.tmp.glob("*.log"))
    assert seen and logs
    for secret in secrets:
        assert secret not in caught.value.response.text
        assert all(secret.encode() not in message for message in seen)
        assert secret not in repr(found)
        assert secret.encode() not in logs


# -- timeouts and broken streams ---------------------------------------------------


async def test_a_slow_first_byte_times_out_and_the_route_falls_back(fresh, client, clickhouse):
    fresh.plan("gpt-test", Behaviour("slow", delay=3.0), Behaviour("slow", delay=3.0))
    done = await client.chat.completions.create(model="up-route", messages=[{"role": "user", "content": QUESTION}])
    assert done.choices[0].message.content == ANSWER and done.model == "up-gpt-b"
    found = await rows(clickhouse, "route_request_id = {id:String}", {"id": request_id(done)}, 2)
    assert [(r["model"], r["status"], r["error_code"]) for r in found] == [
        ("up-gpt", "error", "upstream_timeout"), ("up-gpt-b", "ok", None)]


async def test_a_stream_cut_before_its_first_token_falls_back(fresh, client):
    fresh.plan("gpt-test", Behaviour("drop", pieces=0), Behaviour("drop", pieces=0))
    chunks = [c async for c in await client.chat.completions.create(
        model="up-route", messages=[{"role": "user", "content": QUESTION}], stream=True)]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    assert {c.model for c in chunks} == {"up-gpt-b"}


async def test_a_stream_cut_after_its_first_token_is_an_error_not_a_silent_fallback(fresh, client, clickhouse):
    fresh.plan("gpt-test", Behaviour("drop", pieces=2))
    stream = await client.chat.completions.create(model="up-route", messages=[{"role": "user", "content": QUESTION}],
                                                  stream=True)
    text = []
    with pytest.raises(openai.APIError):
        async for chunk in stream:
            text.extend(c.delta.content or "" for c in chunk.choices)
    assert "".join(text) == "".join(reply_to(QUESTION)[:2])
    assert fresh.calls["gpt-backup"] == 0


@pytest.mark.parametrize("model, upstream", [("up-claude", "claude-test"), ("up-gemini", "gemini-test")])
async def test_a_cut_stream_from_anthropic_or_gemini_is_an_error_after_what_was_sent(model, upstream, fresh, client):
    fresh.plan(upstream, Behaviour("drop", pieces=2))
    stream = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}],
                                                  stream=True)
    text = []
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            text.extend(c.delta.content or "" for c in chunk.choices)
    assert "".join(text) == "".join(reply_to(QUESTION)[:2]) and "stream" in caught.value.message


# -- routes --------------------------------------------------------------------------


async def test_fallback_bills_once_and_the_breaker_opens_then_closes(fresh, client, clickhouse):
    fresh.plan("gpt-test", *[Behaviour("status", 500)] * 4)  # two requests' worth of tries (attempts = 2)
    served = []
    for _ in range(2):
        done = await client.chat.completions.create(model="up-route-breaker", messages=[{"role": "user", "content": QUESTION}])
        served.append(done.model)
    assert served == ["up-gpt-b", "up-gpt-b"] and fresh.calls["gpt-test"] == 4
    found = await rows(clickhouse, "route_request_id = {id:String}", {"id": request_id(done)}, 2)
    assert [(r["model"], r["status"], r["route"]) for r in found] == [("up-gpt", "error", "up-route-breaker"),
                                                                      ("up-gpt-b", "ok", "up-route-breaker")]
    assert found[0]["cost_micros"] == 0 and found[1]["cost_micros"] > 0  # billed once
    assert found[0]["request_id"] == request_id(done)  # the client's id is the first attempt's
    # Two failures in a row: the breaker is open, and up-gpt is not tried while it cools down.
    done = await client.chat.completions.create(model="up-route-breaker", messages=[{"role": "user", "content": QUESTION}])
    assert done.model == "up-gpt-b" and fresh.calls["gpt-test"] == 4
    # After the cool-down one request probes it; it answers, and the breaker closes.
    await asyncio.sleep(2.0)
    probed = await client.chat.completions.create(model="up-route-breaker", messages=[{"role": "user", "content": QUESTION}])
    assert probed.model == "up-gpt" and fresh.calls["gpt-test"] == 5
    again = await client.chat.completions.create(model="up-route-breaker", messages=[{"role": "user", "content": QUESTION}])
    assert again.model == "up-gpt"


async def test_a_route_with_every_target_failing_gives_the_last_error(fresh, client):
    fresh.plan("gpt-test", *[Behaviour("status", 429)] * 2)
    fresh.plan("gpt-backup", *[Behaviour("status", 429)] * 2)
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="up-route", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["code"] == "upstream_rate_limited"
    assert fresh.calls["gpt-test"] == fresh.calls["gpt-backup"] == 2


async def test_one_provider_worker_runs_many_requests_at_once(fresh, client):
    n = 60  # under the default tier's 64 in flight
    fresh.plan("gpt-test", *[Behaviour("slow", delay=0.5)] * n)  # one at a time would take 30 s

    async def one(i: int) -> str:
        done = await client.chat.completions.create(model="up-gpt", messages=[{"role": "user", "content": f"n {i}"}])
        return done.choices[0].message.content
    started = time.monotonic()
    answers = await asyncio.gather(*(one(i) for i in range(n)))
    assert answers == ["".join(reply_to(f"n {i}")) for i in range(n)]
    assert fresh.calls["gpt-test"] == n and time.monotonic() - started < 10


async def test_a_route_falls_back_to_one_of_our_own_models_and_is_listed(fresh, client):
    fresh.plan("gpt-test", *[Behaviour("status", 503)] * 2)
    done = await client.chat.completions.create(model="up-route-own", max_tokens=4,
                                                messages=[{"role": "user", "content": "Say hi"}])
    assert done.model == "smollm2-135m" and done.choices[0].message.content
    listed = {m.id for m in (await client.models.list()).data}
    assert {"up-route", "up-route-own", "up-gpt"} <= listed


async def test_a_prepaid_tenant_pays_once_for_a_request_that_fell_back(fresh, stack, nc, meter, clickhouse):
    tenant = "prepaid-routed"
    key = await _prepaid_tenant(stack, tenant)
    await _grant(stack, nc, tenant, 1_000_000, kind="topup")
    fresh.plan("gpt-test", *[Behaviour("status", 500)] * 2)
    done = await stack.client(api_key=key).chat.completions.create(
        model="up-route", max_tokens=20, messages=[{"role": "user", "content": QUESTION}])
    assert done.model == "up-gpt-b"
    found = await rows(clickhouse, "route_request_id = {id:String}", {"id": request_id(done)}, 2)
    failed, served = found
    assert failed["cost_micros"] == 0 and served["cost_micros"] > 0

    async def settled():  # both attempts' holds given back, less what the one that answered cost
        return await credits.available(nc.jetstream(), tenant) == 1_000_000 - served["cost_micros"]
    await eventually(settled)


def test_targets_are_tried_by_priority_and_equals_by_weight():
    route = RouteSettings(targets=[RouteTarget("a", weight=3, priority=0), RouteTarget("b", weight=1, priority=0),
                                   RouteTarget("c")])
    orders = [ordered(route) for _ in range(4000)]
    assert all(order[2] == "c" for order in orders)  # priority 2 (its place): after both equals
    share = sum(order[0] == "a" for order in orders) / len(orders)
    assert 0.70 < share < 0.80  # weight 3 of 4


@pytest.mark.parametrize("toml, says", [
    ('[models.m]\nprovider = "nope"\n', "no [providers.nope]"),
    ('[providers.p]\napi = "anthropic"\nbase_url = "https://x"\n[models.m]\nprovider = "p"\nbackend = "openai"\n',
     "speaks anthropic"),
    ('[providers.p]\napi = "gemini"\nbase_url = "https://x"\n[models.m]\nprovider = "p"\nkind = "embeddings"\n'
     'dimensions = 8\n', "not embeddings"),
    ('[providers.p]\napi = "openai"\nbase_url = "ftp://x"\n', "http(s) URL"),
    ('[providers.p]\napi = "openai"\nbase_url = "https://x"\n[models.m]\nprovider = "p"\n[models.m.upstream]\n'
     'api = "openai"\nbase_url = "https://y"\n', "name its upstream"),
    ('[routes.r]\ntargets = [{ model = "nope" }]\n', "not a configured model"),
    ('[routes.smollm2-135m]\ntargets = [{ model = "all-minilm-l6-v2" }]\n', "a model has that name"),
    ('[routes.r]\ntargets = [{ model = "smollm2-135m" }, { model = "all-minilm-l6-v2" }]\n', "different kinds"),
    ('[routes.r]\ntargets = []\n', "invalid settings"),
])
def test_nonsense_in_provider_and_route_settings_is_refused(tmp_path, toml, says):
    path = tmp_path / "tollgate.toml"
    path.write_text(toml)
    with pytest.raises(SettingsError) as caught:
        load_settings(path, {})
    assert says in str(caught.value)


def test_a_provider_model_runs_many_requests_at_once_unless_told(tmp_path):
    path = tmp_path / "tollgate.toml"
    path.write_text('[providers.p]\napi = "openai"\nbase_url = "http://x/v1"\n[models.a]\nprovider = "p"\n'
                    '[models.b]\nprovider = "p"\nconcurrency = 4\nupstream_model = "bb"\n')
    models = load_settings(path, {}).models
    assert (models["a"].concurrency, models["a"].backend, models["a"].upstream_model) == (256, "openai", "a")
    assert (models["b"].concurrency, models["b"].upstream_model) == (4, "bb")


def test_a_provider_speech_model_without_voices_sends_openais_voice_names_as_named(tmp_path):
    path = tmp_path / "tollgate.toml"
    path.write_text('[providers.p]\napi = "openai"\nbase_url = "http://x/v1"\n[models.s]\nprovider = "p"\n'
                    'kind = "speech"\n')
    spec = load_settings(path, {}).models["s"]
    assert to_speech(SpeechRequest(model="s", input="hi", voice="echo"), spec).voice == "echo"
