"""The hot path: the whole stack under load, billing on, and what each process spends on it.

Starts nats-server, an edge, a worker whose backend answers at once (``bench/fixed_backend.py``) and
billing (metering into chDB), calls that backend directly for the baseline, then runs an aiohttp load
generator: open loop at each of ``--rates`` (latency from the scheduled send to the last byte, so a
generator or gateway that falls behind is charged for it: no coordinated omission), a closed loop with
``--concurrency`` requests in flight, and streams at each of ``--stream-rates`` (time to the first
token). Prints the added latency per phase and the CPU each process used in it, read from /proc.

    .venv/bin/python bench/hot_path.py [--seconds 10] [--rates 100 200 500 1000] [--stream-rates 100 500]
                                       [--concurrency 32] [--edges 1] [--quick] [--profile 500]

``--profile RATE`` adds a last phase at RATE req/s with py-spy sampling every process of the stack and
prints where each spends its CPU. Everything started is stopped on every exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import msgspec
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gateway_overhead import direct_baseline, pct  # noqa: E402
from bench.stack import gateway  # noqa: E402
from infra.children import stop_all  # noqa: E402

MODEL = "bench-fixed"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
SETTLE_S = 1.0  # after a phase's last answer, so billing's batched inserts of its usage count in the phase
TIMEOUT = aiohttp.ClientTimeout(total=60)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process, all its threads together."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Phase:
    """One load phase's outcome: latencies (ms, to the last byte or the first token), rate achieved, failures."""

    name: str
    mode: str  # open, closed or stream
    rate: float  # offered req/s (open, stream) or requests in flight (closed)
    latencies: list[float]
    achieved: float
    errors: int
    load: float  # 1-minute load average as the phase began: how busy the machine was besides
    cpu: dict[str, float]  # CPU seconds per process over the phase and its settle time
    wall: float


class Load:
    """The load generator: one aiohttp session and the request bodies, encoded once."""

    def __init__(self, session: aiohttp.ClientSession, url: str, key: str):
        self.session, self.url = session, url
        self.headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 16}
        self.bodies = {False: msgspec.json.encode(body), True: msgspec.json.encode({**body, "stream": True})}

    async def one(self, sent: float, stream: bool) -> tuple[float, float] | None:
        """One request counted from ``sent`` (perf_counter): (ms to the last byte or, streamed, to the
        first token; end time), or None if it failed."""
        try:
            async with self.session.post(self.url, data=self.bodies[stream], headers=self.headers,
                                         timeout=TIMEOUT) as resp:
                first = None
                if stream:
                    async for line in resp.content:
                        # The opening chunk carries the role and an empty content; the first token follows it.
                        if first is None and b'"content":"' in line and b'"content":""' not in line:
                            first = time.perf_counter()
                else:
                    await resp.read()
                end = time.perf_counter()
                if resp.status != 200 or (stream and first is None):
                    return None
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return None
        return ((first or end) - sent) * 1000, end

    async def open_loop(self, rate: float, seconds: float, stream: bool) -> tuple[list[float], float, int]:
        """``rate`` requests a second for ``seconds``, each sent on schedule whatever the earlier ones do."""
        n = int(rate * seconds)
        start = time.perf_counter()
        tasks = []
        for i in range(n):
            at = start + i / rate
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self.one(at, stream)))
        done = [r for r in await asyncio.gather(*tasks) if r is not None]
        last = max((end for _, end in done), default=time.perf_counter())
        return [ms for ms, _ in done], len(done) / (last - start), n - len(done)

    async def closed_loop(self, concurrency: int, seconds: float) -> tuple[list[float], float, int]:
        """``concurrency`` requests in flight for ``seconds``: the most the stack carries."""
        latencies: list[float] = []
        errors = 0
        start = time.perf_counter()
        stop = start + seconds

        async def client() -> None:
            nonlocal errors
            while time.perf_counter() < stop:
                result = await self.one(time.perf_counter(), False)
                if result is None:
                    errors += 1
                else:
                    latencies.append(result[0])

        await asyncio.gather(*(client() for _ in range(concurrency)))
        return latencies, len(latencies) / (time.perf_counter() - start), errors


async def quiet(pids: dict[str, int], limit: float = 60) -> None:
    """Wait until the stack's processes together use under a tenth of a core (an overloaded phase leaves a
    backlog the worker and billing still work through), or ``limit`` seconds."""
    deadline = time.perf_counter() + limit
    while time.perf_counter() < deadline:
        before = sum(cpu_seconds(pid) for pid in pids.values())
        await asyncio.sleep(0.5)
        if sum(cpu_seconds(pid) for pid in pids.values()) - before < 0.05:
            return


async def run_phases(url: str, key: str, plan: list[tuple[str, str, float]], seconds: float,
                     pids: dict[str, int]) -> list[Phase]:
    """Warm up, then run each (name, mode, rate) of ``plan``, reading every process's CPU around it."""
    stack, pids = pids, {**pids, "load generator": os.getpid()}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        load = Load(session, url, key)
        await load.open_loop(100, min(seconds, 3), False)  # connections opened, billing's first inserts done
        phases = []
        for name, mode, rate in plan:
            await quiet(stack)
            before = {role: cpu_seconds(pid) for role, pid in pids.items()}
            loadavg, start = os.getloadavg()[0], time.perf_counter()
            if mode == "closed":
                latencies, achieved, errors = await load.closed_loop(int(rate), seconds)
            else:
                latencies, achieved, errors = await load.open_loop(rate, seconds, mode == "stream")
            await asyncio.sleep(SETTLE_S)
            cpu = {role: cpu_seconds(pid) - before[role] for role, pid in pids.items()}
            phases.append(Phase(name, mode, rate, latencies, achieved, errors, loadavg, cpu,
                                time.perf_counter() - start))
    return phases


def print_tables(phases: list[Phase], direct: list[float], roles: list[str]) -> None:
    d50, d99 = pct(direct, 50), pct(direct, 99)
    print(f"direct backend call: p50 {d50 * 1000:.1f} µs, p99 {d99 * 1000:.1f} µs\n")
    print("| offered load | added p50 | added p99 | achieved | failed | load avg |")
    print("|---|---|---|---|---|---|")
    for p in phases:
        if p.latencies:
            added = f"+{pct(p.latencies, 50) - d50:.1f} ms | +{pct(p.latencies, 99) - d99:.1f} ms"
        else:
            added = "– | –"
        print(f"| {p.name} | {added} | {p.achieved:.0f} req/s | {p.errors} | {p.load:.2f} |")
    print("\nCPU per process over each phase: % of one core, and CPU time per answered request")
    print("| phase | " + " | ".join("worker" if r == MODEL else r for r in roles) + " | all |")
    print("|---|" + "---|" * (len(roles) + 1))
    for p in phases:
        n = max(1, len(p.latencies))
        cells = [f"{100 * p.cpu[r] / p.wall:.0f} % · {1e6 * p.cpu[r] / n:.0f} µs" for r in roles]
        total = sum(p.cpu[r] for r in roles)
        print(f"| {p.name} | " + " | ".join(cells) + f" | {100 * total / p.wall:.0f} % · {1e6 * total / n:.0f} µs |")


# Issue 16's targets: (mode, rate or None for any, what is asked, the test on a phase and its added p50/p99).
TARGETS = [
    ("open", 500, "added p50 ≤ 2 ms and p99 ≤ 10 ms", lambda p, a50, a99: a50 <= 2 and a99 <= 10),
    ("open", 1000, "sustained (every request answered, ≥ 990 req/s), p99 < 50 ms",
     lambda p, a50, a99: not p.errors and p.achieved >= 990 and a99 < 50),
    ("closed", None, "≥ 1,500 req/s", lambda p, a50, a99: p.achieved >= 1500),
    ("stream", 100, "first token added ≤ 2 ms p50 and ≤ 8 ms p99", lambda p, a50, a99: a50 <= 2 and a99 <= 8),
    ("stream", 500, "first token added ≤ 20 ms p99", lambda p, a50, a99: a99 <= 20),
    ("open", 500, "billing under 20 % of a core (its CPU per request × 500)",
     lambda p, a50, a99: p.cpu["billing"] / max(1, len(p.latencies)) * 500 < 0.2),
]


def print_targets(phases: list[Phase], direct: list[float]) -> None:
    """Each of issue 16's targets whose phase ran: met or missed."""
    d50, d99 = pct(direct, 50), pct(direct, 99)
    print("\n| target | phase | met |\n|---|---|---|")
    for mode, rate, wanted, met in TARGETS:
        for p in phases:
            if p.mode == mode and rate in (None, p.rate) and p.latencies:
                ok = met(p, pct(p.latencies, 50) - d50, pct(p.latencies, 99) - d99)
                print(f"| {wanted} | {p.name} | {'yes' if ok else '**no**'} |")


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*?)(?::\d+)?\)$")


def frame_name(frame: str) -> str:
    """``func (pkg/module.py)`` from py-spy's ``func (/long/path/pkg/module.py:123)``."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    return f"{m['func']} ({'/'.join(Path(m['file']).parts[-2:])})"


def profile_summary(raw: Path, top: int = 12) -> str:
    """Where a process's samples went, from py-spy's raw (collapsed) output: the functions most often
    running (own) and most often on the stack (total), as shares of all samples."""
    own, total, samples = Counter(), Counter(), 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [frame_name(f) for f in stack.split(";")[1:]]  # the first entry names the thread
        if not frames:
            continue
        samples += int(count)
        own[frames[-1]] += int(count)
        for f in set(frames):
            total[f] += int(count)
    if not samples:
        return "  (no samples)"
    lines = [f"  {samples} samples; own:"]
    lines += [f"    {100 * c / samples:5.1f} %  {f}" for f, c in own.most_common(top)]
    lines.append("  total (on the stack):")
    lines += [f"    {100 * c / samples:5.1f} %  {f}" for f, c in total.most_common(top * 2)
              if not f.startswith(("<module>", "run (", "_run (", "run_forever", "run_until_complete"))][:top]
    return "\n".join(lines)


async def profiled_phase(url: str, key: str, rate: float, seconds: float, pids: dict[str, int], out: Path) -> None:
    """``rate`` req/s for ``seconds`` with py-spy sampling each process; print each one's summary."""
    await quiet(pids)
    spies = {role: subprocess.Popen(
        [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid), "--duration", str(int(seconds)),
         "--rate", "100", "--nonblocking", "--format", "raw", "--output", str(out / f"{role}.txt")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for role, pid in pids.items() if role != "nats-server"}
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            await Load(session, url, key).open_loop(rate, seconds, False)
        for spy in spies.values():
            await asyncio.to_thread(spy.wait, 30)
    finally:
        stop_all(list(spies.values()), 5)
    for role in spies:
        print(f"\n{role}, {rate:.0f} req/s:")
        print(profile_summary(out / f"{role}.txt") if (out / f"{role}.txt").exists() else "  (py-spy wrote nothing)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10, help="length of each phase")
    parser.add_argument("--rates", type=float, nargs="+", default=[100, 200, 500, 1000], help="open-loop req/s")
    parser.add_argument("--stream-rates", type=float, nargs="*", default=[100, 500], help="streams a second")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight in the closed loop")
    parser.add_argument("--quick", action="store_true", help="3-second phases, for a smoke run")
    parser.add_argument("--profile", type=float, metavar="RATE", help="then profile every process at RATE req/s")
    parser.add_argument("--edges", type=int, default=1, help="edge processes sharing the port (processes.edges)")
    args = parser.parse_args()
    seconds = 3 if args.quick else args.seconds
    # A plain `kill` stops the run as Ctrl-C does, so the stack is stopped on the way out.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    uvloop.install()  # the load generator shares the cores: its loop should cost as little as the edge's

    plan = [(f"{r:,.0f} req/s", "open", r) for r in args.rates]
    plan.append((f"closed loop, {args.concurrency} in flight", "closed", args.concurrency))
    plan += [(f"streams, {r:,.0f}/s: time to first token", "stream", r) for r in args.stream_rates]
    models = f'[models.{MODEL}]\nbackend = "fixed"\nconcurrency = 64\n'
    worker = [sys.executable, str(ROOT / "bench" / "fixed_backend.py")]
    with gateway(models, [MODEL], billing=True, worker_cmd=worker, timeout=60, logs=True, edges=args.edges) as gw:
        url = f"{gw.url}/v1/chat/completions"
        print(f"the processes' logs: {gw.tmp}/*.log")
        direct = asyncio.run(direct_baseline())
        print(f"{os.cpu_count()} cores, Python {sys.version.split()[0]}, {seconds:g} s a phase; "
              f"load average {os.getloadavg()[0]:.2f} at the start\n")
        phases = asyncio.run(run_phases(url, gw.key, plan, seconds, gw.pids))
        edges = [role for role in gw.pids if role.startswith("edge")]
        print_tables(phases, direct, [*edges, MODEL, "nats-server", "billing", "load generator"])
        print_targets(phases, direct)
        if args.profile:
            asyncio.run(profiled_phase(url, gw.key, args.profile, seconds, gw.pids, gw.tmp))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
