"""Chat throughput through the whole gateway: continuous batching against one sequence at a time.

Starts a real nats-server, an edge and one smollm2-135m worker at a time: first one decoding up
to 16 sequences together (``concurrency = 16``), then one decoding a single sequence at a time
(``concurrency = 1``). For each number of concurrent streams, every stream sends ``--requests``
streamed chat requests one after another (greedy, ``max_tokens`` 64, a different question each);
generated tokens come from each stream's usage chunk.

Reports aggregate generated tokens/s, and per request the time to first token (from the send)
and the inter-token latency (the mean gap between content chunks after the first).

    .venv/bin/python bench/chat_batching.py [--streams 1 4 8 16] [--requests 2] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
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

SOURCE = "smollm2-135m"
QUESTIONS = ["Tell me about the history of Rome.", "Explain how a bicycle works.", "Describe a day at the beach.",
             "Why is the sky blue?", "How do plants grow?", "Write a short story about a robot.",
             "What makes a good friend?", "Explain what a computer does.", "Describe your favourite city.",
             "How does rain form?", "What is music?", "Give advice to a new student.",
             "Describe a forest in autumn.", "How do airplanes fly?", "What is the ocean like?",
             "Explain how bread is made."]


async def one_request(session: aiohttp.ClientSession, url: str, key: str, model: str, question: str,
                      max_tokens: int) -> tuple[float, list[float], int]:
    """Stream one chat answer; its time to first token, gaps between later chunks, and tokens generated."""
    body = {"model": model, "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    arrivals: list[float] = []
    tokens = 0
    async with session.post(url, json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
        if resp.status != 200:
            raise RuntimeError(f"status {resp.status}: {await resp.text()}")
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c["delta"].get("content") for c in chunk["choices"]):
                arrivals.append(time.perf_counter())
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return arrivals[0] - sent, gaps, tokens


async def run_streams(url: str, key: str, model: str, streams: int, requests: int, max_tokens: int) -> dict:
    """``streams`` clients, each sending ``requests`` requests in turn; aggregate and per-request figures."""
    results: list[tuple[float, list[float], int]] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def client(n: int) -> None:
            for r in range(requests):
                question = QUESTIONS[(n + r * streams) % len(QUESTIONS)]
                results.append(await one_request(session, url, key, model, question, max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(client(n) for n in range(streams)))
        elapsed = time.perf_counter() - start
    ttft = sorted(r[0] for r in results)
    itl = [statistics.mean(r[1]) for r in results if r[1]]
    return {"tokens_s": sum(r[2] for r in results) / elapsed, "ttft_p50": statistics.median(ttft),
            "ttft_max": ttft[-1], "itl_p50": statistics.median(itl) if itl else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=2, help="requests each stream sends in turn")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    weights = resolve(SOURCE, DEFAULT_MODELS[SOURCE], Path(Settings().cache_dir), progress=True)
    rows: dict[int, dict[str, dict]] = {n: {} for n in args.streams}
    for name, slots in (("batched", max(args.streams)), ("one-at-a-time", 1)):
        model = f'[models.smollm2]\nsource = "{weights}"\nconcurrency = {slots}\n'
        with gateway(model, ["smollm2"], timeout=120) as gw:
            url = f"{gw.url}/v1/chat/completions"
            asyncio.run(run_streams(url, gw.key, "smollm2", 1, 1, 8))  # warm-up, not counted
            for n in args.streams:
                rows[n][name] = asyncio.run(run_streams(url, gw.key, "smollm2", n, args.requests, args.max_tokens))
                print(f"{name} {n} streams: {rows[n][name]}", file=sys.stderr, flush=True)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}; smollm2-135m float32 on CPU, "
          f"{args.requests} requests per stream, max_tokens {args.max_tokens}, greedy\n")
    print("| streams | batched tok/s | one-at-a-time tok/s | speed-up | TTFT p50 batched / single (s) "
          "| TTFT max batched / single (s) | ITL p50 batched / single (ms) |")
    print("|---|---|---|---|---|---|---|")
    for n in args.streams:
        b, s = rows[n]["batched"], rows[n]["one-at-a-time"]
        print(f"| {n} | {b['tokens_s']:.1f} | {s['tokens_s']:.1f} | {b['tokens_s'] / s['tokens_s']:.2f}× "
              f"| {b['ttft_p50']:.2f} / {s['ttft_p50']:.2f} | {b['ttft_max']:.2f} / {s['ttft_max']:.2f} "
              f"| {b['itl_p50'] * 1000:.0f} / {s['itl_p50'] * 1000:.0f} |")


if __name__ == "__main__":
    main()
