"""Idempotent JetStream provisioning: streams, durable consumers and KV buckets."""

from __future__ import annotations

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from bus.settings import Settings
from bus.subjects import (
    CANCELLED_BUCKET,
    INFLIGHT_BUCKET,
    KEYS_BUCKET,
    RATELIMIT_STREAM,
    TENANTS_BUCKET,
    ISSUERS_BUCKET,
    LANES,
    METER_CONSUMER,
    REQUESTS_STREAM,
    USAGE_STREAM,
    WORKERS_BUCKET,
    work_consumer,
    request_subject,
)

_STREAM_EXISTS = 10058


async def _ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    try:
        await js.add_stream(config)
    except nats.js.errors.BadRequestError as exc:
        if exc.err_code != _STREAM_EXISTS:
            raise
        await js.update_stream(config)


async def _ensure_bucket(js: JetStreamContext, config: KeyValueConfig) -> None:
    try:
        await js.create_key_value(config)
    except nats.js.errors.BadRequestError as exc:
        if exc.err_code != _STREAM_EXISTS:
            raise
        # Bucket settings follow from ours (TTLs from liveness_s, max_deadline_s): carry a change over.
        stream = (await js.stream_info(f"KV_{config.bucket}")).config
        stream.max_age = config.ttl
        stream.max_msgs_per_subject = config.history
        await js.update_stream(stream)


async def provision(js: JetStreamContext, settings: Settings) -> None:
    """Create or update every stream and bucket the gateway needs."""
    window = settings.max_deadline_s
    await _ensure_stream(
        js,
        StreamConfig(
            name=REQUESTS_STREAM,
            subjects=["tg.req.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            allow_msg_ttl=True,  # each request expires from the queue at its deadline
            max_age=window,
            # A replay inside the window is dropped; no deadline outlives it.
            duplicate_window=window,
        ),
    )
    await _ensure_stream(
        js,
        StreamConfig(
            name=USAGE_STREAM,
            subjects=["tg.usage.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            # A redelivered request republishes its usage event under the same
            # Nats-Msg-Id; redelivery stops at the deadline, so this covers it.
            duplicate_window=2 * window,
        ),
    )
    liveness_ttl = 3 * settings.worker.liveness_s
    for config in (
        KeyValueConfig(bucket=WORKERS_BUCKET, history=1, ttl=liveness_ttl, limit_marker_ttl=1.0),
        KeyValueConfig(bucket=ISSUERS_BUCKET, history=1),
        KeyValueConfig(bucket=CANCELLED_BUCKET, history=1, ttl=window),
        KeyValueConfig(bucket=TENANTS_BUCKET, history=5),
        KeyValueConfig(bucket=KEYS_BUCKET, history=5),
        KeyValueConfig(bucket=INFLIGHT_BUCKET, history=1),
    ):
        await _ensure_bucket(js, config)
    await _ensure_stream(
        js,
        StreamConfig(
            name=RATELIMIT_STREAM,
            subjects=["tg.rl.>"],
            allow_msg_counter=True,  # Nats-Incr: one shared counter per scope and minute
            storage=StorageType.FILE,
            max_age=180,  # a window's counter outlives its minute, then goes
        ),
    )


async def ensure_work_consumers(js: JetStreamContext, settings: Settings, model: str) -> None:
    """One durable pull consumer per lane for ``model``, shared by all its workers."""
    for lane in LANES:
        await js.add_consumer(
            REQUESTS_STREAM,
            ConsumerConfig(
                durable_name=work_consumer(model, lane),
                filter_subject=request_subject(lane, model),
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=settings.worker.ack_wait_s,
                max_deliver=settings.worker.max_deliver,
                max_ack_pending=-1,
            ),
        )


async def ensure_meter_consumer(js: JetStreamContext, settings: Settings) -> None:
    await js.add_consumer(
        USAGE_STREAM,
        ConsumerConfig(
            durable_name=METER_CONSUMER,
            filter_subject="tg.usage.>",
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=settings.meter.ack_wait_s,
            max_ack_pending=-1,
        ),
    )

