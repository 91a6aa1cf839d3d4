"""Text to speech through the whole gateway against Piper called directly: characters per second and time to
the first audio byte.

Starts a real nats-server, an edge and a Piper worker on the real en_US "joe" voice (the default model
``piper-en-us-joe``), then reads texts of three lengths through ``POST /v1/audio/speech`` by closed-loop
clients, timing the first audio byte and the whole answer at the client. The same texts are read in
this process by Piper's own ``PiperVoice.synthesize`` (one chunk per sentence; the first chunk is its
first audio) with no encoding. Medians over the runs; characters per second is characters read over
wall time, summed over the clients.

    .venv/bin/python bench/speech_throughput.py [--runs 5] [--formats mp3 pcm] [--clients 1 4] [--concurrency N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stack import gateway  # noqa: E402
from bus.settings import DEFAULT_MODELS, Settings  # noqa: E402
from consumers.models import resolve  # noqa: E402

MODEL = "piper-en-us-joe"
SENTENCE = "The capital of France is Paris."
PARAGRAPH = ("The capital of France is Paris. It lies on the river Seine. Millions of people visit it every year. "
             "They come for its museums, its food and its long walks along the water.")
TEXTS = {"1 sentence": SENTENCE, "4 sentences": PARAGRAPH, "16 sentences": " ".join([PARAGRAPH] * 4)}


async def through_gateway(url: str, key: str, text: str, response_format: str, clients: int,
                          runs: int) -> tuple[list[float], float]:
    """Each of ``clients`` reads ``text`` ``runs`` times, one after another: every answer's time to its first
    audio byte, and the characters read per second of wall time."""
    firsts: list[float] = []
    body = {"model": MODEL, "voice": "alloy", "input": text, "response_format": response_format}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
        async def client() -> None:
            for _ in range(runs):
                start = time.perf_counter()
                async with session.post(url, json=body) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"status {resp.status}: {await resp.text()}")
                    await resp.content.readany()
                    firsts.append(time.perf_counter() - start)
                    await resp.read()

        async with session.post(url, json=body) as resp:  # warm-up, not counted
            await resp.read()
        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return firsts, clients * runs * len(text) / (time.perf_counter() - start)


def directly(weights: str, text: str, runs: int) -> tuple[list[float], float]:
    """Piper's own ``synthesize`` in this process: each run's first chunk time, and characters per second."""
    from piper import PiperVoice

    voice = PiperVoice.load(next(Path(weights).glob("*.onnx")))
    next(iter(voice.synthesize(SENTENCE)))  # warm-up
    firsts = []
    start = time.perf_counter()
    for _ in range(runs):
        began = time.perf_counter()
        for i, _chunk in enumerate(voice.synthesize(text)):
            if i == 0:
                firsts.append(time.perf_counter() - began)
    return firsts, runs * len(text) / (time.perf_counter() - start)


def _ms(values: list[float]) -> str:
    return f"{1000 * statistics.median(values):.0f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5, help="reads of each text per client")
    parser.add_argument("--formats", nargs="+", default=["mp3", "pcm"])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--concurrency", type=int, help="the worker's (default: the model's own)")
    parser.add_argument("--texts", nargs="+", choices=list(TEXTS), default=list(TEXTS))
    args = parser.parse_args()

    spec = DEFAULT_MODELS[MODEL]
    concurrency = args.concurrency or spec.concurrency
    weights = resolve(MODEL, spec, Path(Settings().cache_dir), progress=True)
    models = (f'[models.{MODEL}]\nkind = "speech"\nbackend = "piper"\nsource = "{weights}"\n'
              f'concurrency = {concurrency}\n')
    with gateway(models, [MODEL]) as gw:
        url, key = f"{gw.url}/v1/audio/speech", gw.key
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
              f"{platform.python_version()}, load average {os.getloadavg()[0]:.1f}; worker concurrency "
              f"{concurrency}; medians of {args.runs} reads per client\n")
        print("| text | path | clients | first audio byte, ms | characters/s |")
        print("|---|---|---|---|---|")
        for label in args.texts:
            text = TEXTS[label]
            firsts, rate = directly(weights, text, args.runs)
            print(f"| {label} ({len(text)} chars) | Piper directly | 1 | {_ms(firsts)} | {rate:.0f} |", flush=True)
            for response_format in args.formats:
                for clients in args.clients:
                    firsts, rate = asyncio.run(through_gateway(url, key, text, response_format, clients, args.runs))
                    print(f"| {label} ({len(text)} chars) | gateway, {response_format} | {clients} | {_ms(firsts)} "
                          f"| {rate:.0f} |", flush=True)


if __name__ == "__main__":
    main()
