"""Speech to text real-time factor through the whole gateway against faster-whisper called directly.

Starts a real nats-server, an edge and a faster-whisper worker on the real whisper "base" weights
(the default model ``whisper-base``: CTranslate2, int8 on CPU), then transcribes espeak-ng speech of
three lengths through ``POST /v1/audio/transcriptions`` (a WAV upload, ``json``), timing each answer
at the client. The same files are transcribed in this process by faster-whisper's own
``WhisperModel.transcribe`` with the same settings (decoding the file included), in turns with the
gateway's runs so both meet the same load. Real-time factor = seconds spent / seconds of audio
(below 1: faster than real time); medians over the runs.

    .venv/bin/python bench/transcription_rtf.py [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import av
from faster_whisper import WhisperModel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stack import gateway  # noqa: E402
from bus.settings import DEFAULT_MODELS, Settings  # noqa: E402
from consumers.models import resolve  # noqa: E402

MODEL = "whisper-base"
SENTENCE = "The quick brown fox jumps over the lazy dog."
PARAGRAPH = ("The meeting will start at nine in the morning. Please bring the quarterly report and your notes. "
             "We will discuss the budget, the new office and the hiring plan for next year. ")
TEXTS = {"sentence": SENTENCE, "paragraph": PARAGRAPH, "4 paragraphs": PARAGRAPH * 4}


def speech(text: str, into: Path) -> tuple[bytes, float]:
    """``text`` spoken by espeak-ng as a WAV file, and its length in seconds."""
    path = into / f"{abs(hash(text))}.wav"
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True)
    with av.open(str(path)) as f:
        seconds = sum(frame.samples / frame.sample_rate for frame in f.decode(audio=0))
    return path.read_bytes(), seconds


async def through_gateway(session: aiohttp.ClientSession, url: str, wav: bytes) -> float:
    """One upload's time from sending it to the whole answer."""
    form = aiohttp.FormData()
    form.add_field("model", MODEL)
    form.add_field("file", wav, filename="speech.wav", content_type="audio/wav")
    start = time.perf_counter()
    async with session.post(url, data=form) as resp:
        if resp.status != 200:
            raise RuntimeError(f"status {resp.status}: {await resp.text()}")
        await resp.read()
    return time.perf_counter() - start


def directly(model, wav: bytes) -> float:
    """One transcription by faster-whisper's own ``transcribe`` in this process, with the worker's settings."""
    start = time.perf_counter()
    segments, _info = model.transcribe(io.BytesIO(wav))
    list(segments)  # the work happens as segments are taken
    return time.perf_counter() - start


async def compare(url: str, key: str, model, wav: bytes, runs: int) -> tuple[list[float], list[float]]:
    """Gateway and direct runs taken in turns, so both meet the same load on a shared machine."""
    gateway, direct = [], []
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
        await through_gateway(session, url, wav)  # warm-ups, not counted
        directly(model, wav)
        for _ in range(runs):
            gateway.append(await through_gateway(session, url, wav))
            direct.append(directly(model, wav))
    return gateway, direct


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    spec = DEFAULT_MODELS[MODEL]
    weights = resolve(MODEL, spec, Path(Settings().cache_dir), progress=True)
    tmp = Path(tempfile.mkdtemp(prefix="tollgate-bench-"))
    clips = {name: speech(text, tmp) for name, text in TEXTS.items()}
    models = (f'[models.{MODEL}]\nkind = "transcription"\nbackend = "faster-whisper"\nsource = "{weights}"\n'
              f'device = "{spec.device}"\ncompute_type = "{spec.compute_type}"\n')
    with gateway(models, [MODEL], tmp=tmp) as gw:
        model = WhisperModel(str(weights), device=spec.device, compute_type=spec.compute_type)
        url = f"{gw.url}/v1/audio/transcriptions"
        results = {name: asyncio.run(compare(url, gw.key, model, wav, args.runs)) for name, (wav, _) in clips.items()}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, load average {os.getloadavg()[0]:.1f}; {MODEL} {spec.compute_type} on "
          f"{spec.device}, beam 5; median of {args.runs} runs after a warm-up\n")
    print("| audio | seconds | gateway s | gateway RTF | direct s | direct RTF | gateway overhead |")
    print("|---|---|---|---|---|---|---|")
    for name, (_, seconds) in clips.items():
        g, d = (statistics.median(times) for times in results[name])
        print(f"| {name} | {seconds:.1f} | {g:.2f} | {g / seconds:.2f} | {d:.2f} | {d / seconds:.2f} "
              f"| {(g - d) * 1000:+.0f} ms |")


if __name__ == "__main__":
    main()
