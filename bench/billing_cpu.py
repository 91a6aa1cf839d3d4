"""Billing's CPU per usage event at steady rates: the billing process on its own, usage published from here.

    .venv/bin/python bench/billing_cpu.py [--rates 150 500] [--seconds 15]

Billing runs as `tollgate billing` (every consumer: meter, ledger, holds, budgets, webhooks)
against its own nats-server and chDB; signed usage reports arrive at each rate in turn, and
its CPU time (all threads, chDB's included) is read from /proc before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import os
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

from bench.meter_ingest import event, sealed  # noqa: E402
from bus.settings import Settings  # noqa: E402
from infra.bootstrap import bootstrap  # noqa: E402
from infra.nats_launcher import NatsServer  # noqa: E402


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process, all its threads together."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def main(rates: list[float], seconds: float) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="tollgate-billing-bench-"))
    settings = msgspec.structs.replace(Settings(), state_dir=str(tmp))
    with NatsServer(tmp / "nats") as server:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        signers = await bootstrap(js, settings)
        env = {**os.environ, "TOLLGATE_STATE_DIR": str(tmp), "TOLLGATE_NATS_URL": server.url}
        billing = subprocess.Popen([sys.executable, "-m", "infra.cli", "billing"], cwd=ROOT, env=env,
                                   stdout=open(tmp / "billing.log", "w"), stderr=subprocess.STDOUT)
        try:
            await asyncio.sleep(8)  # schema applied, consumers started
            before = cpu_seconds(billing.pid)
            await asyncio.sleep(5)
            print(f"idle: {100 * (cpu_seconds(billing.pid) - before) / 5:.1f} % of a core")
            for rate in rates:
                before, start, n = cpu_seconds(billing.pid), time.perf_counter(), int(rate * seconds)
                pending = []
                for i in range(n):
                    data, headers = sealed(event("steady"), signers)
                    pending.append(asyncio.ensure_future(js.publish("tg.usage.steady", data, headers=headers)))
                    if len(pending) >= 100:
                        await asyncio.gather(*pending)
                        pending = []
                    delay = start + (i + 1) / rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await asyncio.gather(*pending)
                elapsed, used = time.perf_counter() - start, cpu_seconds(billing.pid) - before
                print(f"{rate:,.0f} events/s for {elapsed:.0f} s: billing {100 * used / elapsed:.1f} % of a core, "
                      f"{1e3 * used / n:.3f} ms CPU per event")
        finally:
            billing.terminate()
            billing.wait()
            await nc.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rates", type=float, nargs="+", default=[150, 500])
    parser.add_argument("--seconds", type=float, default=15)
    args = parser.parse_args()
    uvloop.install()
    asyncio.run(main(args.rates, args.seconds))
