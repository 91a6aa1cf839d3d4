"""What the gateway adds to a chat request: edge + NATS + worker vs. the backend called in process.

Starts a real nats-server, an edge process and a worker process whose backend
answers at once; offers fixed loads open-loop (requests leave on schedule,
whatever the latency), then finds the maximum closed-loop throughput. Stage
timings come from the usage events the worker publishes.

    .venv/bin/python bench/gateway_overhead.py [--seconds 10] [--rates 100 200] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import nats

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fixed_backend import FixedBackend  # noqa: E402
from bus.protocol import ChatBody, ChatMessage, decode_report  # noqa: E402
from bench.stack import bench_key, wait_serving  # noqa: E402
from bus.settings import load_settings  # noqa: E402
from infra.children import stop_all  # noqa: E402
from infra.nats_launcher import NatsServer, free_port  # noqa: E402

MODEL = "bench-fixed"
KEY = ""  # minted at start-up
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16}


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


async def direct_baseline(n: int = 5000) -> list[float]:
    backend = FixedBackend()
    body = ChatBody([ChatMessage("user", "What is the capital of France?")], max_tokens=16)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        async for _item in backend.chat(body, asyncio.Event()):
            pass
        out.append((time.perf_counter() - t) * 1000)
    return out


async def one(session: aiohttp.ClientSession, url: str) -> float:
    t = time.perf_counter()
    async with session.post(url, json=BODY, headers={"Authorization": f"Bearer {KEY}"}) as resp:
        await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"status {resp.status}: {await resp.text()}")
    return (time.perf_counter() - t) * 1000


async def open_loop(url: str, rate: float, seconds: float) -> tuple[list[float], float]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(50):  # warm the connection pool
            await one(session, url)
        tasks = []
        start = time.perf_counter()
        n = int(rate * seconds)
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session, url)))
        achieved = n / (time.perf_counter() - start)
        latencies = await asyncio.gather(*tasks)
    return latencies, achieved


async def closed_loop(url: str, concurrency: int, seconds: float) -> tuple[float, list[float]]:
    latencies: list[float] = []
    stop = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def loop():
            while time.perf_counter() < stop:
                latencies.append(await one(session, url))

        start = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        return len(latencies) / (time.perf_counter() - start), latencies


async def stage_times(nats_url: str, since: float, until: float) -> dict[str, list[float]]:
    """Per-request stage durations (ms) from the USAGE stream, for requests queued in [since, until)."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    sub = await js.subscribe("tg.usage.>", ordered_consumer=True)
    queue_ms, run_ms = [], []
    try:
        while True:
            msg = await sub.next_msg(timeout=1)
            event = decode_report(msg.data).event
            if since <= event.queued_at < until:
                queue_ms.append((event.started_at - event.queued_at) * 1000)
                run_ms.append((event.finished_at - event.started_at) * 1000)
    except (nats.errors.TimeoutError, asyncio.TimeoutError):
        pass
    await nc.close()
    return {"publish→worker start": queue_ms, "worker start→usage built": run_ms}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rates", type=float, nargs="+", default=[100, 200])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--profile", action="store_true", help="cProfile the edge process")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="tollgate-bench-"))
    port = free_port()
    config = tmp / "tollgate.toml"
    config.write_text(
        f'state_dir = "{tmp / "state"}"\n[edge]\nport = {port}\n'
        f'[models.{MODEL}]\nbackend = "fixed"\nconcurrency = 64\n'
    )
    server = NatsServer(tmp / "nats").start()
    env = {**os.environ, "TOLLGATE_CONFIG": str(config), "TOLLGATE_NATS_URL": server.url, "PYTHONPATH": str(ROOT)}
    global KEY
    KEY = bench_key(server.url, load_settings(config, env))
    edge_cmd = [sys.executable, "-m", "infra.cli", "--log-level", "WARNING", "edge"]
    if args.profile:
        edge_cmd[1:1] = ["-m", "cProfile", "-o", str(tmp / "edge.prof")]
    procs = [
        subprocess.Popen(edge_cmd, env=env, cwd=ROOT),
        subprocess.Popen([sys.executable, "bench/fixed_backend.py", MODEL], env=env, cwd=ROOT),
    ]
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        wait_serving(port, [MODEL], timeout=20)
        direct = asyncio.run(direct_baseline())
        d50, d99 = pct(direct, 50), pct(direct, 99)
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
        print(f"direct backend call: p50 {d50 * 1000:.1f} µs, p99 {d99 * 1000:.1f} µs\n")
        print("| offered load | achieved | p50 total | p99 total | p50 added | p99 added |")
        print("|---|---|---|---|---|---|")
        since = time.time()
        for rate in args.rates:
            lat, achieved = asyncio.run(open_loop(url, rate, args.seconds))
            p50, p99 = pct(lat, 50), pct(lat, 99)
            print(f"| {rate:.0f} req/s | {achieved:.0f} req/s | {p50:.2f} ms | {p99:.2f} ms "
                  f"| {p50 - d50:.2f} ms | {p99 - d99:.2f} ms |")
        until = time.time()
        throughput, lat = asyncio.run(closed_loop(url, args.concurrency, args.seconds))
        print(f"| max (closed loop, {args.concurrency} in flight) | {throughput:.0f} req/s "
              f"| {pct(lat, 50):.2f} ms | {pct(lat, 99):.2f} ms | | |")
        stages = asyncio.run(stage_times(server.url, since, until))
        print("\nstages of the fixed-load requests, from the worker's usage events:")
        print("\n| stage | p50 | p99 |\n|---|---|---|")
        for name, values in stages.items():
            if values:
                print(f"| {name} | {pct(values, 50):.2f} ms | {pct(values, 99):.2f} ms |")
    finally:
        stop_all(procs, 20)
        server.stop()
    if args.profile:
        print("\nedge process, top functions by own time:")
        pstats.Stats(str(tmp / "edge.prof")).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
