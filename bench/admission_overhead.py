"""What authentication, rate limiting and prepaid credit holds add on the edge's hot path.

Runs the edge's own admission code in process against a real nats-server:
key lookup in the watched KV mirror, policy resolution, the shared rate
limiter (per-minute leases; optionally the cross-edge in-flight count) and,
for a prepaid tenant, the hard-budget check and the credit hold (one counter
add on JetStream). The hold's settlement happens later, in billing, untimed.

    .venv/bin/python bench/admission_overhead.py [--n 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import nats
import uvloop
from aiohttp.test_utils import make_mocked_request

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bus.account.budgets import Budget, BudgetStore  # noqa: E402
from bus.counters import add  # noqa: E402
from bus.account.credits import settle  # noqa: E402
from bus.ids import new_request_id  # noqa: E402
from bus.provision import provision  # noqa: E402
from bus.settings import Settings  # noqa: E402
from bus.subjects import INFLIGHT_BUCKET, KEYS_BUCKET, TENANTS_BUCKET, credit_counter  # noqa: E402
from bus.account.tenants import Limits, Tenant  # noqa: E402
from bus.account.tenant_store import TenancyStore, decode_key, decode_tenant  # noqa: E402
from bus.watched import WatchedBucket  # noqa: E402
from edge.auth import Authenticator  # noqa: E402
from edge.ratelimit import InFlight, RateLimiter  # noqa: E402
from edge.quota import QuotaGate  # noqa: E402
from infra.nats_launcher import NatsServer  # noqa: E402

MODEL = "smollm2-135m"
PREPAID = "prepaid: hard budget + credit hold + rpm/tpm limits"
HOLD = 5_000  # micro-credits held per request


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


async def run(n: int) -> None:
    settings = Settings()
    with NatsServer(Path(tempfile.mkdtemp())) as server:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await provision(js, settings)
        store = await TenancyStore.open(js, set(settings.tiers))
        cases = {
            "no limits (auth and policy only)": Limits(),
            "rpm + tpm limits (key and tenant)": Limits(rpm=10**9, tpm=10**12),
            "rpm + tpm + concurrency limits (key and tenant)": Limits(rpm=10**9, tpm=10**12, concurrency=10**6),
            PREPAID: Limits(rpm=10**9, tpm=10**12),
        }
        secrets = {}
        for i, (name, limits) in enumerate(cases.items()):
            await store.create_tenant(Tenant(id=f"t{i}", tier="enterprise", limits=limits, prepaid=name == PREPAID))
            _, secrets[name] = await store.create_key(f"t{i}", limits=limits)
            if name == PREPAID:
                await (await BudgetStore.open(js)).put(
                    Budget(tenant=f"t{i}", name="cap", amount_micros=10**15, mode="hard"))
                await add(js, credit_counter(f"t{i}"), 10**15)
        spending = QuotaGate(js)
        await spending.start()
        tenants = WatchedBucket(await js.key_value(TENANTS_BUCKET), decode_tenant)
        keys = WatchedBucket(await js.key_value(KEYS_BUCKET), decode_key)
        await tenants.start()
        await keys.start()
        auth = Authenticator(tenants, keys, settings.tiers, "admin")
        limiter = RateLimiter(js, InFlight(await js.key_value(INFLIGHT_BUCKET), "bench-edge"))
        print(f"{n} admissions per case, one at a time; nats-server {server.url} on this machine\n")
        print("| case | p50 | p99 | mean |\n|---|---|---|---|")
        for name, secret in secrets.items():
            request = make_mocked_request("POST", "/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"})
            times = []
            for _ in range(n):
                t = time.perf_counter()
                principal = auth.authenticate(request, "chat.completions")
                policy = principal.policy(MODEL)
                spending.check_budgets(principal.tenant.id, principal.key.id)
                admission = await limiter.admit(policy, 300)
                if policy.prepaid:
                    request_id = new_request_id()
                    await spending.hold(principal.tenant.id, request_id, HOLD, time.time() + 60)
                times.append((time.perf_counter() - t) * 1000)
                await limiter.finish(admission, 280)
                if policy.prepaid:
                    await settle(js, principal.tenant.id, request_id, HOLD, HOLD // 2)
            print(f"| {name} | {pct(times, 50):.3f} ms | {pct(times, 99):.3f} ms | {sum(times) / n:.3f} ms |")
        await spending.stop()
        await nc.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20000)
    uvloop.install()
    asyncio.run(run(parser.parse_args().n))
