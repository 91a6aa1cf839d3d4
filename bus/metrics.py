"""Prometheus exposition shared by every process: one ``/metrics`` listener per process, on a port of its own.

Each role defines its metrics in its own module (``edge.metrics``, ``consumers.metrics``,
``billing.metrics``) in the process's default registry. Counters and histograms move on the
hot path (cheap, in memory); gauges read from JetStream are refreshed when Prometheus scrapes,
under a timeout, so a slow bus delays one scrape, never a request.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

log = logging.getLogger(__name__)

# Request latencies, run times and waits, in seconds: 5 ms to 5 minutes.
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# How long a scrape waits for what it reads from JetStream before it answers with what it has.
COLLECT_TIMEOUT_S = 2.0

Collect = Callable[[], Awaitable[None]]


async def serve_metrics(host: str, port: int, collect: Collect | None = None) -> web.AppRunner | None:
    """Serve ``GET /metrics`` on ``host:port`` in this event loop; None when ``port`` is 0 (off).

    ``collect`` refreshes the gauges read from the bus before each scrape. A port already
    taken is logged, not raised: metrics never stop a process from serving.
    """
    if not port:
        return None

    async def metrics(_request: web.Request) -> web.Response:
        if collect is not None:
            try:
                await asyncio.wait_for(collect(), COLLECT_TIMEOUT_S)
            except Exception as exc:  # the bus is slow or away: the scrape still answers, those gauges stale
                log.warning("metrics: reading JetStream state failed (%r); serving the last values", exc)
        # Rendering a large registry takes a busy edge's loop for a while (BENCHMARKS.md): a thread does it.
        body = await asyncio.to_thread(generate_latest, REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        log.error("metrics: cannot listen on %s:%s (%s); this process serves without /metrics", host, port, exc)
        await runner.cleanup()
        return None
    log.info("metrics on http://%s:%s/metrics", host, port)
    return runner
