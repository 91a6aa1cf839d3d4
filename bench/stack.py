"""What every gateway benchmark sets up alike: the bus bootstrapped with a tenant no limit stops, and the wait
until the edge serves the models under test."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import nats

from bus.account.tenants import Limits, Tenant
from bus.settings import Settings
from infra.bootstrap import bootstrap

# Limits so high that a benchmark measures the gateway, never a 429.
BENCH_TENANT = Tenant(id="bench", tier="enterprise", default_lane="normal", limits=Limits(rpm=10**9, tpm=10**12))


def bench_key(nats_url: str, settings: Settings) -> str:
    """Bootstrap the bus at ``nats_url`` with ``BENCH_TENANT``; return the tenant's API key."""
    async def run() -> str:
        nc = await nats.connect(nats_url)
        try:
            return (await bootstrap(nc.jetstream(), settings, tenant=BENCH_TENANT)).api_key
        finally:
            await nc.close()

    return asyncio.run(run())


def wait_serving(port: int, models: list[str], timeout: float) -> None:
    """Return once the edge on ``port`` serves every one of ``models``, or after ``timeout`` seconds
    (the benchmark's first request then says what is wrong)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:
                if all(json.load(resp)["models"].get(m) for m in models):
                    return
        except (OSError, ValueError):  # not up yet, or a half-started edge's answer
            pass
        time.sleep(0.1)
