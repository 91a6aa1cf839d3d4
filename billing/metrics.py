"""The billing process's Prometheus metrics: the meter's batches, inserts and lag, and the usage
waiting for it as JetStream counts it (read when scraped)."""

from __future__ import annotations

from nats.js import JetStreamContext
from prometheus_client import Counter, Gauge, Histogram

from bus.metrics import SECONDS_BUCKETS, Collect
from bus.protocol import UsageEvent
from bus.subjects import METER_CONSUMER, USAGE_STREAM

BATCH = Histogram("tollgate_meter_batch_events", "Usage events in each insert into ClickHouse",
                  buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000))
INSERT = Histogram("tollgate_meter_insert_seconds", "Time ClickHouse took for each insert of usage events",
                   ["outcome"], buckets=SECONDS_BUCKETS)
STORED = Counter("tollgate_meter_events_stored", "Usage events stored in ClickHouse")
LAG = Gauge("tollgate_meter_lag_seconds", "Age, when stored, of the oldest usage event of the last insert "
            "(from the end of its request)")
WAITING = Gauge("tollgate_meter_pending_events", "Usage events in the USAGE stream not yet delivered to the meter")
UNACKED = Gauge("tollgate_meter_unacked_events", "Usage events delivered to the meter and not yet acknowledged")


def inserted(events: list[UsageEvent], seconds: float, now: float) -> None:
    """Record one insert ClickHouse took: its size, its time, and how far behind the meter is."""
    BATCH.observe(len(events))
    INSERT.labels("ok").observe(seconds)
    STORED.inc(len(events))
    LAG.set(max(0.0, now - min(e.finished_at for e in events)))


def refused(seconds: float) -> None:
    """Record an insert ClickHouse refused."""
    INSERT.labels("refused").observe(seconds)


def collector(js: JetStreamContext) -> Collect:
    """What a scrape reads first: the meter consumer's counts from JetStream."""
    async def collect() -> None:
        info = await js.consumer_info(USAGE_STREAM, METER_CONSUMER)
        WAITING.set(info.num_pending)
        UNACKED.set(info.num_ack_pending)

    return collect
