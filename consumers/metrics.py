"""A worker's Prometheus metrics: queue wait, pull wait, run time, units and their rate, busy slots,
batch sizes, and its model's lane queues as JetStream counts them (read when scraped)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

from bus.metrics import SECONDS_BUCKETS, Collect
from bus.protocol import UsageEvent
from bus.subjects import LANES, REQUESTS_STREAM, work_consumer

if TYPE_CHECKING:
    from consumers.runtime import Worker

QUEUE_WAIT = Histogram("tollgate_worker_queue_wait_seconds", "Time from a request's publication to its run starting",
                       ["model", "lane"], buckets=SECONDS_BUCKETS)
PULL_WAIT = Histogram("tollgate_worker_pull_wait_seconds", "Time a free slot waited for its next message",
                      ["model"], buckets=SECONDS_BUCKETS)
RUN = Histogram("tollgate_worker_run_seconds", "Time a request ran on the model, by kind and how it ended",
                ["model", "kind", "status"], buckets=SECONDS_BUCKETS)
UNITS = Counter("tollgate_worker_units", "Units read and made (tokens, images, seconds, characters)",
                ["model", "unit", "direction"])
# Output units a second over each request's run: tokens per second for chat, for instance.
UNIT_RATE = Histogram("tollgate_worker_output_units_per_second", "Output units per second of each request's run",
                      ["model", "unit"], buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000, 20000))
BUSY = Gauge("tollgate_worker_busy_slots", "Requests this worker is running now", ["model"])
SLOTS = Gauge("tollgate_worker_slots", "Requests this worker may run at once", ["model"])
QUEUED = Gauge("tollgate_queue_depth", "Requests queued on a lane and not yet taken by any worker",
               ["model", "lane"])
# Requests that shared one model call (a pipeline call, a forward pass): its count is the calls made.
BATCH = Histogram("tollgate_worker_batch_requests", "Requests run together in one model call, by kind",
                  ["kind"], buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128))
PENDING = Gauge("tollgate_queue_ack_pending", "Requests taken from a lane and not yet acknowledged (running)",
                ["model", "lane"])


def pulled(model: str, waited_s: float) -> None:
    """Record that a free slot of ``model`` waited ``waited_s`` for its message."""
    PULL_WAIT.labels(model).observe(waited_s)


def batched(kind: str, requests: int) -> None:
    """Record one model call that ran ``requests`` requests of ``kind`` together."""
    BATCH.labels(kind).observe(requests)


def ran(usage: UsageEvent) -> None:
    """Record one request's run from its usage event (the worker's own account of it)."""
    QUEUE_WAIT.labels(usage.model, usage.lane).observe(max(0.0, usage.started_at - usage.queued_at))
    run_s = max(0.0, usage.finished_at - usage.started_at)
    RUN.labels(usage.model, usage.kind, usage.status).observe(run_s)
    UNITS.labels(usage.model, usage.unit, "input").inc(usage.input_units)
    UNITS.labels(usage.model, usage.unit, "output").inc(usage.output_units)
    if usage.status == "ok" and usage.output_units and run_s > 0:
        UNIT_RATE.labels(usage.model, usage.unit).observe(usage.output_units / run_s)


def collector(worker: Worker) -> Collect:
    """What a scrape reads first: busy slots, and each lane consumer's counts from JetStream (in parallel)."""
    model = worker.model

    async def collect() -> None:
        BUSY.labels(model).set(worker.busy)
        SLOTS.labels(model).set(worker.spec.concurrency)
        infos = await asyncio.gather(*(worker.js.consumer_info(REQUESTS_STREAM, work_consumer(model, lane))
                                       for lane in LANES))
        for lane, info in zip(LANES, infos):
            QUEUED.labels(model, lane).set(info.num_pending)
            PENDING.labels(model, lane).set(info.num_ack_pending)

    return collect
