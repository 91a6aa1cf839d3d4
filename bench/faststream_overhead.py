"""What a FastStream subscriber costs against a plain nats-py one, on a real nats-server: why the hot
paths (edge publish, worker dispatch, meter ingest) stay on nats-py while consumers off them use FastStream.

Each subscriber runs alone in a child process (uvloop, as every Tollgate process) and decodes every
message with msgspec, as Tollgate's consumers do; this process publishes to it. Three measures:

- flood: N MessagePack usage reports (~450 bytes) published as fast as they go; the subscriber's
  messages per second and CPU microseconds per message.
- steady: a fixed rate for a few seconds; the subscriber's CPU use, in percent of one core.
- request-reply: a usage-query-sized answer to each request, asked one at a time (latency) and
  32 at a time (throughput), as the edge asks billing.

Subscribers: ``nats-py`` (``nc.subscribe(cb=...)``), ``faststream`` as Tollgate builds them
(``bus.connect.broker``: ``apply_types=False``, the handler decodes the bytes) and
``faststream+pydantic`` (FastStream's default: the body is validated into the handler's
annotated pydantic model).

    .venv/bin/python bench/faststream_overhead.py [--n 50000] [--rate 2000] [--seconds 5] [--asks 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import nats
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bus.protocol import Ticket, UsageAnswer, UsageEvent, UsageQuery, UsageReport, UsageTotals  # noqa: E402
from bus.settings import NatsSettings  # noqa: E402
from infra.nats_launcher import NatsServer  # noqa: E402

KINDS = ("nats-py", "faststream", "faststream+pydantic")
FLOOD, STEADY, ASK = "bench.flood", "bench.steady", "bench.ask"
_report = msgspec.msgpack.Decoder(UsageReport).decode
_query = msgspec.msgpack.Decoder(UsageQuery).decode
ANSWER = msgspec.msgpack.encode(UsageAnswer([UsageTotals({"model": "smollm2-135m"}, 12, 340, 560, 7800)] * 4))


def report(i: int) -> bytes:
    now = time.time()
    event = UsageEvent(f"req-{i:012d}", "acme", "key-1", "smollm2-135m", "chat", "normal", now, now, now, now,
                       120, 40, "tokens", 1234, "ok", False, "worker-1")
    ticket = Ticket(event.request_id, "acme", "key-1", "edge-1", "chat", "smollm2-135m", "normal", now, now + 60, 0)
    return msgspec.msgpack.encode(UsageReport(event, ticket, "s" * 88))


# -- the subscriber child ---------------------------------------------------


class Counter:
    """Counts the messages handled; notes CPU and wall time of the first and the last."""

    def __init__(self, expect: int):
        self.expect, self.n, self.first, self.last = expect, 0, None, None
        self.done = asyncio.Event()

    def handled(self) -> None:
        self.n += 1
        if self.n == 1:
            self.first = (time.perf_counter(), time.process_time())
        if self.n == self.expect:
            self.last = (time.perf_counter(), time.process_time())
            self.done.set()


async def serve(kind: str, url: str, expect: int) -> None:
    """Subscribe to the flood, the steady stream and the asks; print one JSON line per measure."""
    flood, steady = Counter(expect), Counter(10**12)  # the steady stream is timed by CPU between two marks

    async def on_flood(data: bytes) -> None:
        _report(data)
        flood.handled()

    async def on_steady(data: bytes) -> None:
        _report(data)
        steady.handled()

    async def on_ask(data: bytes) -> bytes:
        _query(data)
        return ANSWER

    if kind == "nats-py":
        nc = await nats.connect(url)

        async def ask_cb(msg):
            await msg.respond(await on_ask(msg.data))

        for subject, handler in ((FLOOD, on_flood), (STEADY, on_steady)):
            async def cb(msg, handler=handler):
                await handler(msg.data)
            await nc.subscribe(subject, cb=cb, pending_msgs_limit=expect * 2)
        await nc.subscribe(ASK, cb=ask_cb)
        await nc.flush()
        stop = nc.close
    else:
        from bus.connect import broker

        b = broker(NatsSettings(url=url), "bench")
        if kind == "faststream+pydantic":
            from faststream.nats import NatsBroker
            from pydantic import BaseModel

            class Ask(BaseModel):  # what a FastStream user would annotate: a pydantic model of the body
                tenant: str | None = None
                group_by: list[str] = []
                limit: int = 1000

            class Event(BaseModel):
                request_id: str
                tenant: str
                cost_micros: int

            class Report(BaseModel):
                event: Event
                ticket: list
                ticket_sig: str

            b = NatsBroker(url, apply_types=True, log_level=10)
            # FastStream decodes MessagePack only through a decoder of ours; the model then validates it.
            decoder = {"decoder": lambda msg: msgspec.msgpack.decode(msg.body)}

            async def on_flood_model(body: Report) -> None:
                flood.handled()

            async def on_steady_model(body: Report) -> None:
                steady.handled()

            async def on_ask_model(body: Ask) -> bytes:
                return ANSWER

            b.subscriber(FLOOD, pending_msgs_limit=expect * 2, **decoder)(on_flood_model)
            b.subscriber(STEADY, **decoder)(on_steady_model)
            b.subscriber(ASK, **decoder)(on_ask_model)
        else:
            b.subscriber(FLOOD, pending_msgs_limit=expect * 2)(on_flood)
            b.subscriber(STEADY)(on_steady)
            b.subscriber(ASK)(on_ask)
        await b.start()
        stop = b.stop
    print(json.dumps({"ready": True}), flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().strip():
        if line == "flood":
            await asyncio.wait_for(flood.done.wait(), 300)
            (w0, c0), (w1, c1) = flood.first, flood.last
            print(json.dumps({"n": flood.n, "wall": w1 - w0, "cpu": c1 - c0}), flush=True)
        elif line == "mark":  # the steady stream: CPU and count since the last mark
            print(json.dumps({"n": steady.n, "wall": time.perf_counter(), "cpu": time.process_time()}), flush=True)
        elif line == "quit":
            break
    await stop()


# -- the publisher ------------------------------------------------------------


class Child:
    def __init__(self, kind: str, url: str, n: int):
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--url", url, "--n", str(n)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert json.loads(self.proc.stdout.readline())["ready"]

    async def say(self, line: str) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return json.loads(await asyncio.to_thread(self.proc.stdout.readline))

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait(30)


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


async def measure(kind: str, url: str, n: int, rate: int, seconds: float, asks: int) -> dict:
    child = Child(kind, url, n)
    nc = await nats.connect(url)
    try:
        payloads = [report(i) for i in range(1000)]
        for i in range(n):
            await nc.publish(FLOOD, payloads[i % 1000])
        await nc.flush()
        flood = await child.say("flood")

        before = await child.say("mark")
        start, sent = time.perf_counter(), 0
        while (elapsed := time.perf_counter() - start) < seconds:
            due = int(elapsed * rate)
            for _ in range(due - sent):
                await nc.publish(STEADY, payloads[sent % 1000])
                sent += 1
            await asyncio.sleep(0.002)
        await nc.flush()
        await asyncio.sleep(0.2)  # the last messages handled
        after = await child.say("mark")

        query = msgspec.msgpack.encode(UsageQuery(tenant="acme", group_by=["model"]))
        latencies = []
        for _ in range(asks):
            t = time.perf_counter()
            await nc.request(ASK, query, timeout=5)
            latencies.append(time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(asks // 32):
            await asyncio.gather(*(nc.request(ASK, query, timeout=5) for _ in range(32)))
        concurrent = (asks // 32 * 32) / (time.perf_counter() - t)
    finally:
        await nc.close()
        child.close()
    return {
        "kind": kind,
        "flood_msgs_per_s": flood["n"] / flood["wall"],
        "flood_cpu_us_per_msg": flood["cpu"] / flood["n"] * 1e6,
        "steady_rate": (after["n"] - before["n"]) / (after["wall"] - before["wall"]),
        "steady_cpu_pct": (after["cpu"] - before["cpu"]) / (after["wall"] - before["wall"]) * 100,
        "ask_p50_ms": pct(latencies, 50) * 1e3,
        "ask_p99_ms": pct(latencies, 99) * 1e3,
        "ask_32_per_s": concurrent,
    }


async def run(args) -> None:
    with NatsServer(Path(tempfile.mkdtemp())) as server:
        rows = [await measure(kind, server.url, args.n, args.rate, args.seconds, args.asks) for kind in KINDS]
    print(f"{'subscriber':<22}{'flood msg/s':>12}{'CPU µs/msg':>12}{'steady CPU':>12}"
          f"{'ask p50 ms':>12}{'ask p99 ms':>12}{'asks/s x32':>12}")
    for r in rows:
        print(f"{r['kind']:<22}{r['flood_msgs_per_s']:>12,.0f}{r['flood_cpu_us_per_msg']:>12.1f}"
              f"{r['steady_cpu_pct']:>11.1f}%{r['ask_p50_ms']:>12.2f}{r['ask_p99_ms']:>12.2f}{r['ask_32_per_s']:>12,.0f}")
    print(f"(flood: {args.n:,} messages; steady: {args.rate:,} msg/s for {args.seconds:g} s; asks: {args.asks:,})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--rate", type=int, default=2_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--asks", type=int, default=3_000)
    parser.add_argument("--serve", choices=KINDS, help=argparse.SUPPRESS)  # the subscriber child
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    uvloop.install()
    asyncio.run(serve(args.serve, args.url, args.n) if args.serve else run(args))


if __name__ == "__main__":
    main()
