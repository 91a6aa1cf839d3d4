"""What Tollgate adds in front of an upstream: a local OpenAI-compatible server that answers at once,
called directly and through the gateway (edge + NATS + provider worker, billing running), with the
same load generator (bench/gateway_overhead.py): open loop at fixed rates, then closed loop, not
streamed and streamed (20 chunks). CPU per request is the gateway's processes' CPU time (edge,
worker, billing, nats-server) over the requests of a run.

    .venv/bin/python bench/provider_overhead.py [--seconds 5] [--rates 100 200 500 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import gateway_overhead as load  # noqa: E402
from bench.stack import bench_key, wait_serving  # noqa: E402
from bus.settings import load_settings  # noqa: E402
from infra.children import stop_all  # noqa: E402
from infra.nats_launcher import NatsServer, free_port  # noqa: E402

MODEL = "bench-provider"
CHUNKS = 20


def upstream_app() -> web.Application:
    """An OpenAI-compatible chat server that answers at once: 20 words, whole or as 20 chunks."""
    words = [f"w{i} " for i in range(CHUNKS)]
    usage = {"prompt_tokens": 12, "completion_tokens": CHUNKS, "total_tokens": 12 + CHUNKS}

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        base = {"id": "c", "created": 1, "model": body["model"]}
        if not body.get("stream"):
            return web.json_response({**base, "object": "chat.completion", "usage": usage, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "".join(words)}, "finish_reason": "stop"}]})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk = {**base, "object": "chat.completion.chunk"}
        events = [{**chunk, "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]} for w in words]
        events.append({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append({**chunk, "choices": [], "usage": usage})
        await response.write(b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
                             + b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


REFUSED: list[int] = []  # statuses other than 200 (0: the connection reset), counted instead of stopping the run


async def one(session: aiohttp.ClientSession, url: str) -> float:
    """``gateway_overhead.one``, but a refusal past saturation (a full queue, a full accept backlog) is
    counted, not raised."""
    t = time.perf_counter()
    try:
        async with session.post(url, json=load.BODY, headers={"Authorization": f"Bearer {load.KEY}"}) as resp:
            await resp.read()
            if resp.status != 200:
                REFUSED.append(resp.status)
    except aiohttp.ClientError:
        REFUSED.append(0)
    return (time.perf_counter() - t) * 1000


load.one = one  # the same open- and closed-loop generators, with this request


def wait_listening(port: int, timeout: float = 20) -> None:
    """Return once something accepts connections on ``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port}")


def cpu_seconds(pids: list[int]) -> list[float]:
    """User + system CPU time each of the processes ``pids`` has used so far."""
    times = []
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        times.append((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))  # utime, stime
    return times


def run(url: str, rates: list[float], seconds: float, concurrency: int, pids: list[int]) -> dict:
    """p50/p99 (ms) at each rate, then closed-loop throughput; with the CPU ``pids`` used per request."""
    out = {}
    for rate in rates:
        before, REFUSED[:] = cpu_seconds(pids), []
        latencies, achieved = asyncio.run(load.open_loop(url, rate, seconds))
        # ms a request, in all and in each process (edge, worker, billing, nats-server)
        cpu = [(after - b) / (len(latencies) + 50) * 1000 for after, b in zip(cpu_seconds(pids), before)]
        out[rate] = (achieved, load.pct(latencies, 50), load.pct(latencies, 99), cpu, len(REFUSED))
        time.sleep(2)  # let a saturated stack drain before the next rate
    REFUSED[:] = []
    throughput, latencies = asyncio.run(load.closed_loop(url, concurrency, seconds))
    out["max"] = (throughput, load.pct(latencies, 50), load.pct(latencies, 99), [], len(REFUSED))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rates", type=float, nargs="+", default=[100, 200, 500, 1000])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)  # run as the upstream on this port
    args = parser.parse_args()
    if args.upstream:
        web.run_app(upstream_app(), host="127.0.0.1", port=args.upstream, access_log=None, print=None)
        return

    tmp = Path(tempfile.mkdtemp(prefix="tollgate-bench-"))
    port, upstream_port = free_port(), free_port()
    config = tmp / "tollgate.toml"
    config.write_text(
        f'state_dir = "{tmp / "state"}"\n[edge]\nport = {port}\n'
        f'[providers.local]\napi = "openai"\nbase_url = "http://127.0.0.1:{upstream_port}/v1"\n'
        f'[models.{MODEL}]\nprovider = "local"\n[models.{MODEL}.prices]\ninput_token = 1\noutput_token = 2\n'
    )
    server = NatsServer(tmp / "nats").start()
    env = {**os.environ, "TOLLGATE_CONFIG": str(config), "TOLLGATE_NATS_URL": server.url, "PYTHONPATH": str(ROOT)}
    load.KEY = bench_key(server.url, load_settings(config, env))
    cli = [sys.executable, "-m", "infra.cli", "--log-level", "WARNING"]
    procs = [subprocess.Popen([sys.executable, __file__, "--upstream", str(upstream_port)], cwd=ROOT)]
    gateway = [subprocess.Popen(cli + role, env=env, cwd=ROOT) for role in
               (["edge"], ["worker", "--model", MODEL], ["billing"])]
    procs += gateway
    pids = [p.pid for p in gateway] + [server.pid]
    try:
        wait_listening(upstream_port)
        wait_serving(port, [MODEL], timeout=30)
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"Python {platform.python_version()}; {args.seconds:g} s a rate\n")
        for stream in (False, True):
            load.BODY = {"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}],
                         "max_tokens": 32, "stream": stream}
            direct = run(f"http://127.0.0.1:{upstream_port}/v1/chat/completions", args.rates, args.seconds,
                         args.concurrency, [procs[0].pid])
            through = run(f"http://127.0.0.1:{port}/v1/chat/completions", args.rates, args.seconds,
                          args.concurrency, pids)
            print(f"{'streamed (20 chunks)' if stream else 'not streamed'}:\n")
            print("| offered | direct p50 / p99 | Tollgate p50 / p99 | added p50 / p99 | refused "
                  "| gateway CPU / request (edge + worker + billing + nats) |")
            print("|---|---|---|---|---|---|")
            for rate in args.rates:
                _, d50, d99, _, _ = direct[rate]
                _, t50, t99, cpu, refused = through[rate]
                print(f"| {rate:.0f} req/s | {d50:.2f} / {d99:.2f} ms | {t50:.2f} / {t99:.2f} ms "
                      f"| {t50 - d50:.2f} / {t99 - d99:.2f} ms | {refused} | {sum(cpu):.2f} ms "
                      f"({' + '.join(f'{c:.2f}' for c in cpu)}) |")
            (d_max, d50, d99, _, _), (t_max, t50, t99, _, refused) = direct["max"], through["max"]
            print(f"| closed loop, {args.concurrency} in flight | {d_max:.0f} req/s: {d50:.2f} / {d99:.2f} ms "
                  f"| {t_max:.0f} req/s: {t50:.2f} / {t99:.2f} ms | {t50 - d50:.2f} / {t99 - d99:.2f} ms "
                  f"| {refused} | |\n")
    finally:
        stop_all(procs, 20)
        server.stop()


if __name__ == "__main__":
    main()
