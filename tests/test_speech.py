"""POST /v1/audio/speech on the real stack: Piper with the real en_US "joe" voice, encoded with PyAV, streamed to
the official openai SDK as it is read."""

from __future__ import annotations

import asyncio
import io
import math
import signal
import time
from datetime import timezone

import aiohttp
import av
import pytest

from bus.account import credits
from infra.nats.roles import worker_role
from tests.conftest import CHAT_MODEL, eventually, usage_rows
from tests.test_credits import _grant, _prepaid_tenant
from tests.test_transcriptions import _wer

PIPER = "piper-en-us-joe"  # tests/stack_models/piper.toml
SPARE = "piper-en-us-joe-spare"  # the same voice, served only by workers a test starts and kills
PRICE = 3  # micro-credits per character there
PARIS = "The capital of France is Paris."
# Several sentences: read (and streamed) one piece at a time.
STORY = ("The capital of France is Paris. It lies on the river Seine. Millions of people visit it every year. "
         "They come for its museums, its food and its long walks along the water.")
# One sentence of about 1,300 characters and no punctuation: Piper would read it in one go, the worker in pieces.
RAMBLE = " ".join(["the quick brown fox jumps over the lazy dog"] * 30)


@pytest.fixture(scope="module")
def piper(stack) -> str:
    stack.serve(PIPER)
    return PIPER


def _seconds(audio: bytes) -> float:
    """How long ``audio`` plays, decoded with PyAV."""
    with av.open(io.BytesIO(audio)) as src:
        return sum(frame.samples / frame.sample_rate for frame in src.decode(audio=0))


def _is_mp3(audio: bytes) -> bool:
    """An ID3 tag, or an MPEG audio frame's sync word, first."""
    return audio[:3] == b"ID3" or (audio[0] == 0xFF and audio[1] & 0xE0 == 0xE0)


@pytest.mark.parametrize("response_format, content_type, looks_right, container", [
    ("mp3", "audio/mpeg", _is_mp3, "mp3"),
    ("opus", "audio/ogg; codecs=opus", lambda a: a[:4] == b"OggS" and b"OpusHead" in a[:64], "ogg"),
    ("aac", "audio/aac", lambda a: a[0] == 0xFF and a[1] & 0xF6 == 0xF0, "aac"),  # an ADTS header
    ("flac", "audio/flac", lambda a: a[:4] == b"fLaC", "flac"),
    # Streamed, so its sizes are "to the end" (0xFFFFFFFF), as the length is not known when the header leaves.
    ("wav", "audio/wav", lambda a: a[:12] == b"RIFF\xff\xff\xff\xffWAVE", "wav"),
])
async def test_every_container_format_decodes_to_the_sentence_length(piper, client, response_format, content_type,
                                                                      looks_right, container):
    reply = await client.audio.speech.create(model=piper, voice="alloy", input=PARIS, response_format=response_format)
    audio = reply.content
    assert reply.response.headers["content-type"] == content_type
    assert looks_right(audio), audio[:16]
    with av.open(io.BytesIO(audio)) as src:
        assert src.format.name.split(",")[0] == container
    assert 1.2 < _seconds(audio) < 3.5, "about two seconds of speech"


async def test_pcm_is_raw_16_bit_at_24_khz(piper, client):
    pcm = (await client.audio.speech.create(model=piper, voice="nova", input=PARIS, response_format="pcm")).content
    assert len(pcm) % 2 == 0
    assert 1.2 < len(pcm) / 2 / 24_000 < 3.5, "OpenAI's pcm: 24,000 samples a second"


async def test_mp3_is_the_default_and_a_voice_may_be_an_object(piper, client):
    reply = await client.audio.speech.create(model=piper, voice={"id": "onyx"}, input=PARIS)
    assert reply.response.headers["content-type"] == "audio/mpeg" and _is_mp3(reply.content)


async def test_control_characters_are_read_around(piper, client):
    audio = (await client.audio.speech.create(model=piper, voice="alloy", input="Hello\x00 there.\x07",
                                              response_format="wav")).content
    assert 0.3 < _seconds(audio) < 3


async def test_speed_shortens_the_audio(piper, client):
    normal, fast = [_seconds((await client.audio.speech.create(model=piper, voice="alloy", input=PARIS,
                                                               response_format="wav", speed=speed)).content)
                    for speed in (1.0, 2.0)]
    assert fast < 0.7 * normal


def _utc_seconds(moment) -> float:
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


async def test_audio_streams_while_the_worker_is_still_reading(piper, client, clickhouse):
    arrivals = []
    async with client.audio.speech.with_streaming_response.create(model=piper, voice="echo", input=STORY,
                                                                  response_format="pcm") as response:
        assert response.headers["content-type"] == "audio/pcm"
        async for data in response.iter_bytes():
            arrivals.append((time.time(), len(data)))
        request_id = response.headers["x-request-id"]
    assert len(arrivals) > 1
    assert 5 < sum(n for _, n in arrivals) / 2 / 24_000 < 20
    [(finished,)] = await eventually(lambda: clickhouse.query(
        "SELECT finished_at FROM usage_events WHERE request_id = {r:String}", {"r": request_id}))
    assert arrivals[0][0] < _utc_seconds(finished), "the first audio reached the client before the last was read"


async def test_usage_row_bills_every_character(piper, client, clickhouse):
    reply = await client.audio.speech.create(model=piper, voice="alloy", input=STORY, response_format="flac")
    request_id = reply.response.headers["x-request-id"]
    [row] = await usage_rows(clickhouse, [request_id], expect=1)
    [(kind, unit)] = await clickhouse.query("SELECT kind, unit FROM usage_events WHERE request_id = {r:String}",
                                            {"r": request_id})
    assert (kind, unit, row["status"], row["model"]) == ("speech", "characters", "ok", piper)
    assert (row["input_units"], row["output_units"]) == (len(STORY), 0)
    assert row["cost_micros"] == len(STORY) * PRICE


async def test_a_client_that_leaves_stops_the_reading_and_pays_for_what_was_read(piper, stack, meter, clickhouse):
    async with aiohttp.ClientSession() as http:
        async with _speech(http, stack, {"model": piper, "voice": "alloy", "input": RAMBLE}) as resp:
            assert resp.status == 200
            assert _is_mp3(await resp.content.readany())
            request_id = resp.headers["x-request-id"]
            resp.close()  # gone mid-stream: the connection is dropped
    [row] = await usage_rows(clickhouse, [request_id], expect=1)
    assert row["status"] == "cancelled"
    assert 0 < row["input_units"] < len(RAMBLE), "billed the pieces read before the client left, not the rest"
    assert row["cost_micros"] == row["input_units"] * PRICE


async def test_a_worker_lost_mid_stream_cuts_the_audio_short(stack, meter):
    worker = stack.spawn(worker_role(SPARE), "worker", "--model", SPARE)
    try:
        await asyncio.to_thread(stack.wait_serving, SPARE, True, 300)
        async with aiohttp.ClientSession() as http:
            async with _speech(http, stack, {"model": SPARE, "voice": "alloy", "input": RAMBLE}) as resp:
                assert resp.status == 200
                await resp.content.readany()
                worker.send_signal(signal.SIGKILL)
                with pytest.raises(aiohttp.ClientPayloadError):  # never a body that ends as if whole
                    await resp.read()
    finally:
        worker.kill()
        await asyncio.to_thread(worker.wait, 15)


async def test_a_prepaid_tenant_holds_every_character_and_is_debited_them(piper, stack, nc, meter, clickhouse):
    tenant = "prepaid-speech"
    key = await _prepaid_tenant(stack, tenant)
    await _grant(stack, nc, tenant, 10_000)
    reply = await stack.client(api_key=key).audio.speech.create(model=piper, voice="alloy", input=PARIS)
    [(hold, cost)] = await eventually(lambda: clickhouse.query(
        "SELECT hold_micros, cost_micros FROM usage_events WHERE request_id = {r:String}",
        {"r": reply.response.headers["x-request-id"]}))
    assert hold == cost == math.ceil(len(PARIS) * PRICE * 1.5), "the enterprise tier's high lane: 1.5 x characters"
    await eventually(lambda: _available_is(nc, tenant, 10_000 - cost))


async def _available_is(nc, tenant: str, amount: int) -> bool:
    return await credits.available(nc.jetstream(), tenant) == amount


@pytest.mark.parametrize("fields, param", [
    ({"input": ""}, "input"),
    ({"input": "x" * 4097}, "input"),
    ({"input": "   "}, "input"),
    ({"input": "..."}, "input"),  # nothing to read aloud: found by the worker, before any audio
    ({"voice": "bogus"}, "voice"),
    ({"voice": {"id": "bogus"}}, "voice"),
    ({"voice": 7}, "voice"),
    ({"response_format": "ogg"}, "response_format"),
    ({"speed": 0.1}, "speed"),
    ({"speed": 4.5}, "speed"),
    ({"speed": "fast"}, "speed"),
    ({"instructions": "Speak like a pirate."}, "instructions"),
    ({"stream_format": "sse"}, "stream_format"),
    ({"model": CHAT_MODEL}, "model"),
    ({"temperature": 1}, "temperature"),
])
async def test_bad_requests_are_400s_naming_the_field(piper, stack, meter, fields, param):
    status, body = await _post(stack, {"model": piper, "voice": "alloy", "input": PARIS, **fields}, stack.api_key)
    assert status == 400, body
    assert body["error"]["param"] == param, body


async def test_refused_requests_are_never_billed(piper, stack, nc, meter, clickhouse):
    tenant = "tts-refused"
    key = await _prepaid_tenant(stack, tenant)
    await _grant(stack, nc, tenant, 10_000)
    for fields in ({"input": ""}, {"input": "x" * 4097}, {"voice": "bogus"}, {"speed": 9}, {"response_format": "ogg"}):
        status, body = await _post(stack, {"model": piper, "voice": "alloy", "input": PARIS, **fields}, key)
        assert status == 400, body
    status, _ = await _post(stack, {"model": piper, "voice": "alloy", "input": "..."}, key)  # refused by the worker
    assert status == 400
    reply = await stack.client(api_key=key).audio.speech.create(model=piper, voice="alloy", input=PARIS)
    [good] = await usage_rows(clickhouse, [reply.response.headers["x-request-id"]], expect=1)
    rows = await clickhouse.query("SELECT status, cost_micros FROM usage_events WHERE tenant = {t:String} "
                                  "ORDER BY queued_at", {"t": tenant})
    assert rows == [("error", 0), ("ok", good["cost_micros"])], "only the worker saw a refused request; it cost 0"
    await eventually(lambda: _available_is(nc, tenant, 10_000 - good["cost_micros"]))


def _speech(http: aiohttp.ClientSession, stack, body: dict, key: str | None = None):
    """A raw POST /v1/audio/speech, to read or leave as a client of any kind may."""
    return http.post(stack.base_url + "/v1/audio/speech", json=body,
                     headers={"Authorization": f"Bearer {key or stack.api_key}"})


async def _post(stack, body: dict, key: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        async with _speech(http, stack, body, key) as resp:
            return resp.status, await resp.json()


@pytest.fixture(scope="module")
def whisper(stack) -> str:
    stack.serve("whisper-base")  # tests/stack_models/whisper.toml
    return "whisper-base"


@pytest.mark.parametrize("response_format", ["mp3", "wav"])
async def test_speech_to_text_hears_what_was_said(piper, whisper, client, response_format):
    audio = (await client.audio.speech.create(model=piper, voice="alloy", input=PARIS,
                                              response_format=response_format)).content
    heard = await client.audio.transcriptions.create(model=whisper, file=(f"paris.{response_format}", audio))
    # Letter by letter: whisper base hears Piper's "France is" as "Francis" or "France's" in about half of its
    # (randomly varied) readings, a word error rate of a third for one missing letter; any real fault is far more.
    assert _wer(" ".join(_letters(heard.text)), " ".join(_letters(PARIS))) <= 0.1, heard.text


def _letters(text: str) -> str:
    return "".join(c for c in text.lower() if c.isalnum())
