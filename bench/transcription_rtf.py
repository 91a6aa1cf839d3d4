"""Speech to text real-time factor through the whole gateway against faster-whisper called directly.

Starts a real nats-server, an edge and a faster-whisper worker on the real whisper "base" weights
(the default model ``whisper-base``: CTranslate2, int8 on CPU), then transcribes espeak-ng speech of
four lengths through ``POST /v1/audio/transcriptions`` (a WAV upload, ``json``), timing each answer
at the client. The same files are transcribed in this process by faster-whisper's own
``WhisperModel.transcribe`` with the same settings (decoding the file included), in turns with the
gateway's runs so both meet the same load. The worker sends audio over 30 s through faster-whisper's
``BatchedInferencePipeline``, so for the two long clips the columns are batched against not. Real-time factor = seconds spent / seconds of audio
(below 1: faster than real time); medians over the runs.

    .venv/bin/python bench/transcription_rtf.py [--runs 3]

With ``--concurrency 1 8`` it measures throughput instead: that many clients at once upload the
"4 paragraphs" clip for ``--seconds`` (closed loop), once per ``--worker-concurrency`` value (the
worker's ``concurrency``: how many transcriptions it runs at once); audio seconds transcribed per
second of wall time, and each request's median time.

    .venv/bin/python bench/transcription_rtf.py --concurrency 1 8 --worker-concurrency 1 8 [--seconds 60]
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
# Four different paragraphs (~98 s): the same one repeated reads as a loop to whisper, whose own
# loop then decodes windows again at higher temperatures, which the batched pipeline never does.
STORY = " ".join((
    PARAGRAPH + "After lunch the design team will show the first drawings of the bridge over the river, and the "
    "engineers will explain how the steel arrives by train from the north. On Friday the whole group takes the bus "
    "to the coast, where a small hotel has rooms for everyone, and dinner is served on the terrace when the weather "
    "is kind. Remember that the library closes early on holidays, so return your books before Thursday afternoon.",
    "My grandmother grew tomatoes, beans and sunflowers in a garden behind the old stone house. Every summer the "
    "children picked cherries from the tree by the gate and sold jars of jam at the village market. In the autumn "
    "the leaves turned red and gold, and the farmer next door lent us his tractor to bring in the firewood. The "
    "winters were long and quiet; we read books by the stove while the snow piled up against the windows.",
    "The train to the capital leaves from platform four at a quarter past eight. Passengers with bicycles should use "
    "the last carriage, and tickets can be bought from the machines near the entrance or from the conductor. The "
    "journey takes about three hours, with stops in two small towns where the station cafes sell coffee and warm "
    "bread. When you arrive, take the tram from the square in front of the station to reach the museum district.",
    "Scientists measured the temperature of the lake every hour for six months. They found that the water near the "
    "surface warmed quickly in the spring, while the deep water stayed cold until late summer. The fish moved "
    "between the layers, following the food and the oxygen. The team plans to publish the results next year and to "
    "repeat the study on three other lakes in the mountains.",
))
TEXTS = {"sentence": SENTENCE, "paragraph": PARAGRAPH, "4 paragraphs": PARAGRAPH * 4, "4 different paragraphs": STORY}


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


async def throughput(url: str, key: str, wav: bytes, clients: int, seconds: float) -> tuple[int, float, float]:
    """``clients`` callers uploading ``wav`` again as soon as answered, for ``seconds`` after one warm-up
    round: (answers, their wall time, the median answer's time)."""
    times: list[float] = []
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"},
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(through_gateway(session, url, wav) for _ in range(clients)))
        start = time.perf_counter()

        async def caller() -> None:
            while time.perf_counter() - start < seconds:
                times.append(await through_gateway(session, url, wav))

        await asyncio.gather(*(caller() for _ in range(clients)))
        return len(times), time.perf_counter() - start, statistics.median(times)


def concurrent(args, weights: Path, tmp: Path) -> None:
    """The throughput table: clients at once against workers of each concurrency."""
    spec = DEFAULT_MODELS[MODEL]
    wav, audio_s = speech(TEXTS["4 paragraphs"], tmp)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; {MODEL} {spec.compute_type} on {spec.device}, beam 5; a {audio_s:.1f} s "
          f"clip, closed loop for {args.seconds:.0f} s after a warm-up round\n")
    print("| worker concurrency | clients | answers | audio s / wall s | median answer s | load average |")
    print("|---|---|---|---|---|---|")
    for workers in args.worker_concurrency:
        models = (f'[models.{MODEL}]\nkind = "transcription"\nbackend = "faster-whisper"\nsource = "{weights}"\n'
                  f'device = "{spec.device}"\ncompute_type = "{spec.compute_type}"\nconcurrency = {workers}\n')
        (run := tmp / f"workers-{workers}").mkdir()
        with gateway(models, [MODEL], tmp=run) as gw:
            for clients in args.concurrency:
                answers, wall, median = asyncio.run(throughput(f"{gw.url}/v1/audio/transcriptions", gw.key, wav,
                                                               clients, args.seconds))
                print(f"| {workers} | {clients} | {answers} | {answers * audio_s / wall:.2f} | {median:.2f} "
                      f"| {os.getloadavg()[0]:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", help="clients at once (throughput instead of RTF)")
    parser.add_argument("--worker-concurrency", type=int, nargs="+", default=[1])
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()

    spec = DEFAULT_MODELS[MODEL]
    weights = resolve(MODEL, spec, Path(Settings().cache_dir), progress=True)
    tmp = Path(tempfile.mkdtemp(prefix="tollgate-bench-"))
    if args.concurrency:
        return concurrent(args, weights, tmp)
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
