"""Images per second with the tiny random Stable Diffusion pipeline: called directly, then through the gateway.

First the diffusers pipeline is called in this process (no gateway, no PNG), then a real
nats-server, an edge and one diffusers worker serve the same pipeline and closed-loop clients
ask for images over HTTP, as ``b64_json`` and as ``url`` (each link then downloaded). Both
draw ``--size`` images in ``--steps`` denoising steps; the difference is what the gateway costs
(bus, admission, PNG encoding, base64 or the object store, metering).

    .venv/bin/python bench/images_throughput.py [--seconds 10] [--clients 1 4] [--n 1 4] [--steps 2] [--threads 1]
        [--concurrency 1 8]

``--concurrency`` runs the gateway once per value, its worker taking that many requests at once:
1 draws one request at a time, more lets concurrent requests share pipeline calls (batching).

``--threads`` sets torch's threads in both places (the worker through OMP_NUM_THREADS): on a shared,
busy machine torch's own choice (every core) spins against other processes and runs the tiny
pipeline 20x slower.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stack import gateway  # noqa: E402
from consumers.tiny_diffusion import build_tiny_diffusion  # noqa: E402

MODEL = "tiny-sd"
PROMPT = "a red fox in the snow"


def direct(path: Path, size: int, steps: int, n: int, seconds: float, threads: int | None) -> float:
    """Images per second from the pipeline itself, one call of ``n`` images after another."""
    import torch
    from diffusers import AutoPipelineForText2Image

    if threads:
        torch.set_num_threads(threads)
    pipe = AutoPipelineForText2Image.from_pretrained(str(path), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)

    def draw() -> None:
        with torch.inference_mode():
            pipe(PROMPT, width=size, height=size, num_inference_steps=steps, num_images_per_prompt=n)

    draw()  # warm-up: the first call pays for lazy imports and allocations
    made, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        draw()
        made += n
    return made / (time.perf_counter() - start)


async def through_gateway(port: int, key: str, clients: int, n: int, fmt: str, seconds: float) -> float:
    """Images per second through the edge: ``clients`` callers each asking again once answered."""
    made = 0
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": MODEL, "prompt": PROMPT, "n": n, "response_format": fmt}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def ask() -> int:
            async with session.post(f"http://127.0.0.1:{port}/v1/images/generations", json=body,
                                    headers=headers) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"status {resp.status}: {await resp.text()}")
                data = (await resp.json())["data"]
            for item in data if fmt == "url" else ():
                async with session.get(item["url"]) as image:
                    if image.status != 200:
                        raise RuntimeError(f"link status {image.status}")
                    await image.read()
            return len(data)

        async def caller() -> None:
            nonlocal made
            while time.perf_counter() < stop:
                got = await ask()
                if counting:
                    made += got

        counting, stop = False, time.perf_counter() + 2.0  # warm-up, not counted
        await asyncio.gather(*(caller() for _ in range(clients)))
        counting, start = True, time.perf_counter()
        stop = start + seconds
        await asyncio.gather(*(caller() for _ in range(clients)))
        return made / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--n", type=int, nargs="+", default=[1, 4], help="images per request")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own, every core)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1],
                        help="the worker's concurrency, one gateway each (1: no batching)")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="tollgate-bench-"))
    pipeline = build_tiny_diffusion(tmp / "tiny-sd")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}; tiny random SD pipeline, {args.size} px, {args.steps} steps, "
          f"{args.seconds:.0f} s per row, closed loop, torch threads {args.threads or 'default'}\n")
    # Measured before the stack starts, so nothing else shares the cores.
    rates = {n: direct(pipeline, args.size, args.steps, n, args.seconds, args.threads) for n in args.n}

    threads = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    print("| worker concurrency | images/request | clients | direct images/s | gateway b64_json images/s | "
          "gateway url images/s (+ download) | b64_json / direct |")
    print("|---|---|---|---|---|---|---|")
    for concurrency in args.concurrency:
        models = (f'[models."{MODEL}"]\nkind = "images"\nbackend = "diffusers"\nsource = "{pipeline}"\n'
                  f'image_steps = {{ auto = {args.steps} }}\nconcurrency = {concurrency}\n'
                  f'[models."{MODEL}".prices.image]\n"{args.size}x{args.size}" = 1000\n')
        (run := tmp / f"concurrency-{concurrency}").mkdir()
        with gateway(models, [MODEL], tmp=run, worker_env=threads) as gw:
            for n in args.n:
                for clients in args.clients:
                    b64 = asyncio.run(through_gateway(gw.port, gw.key, clients, n, "b64_json", args.seconds))
                    url = asyncio.run(through_gateway(gw.port, gw.key, clients, n, "url", args.seconds))
                    print(f"| {concurrency} | {n} | {clients} | {rates[n]:.1f} | {b64:.1f} | {url:.1f} "
                          f"| {b64 / rates[n]:.0%} |", flush=True)


if __name__ == "__main__":
    main()
