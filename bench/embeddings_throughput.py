"""Embeddings throughput through the whole gateway: batched forward passes against one request per pass.

Starts a real nats-server, an edge and two embeddings workers on the real
all-MiniLM-L6-v2 weights: one batching (the model's default ``max_batch`` and
``batch_wait_ms``), one with ``max_batch = 1`` (every request its own forward
pass). For each, closed-loop clients (1, then 32) send requests of N inputs for
a fixed time; requests/s and inputs/s are counted from the answers.

    .venv/bin/python bench/embeddings_throughput.py [--seconds 10] [--clients 1 32] [--inputs 1 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stack import gateway  # noqa: E402
from bus.settings import DEFAULT_MODELS, Settings  # noqa: E402
from consumers.models import resolve  # noqa: E402

SOURCE = "all-minilm-l6-v2"
# The two workers under test: the model's own batching, and one forward pass per request.
MODELS = {"minilm-batched": DEFAULT_MODELS[SOURCE].max_batch, "minilm-single": 1}
SENTENCES = ["A man is eating food.", "The stock market fell today.", "Rain is expected over the weekend.",
             "She plays the violin in an orchestra.", "The train to Lyon leaves at nine."]


async def run_clients(url: str, key: str, model: str, clients: int, inputs: int, seconds: float) -> tuple[int, float]:
    """Closed loop: ``clients`` callers each send one request as soon as their last is answered."""
    done = 0
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def caller(n: int) -> None:
            nonlocal done
            i = n
            while time.perf_counter() < stop:
                body = {"model": model, "input": [f"{SENTENCES[(i + j) % len(SENTENCES)]} #{i}" for j in range(inputs)]}
                async with session.post(url, json=body, headers=headers) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"status {resp.status}: {await resp.text()}")
                    await resp.read()
                done += 1
                i += clients

        stop = time.perf_counter() + 1.0  # warm-up, not counted
        await asyncio.gather(*(caller(n) for n in range(clients)))
        done = 0
        start = time.perf_counter()
        stop = start + seconds
        await asyncio.gather(*(caller(n) for n in range(clients)))
        return done, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--inputs", type=int, nargs="+", default=[1, 8], help="inputs per request")
    args = parser.parse_args()

    weights = resolve(SOURCE, DEFAULT_MODELS[SOURCE], Path(Settings().cache_dir), progress=True)
    models = "".join(
        f'[models.{name}]\nkind = "embeddings"\nsource = "{weights}"\ndimensions = 384\nconcurrency = 64\n'
        f'max_batch = {max_batch}\n' for name, max_batch in MODELS.items())
    with gateway(models, list(MODELS), timeout=60) as gw:
        url, key = f"{gw.url}/v1/embeddings", gw.key
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"Python {platform.python_version()}; {args.seconds:.0f} s per row, closed loop")
        print(f"batched: max_batch {MODELS['minilm-batched']}, batch_wait_ms "
              f"{DEFAULT_MODELS[SOURCE].batch_wait_ms:g}; single: max_batch 1\n")
        print("| inputs/request | clients | batched req/s | batched inputs/s | single req/s | single inputs/s | speed-up |")
        print("|---|---|---|---|---|---|---|")
        for inputs in args.inputs:
            for clients in args.clients:
                rates = {}
                for model in MODELS:
                    n, elapsed = asyncio.run(run_clients(url, key, model, clients, inputs, args.seconds))
                    rates[model] = n / elapsed
                b, s = rates["minilm-batched"], rates["minilm-single"]
                print(f"| {inputs} | {clients} | {b:.1f} | {b * inputs:.1f} | {s:.1f} | {s * inputs:.1f} "
                      f"| {b / s:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
