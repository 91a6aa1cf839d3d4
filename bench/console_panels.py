"""What the console costs: each admin route it reads, and the page in Debian's chromium until its panels are filled.

    .venv/bin/python bench/console_panels.py [--models 25] [--calls 50]

A whole gateway (nats-server, edge, billing, one worker on the benchmark's fixed backend) with
``--models`` models configured, one of them served: ``/admin/queues`` asks JetStream about every
configured model's four lanes, so its time grows with the configuration. A few hundred requests
make usage rows first, so the usage queries read something.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stack import ROOT, gateway  # noqa: E402

MODEL = "bench-fixed"
TOKEN = "tga-bench-console"
ROUTES = ("/admin/queues", "/admin/workers", "/admin/dead-letters", "/admin/tenants",
          "/admin/usage?group_by=tenant,model", "/admin/usage?group_by=hour,tenant,model")


async def requests(url: str, key: str, n: int) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http:
        async def one():
            async with http.post(url + "/v1/chat/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
        await asyncio.gather(*(one() for _ in range(n)))


async def route_times(url: str, calls: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        for route in ROUTES:
            for _ in range(calls + 3):  # the first three warm up
                began = time.perf_counter()
                async with http.get(url + route) as resp:
                    await resp.read()
                    assert resp.status == 200, (route, resp.status)
                times.setdefault(route, []).append(time.perf_counter() - began)
            times[route] = times[route][3:]
    return times


async def page_loads(url: str, loads: int) -> list[float]:
    """Seconds from opening /console with the token in sessionStorage to every panel filled."""
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--headless=new"])
        seconds = []
        for _ in range(loads + 1):  # the first warms the browser up
            context = await browser.new_context()
            await context.add_init_script(f"sessionStorage.setItem('tollgate.adminToken', '{TOKEN}')")
            page = await context.new_page()
            began = time.perf_counter()
            await page.goto(url + "/console")
            for panel in (f"#usage-table tr[data-model='{MODEL}']", f"#worker-table tr[data-model='{MODEL}'] td.live",
                          f"#queue-table tr[data-model='{MODEL}']", "#dead-total:not(:empty)", "#chart svg"):
                await page.locator(panel).first.wait_for()
            seconds.append(time.perf_counter() - began)
            await context.close()
        await browser.close()
    return seconds[1:]


def ms(values: list[float]) -> str:
    values = sorted(values)
    return f"{statistics.median(values) * 1e3:7.1f} {values[int(len(values) * 0.95) - 1] * 1e3:7.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=25, help="models configured (one served)")
    parser.add_argument("--calls", type=int, default=50, help="calls of each route")
    parser.add_argument("--loads", type=int, default=5, help="page loads")
    args = parser.parse_args()
    os.environ["TOLLGATE_EDGE_ADMIN_TOKEN"] = TOKEN
    models = f'[models.{MODEL}]\nbackend = "fixed"\nconcurrency = 64\n'
    models += "".join(f'[models.unserved-{i}]\nbackend = "fixed"\n' for i in range(args.models - 1))
    worker = [sys.executable, str(ROOT / "bench" / "fixed_backend.py")]
    with gateway(models, [MODEL], billing=True, worker_cmd=worker, timeout=60, logs=True) as gw:
        asyncio.run(requests(gw.url, gw.key, 300))
        time.sleep(2)  # billing stores the last batch
        times = asyncio.run(route_times(gw.url, args.calls))
        loads = asyncio.run(page_loads(gw.url, args.loads))
    print(f"{os.cpu_count()} cores; {args.models} models configured, 1 served; {args.calls} calls a route\n")
    print(f"{'route':45} {'p50 ms':>7} {'p95 ms':>7}")
    for route, values in times.items():
        print(f"{route:45} {ms(values)}")
    print(f"{'page: open to every panel filled':45} {ms(loads)}")


if __name__ == "__main__":
    main()
