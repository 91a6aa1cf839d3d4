"""What the response cache saves, and what /v1/messages adds over /v1/chat/completions.

Starts a real nats-server, an edge process and a worker whose backend answers at once
(``bench/fixed_backend.py``), the model's answers kept by the response cache. Sequential
requests, then closed loops: a miss (greedy, a new question each time: published, run, stored),
a hit (the same greedy question: looked up, metered, replayed), and chat completions against
messages with neither kept (the model's default sampling is not cacheable).

    .venv/bin/python bench/response_cache.py [--n 2000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gateway_overhead import pct  # noqa: E402
from bench.stack import bench_key, wait_serving  # noqa: E402
from bus.settings import load_settings  # noqa: E402
from infra.children import stop_all  # noqa: E402
from infra.nats_launcher import NatsServer, free_port  # noqa: E402

MODEL = "bench-fixed"
_fresh = itertools.count()


def chat(question: str, **extra) -> tuple[str, dict]:
    return "/v1/chat/completions", {"model": MODEL, "max_tokens": 16, **extra,
                                    "messages": [{"role": "user", "content": question}]}


CASES = {
    "miss (greedy, a new question each time)": lambda: chat(f"Question {next(_fresh)}?", temperature=0),
    "hit (the same greedy question)": lambda: chat("What is the capital of France?", temperature=0),
    "/v1/chat/completions (not cacheable)": lambda: chat("What is the capital of France?"),
    "/v1/messages (not cacheable)": lambda: ("/v1/messages", chat("What is the capital of France?")[1]),
}


async def one(session: aiohttp.ClientSession, base: str, key: str, case) -> tuple[float, str]:
    path, body = case()
    t = time.perf_counter()
    async with session.post(base + path, json=body, headers={"x-api-key": key}) as resp:
        await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"status {resp.status}: {await resp.text()}")
    return (time.perf_counter() - t) * 1000, resp.headers.get("x-tollgate-cache", "-")


async def sequential(base: str, key: str, case, n: int) -> tuple[list[float], set[str]]:
    async with aiohttp.ClientSession() as session:
        for _ in range(50):  # warm the connection and the cache
            await one(session, base, key, case)
        results = [await one(session, base, key, case) for _ in range(n)]
    return [ms for ms, _ in results], {said for _, said in results}


async def closed_loop(base: str, key: str, case, concurrency: int, seconds: float) -> float:
    done = 0
    stop = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def loop():
            nonlocal done
            while time.perf_counter() < stop:
                await one(session, base, key, case)
                done += 1

        start = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="tollgate-bench-"))
    port = free_port()
    config = tmp / "tollgate.toml"
    config.write_text(f'state_dir = "{tmp / "state"}"\n[edge]\nport = {port}\n'
                      f'[models.{MODEL}]\nbackend = "fixed"\nconcurrency = 64\n[models.{MODEL}.cache]\nttl_s = 600\n')
    server = NatsServer(tmp / "nats").start()
    env = {**os.environ, "TOLLGATE_CONFIG": str(config), "TOLLGATE_NATS_URL": server.url, "PYTHONPATH": str(ROOT)}
    key = bench_key(server.url, load_settings(config, env))
    procs = [
        subprocess.Popen([sys.executable, "-m", "infra.cli", "--log-level", "WARNING", "edge"], env=env, cwd=ROOT),
        subprocess.Popen([sys.executable, "bench/fixed_backend.py", MODEL], env=env, cwd=ROOT),
    ]
    base = f"http://127.0.0.1:{port}"
    try:
        wait_serving(port, [MODEL], timeout=20)
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"Python {platform.python_version()}\n")
        print(f"| request | x-tollgate-cache | p50 | p99 | max (closed loop, {args.concurrency} in flight) |")
        print("|---|---|---|---|---|")
        for name, case in CASES.items():
            latencies, said = asyncio.run(sequential(base, key, case, args.n))
            throughput = asyncio.run(closed_loop(base, key, case, args.concurrency, args.seconds))
            print(f"| {name} | {'/'.join(sorted(said))} | {pct(latencies, 50):.2f} ms | {pct(latencies, 99):.2f} ms "
                  f"| {throughput:.0f} req/s |")
    finally:
        stop_all(procs, 20)
        server.stop()


if __name__ == "__main__":
    main()
