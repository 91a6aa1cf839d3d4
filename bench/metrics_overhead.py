"""What Prometheus metrics cost: the edge's per-request bookkeeping, a scrape, and the OpenAPI document.

    .venv/bin/python bench/metrics_overhead.py [--requests 200000]

In process, no stack: the metrics middleware's own work around a handler that returns at once
(an aiohttp test server would measure aiohttp, not this), every series of a busy edge made
first (20 routes x 10 models x 4 lanes x 5 statuses), then the time to render that registry
for one scrape, and the time to build /openapi.json (made once per edge, then kept).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiohttp.test_utils import make_mocked_request  # noqa: E402
from prometheus_client import REGISTRY, generate_latest  # noqa: E402

from bus.settings import Settings  # noqa: E402
from edge import metrics  # noqa: E402
from edge.app import create_app  # noqa: E402
from edge.openapi import document  # noqa: E402


def fill_series() -> None:
    """Every label combination a busy edge may have, so the scrape renders a full registry."""
    for r in range(20):
        for m in range(10):
            for lane in ("critical", "high", "normal", "batch"):
                for status in ("200", "400", "404", "429", "503"):
                    metrics.REQUESTS.labels(f"/v1/route{r}", f"model-{m}", lane, status).inc()
            metrics.LATENCY.labels(f"/v1/route{r}", f"model-{m}").observe(0.1)
            metrics.FIRST_OUTPUT.labels(f"model-{m}").observe(0.05)


async def per_request(n: int) -> float:
    """Microseconds the middleware adds to one request (its handler admits and answers at once)."""
    app = create_app(Settings())
    request = make_mocked_request("POST", "/v1/chat/completions", app=app)

    async def handler(req):
        metrics.admitted("model-1", "normal")
        metrics.first_output(req, "model-1")
        return _OK

    async def bare(req):
        return _OK

    for fn in (handler, bare):  # warm both paths
        await metrics.metrics_middleware(request, fn)
    began = time.perf_counter()
    for _ in range(n):
        await metrics.metrics_middleware(request, handler)
    with_metrics = time.perf_counter() - began
    began = time.perf_counter()
    for _ in range(n):
        await bare(request)
    without = time.perf_counter() - began
    return (with_metrics - without) / n * 1e6


class _Ok:
    status = 200


_OK = _Ok()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200_000)
    args = parser.parse_args()
    fill_series()
    print(f"middleware + admission label + first-output histogram: {asyncio.run(per_request(args.requests)):.2f} us "
          "per request")
    runs = 50
    began = time.perf_counter()
    for _ in range(runs):
        body = generate_latest(REGISTRY)
    lines = body.count(b"\n")
    print(f"scrape of {lines} lines ({len(body) // 1024} KiB): "
          f"{(time.perf_counter() - began) / runs * 1000:.1f} ms")
    app = create_app(Settings())
    began = time.perf_counter()
    for _ in range(10):
        document(app)
    print(f"/openapi.json built: {(time.perf_counter() - began) / 10 * 1000:.1f} ms (once per edge; kept after)")


if __name__ == "__main__":
    main()
