"""Idempotent JetStream provisioning: streams, durable consumers and KV buckets."""

from __future__ import annotations

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from bus.blobs import blob_stream
from bus.settings import Settings
from bus.subjects import (
    BUDGET_STATE_BUCKET,
    BUDGETS_BUCKET,
    CANCELLED_BUCKET,
    CREDIT_IDS_BUCKET,
    CREDITS_STREAM,
    DEAD_LETTER_STREAM,
    EVENTS_STREAM,
    HOLDS_CONSUMER,
    HOLDS_STREAM,
    LEDGER_CONSUMER,
    WEBHOOKS_CONSUMER,
    INFLIGHT_BUCKET,
    KEYS_BUCKET,
    RATELIMIT_STREAM,
    TENANTS_BUCKET,
    ISSUERS_BUCKET,
    LANES,
    METER_CONSUMER,
    REQUESTS_STREAM,
    USAGE_STREAM,
    PUBLISHERS_BUCKET,
    REQUEST_BLOBS_BUCKET,
    RESPONSE_CACHE_BUCKET,
    RESULT_BLOBS_BUCKET,
    WORKERS_BUCKET,
    work_consumer,
    request_subject,
)

_STREAM_EXISTS = 10058
_RECHECK = "tollgate_recheck_through"
_UPGRADE_GUARD = "meter_upgrade_guard"


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
        stream.num_replicas = config.replicas
        await js.update_stream(stream)


async def provision(js: JetStreamContext, settings: Settings) -> None:
    """Create or update every stream and bucket the gateway needs."""
    window = settings.max_deadline_s
    # Consumers are made without a replica count, so each has its stream's.
    replicas = settings.nats.replicas
    await _ensure_stream(
        js,
        StreamConfig(
            num_replicas=replicas,
            name=REQUESTS_STREAM,
            subjects=["tg.req.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            allow_msg_ttl=True,  # each request expires from the queue at its deadline
            max_age=window,
            # A replay inside the window is dropped; no deadline outlives it.
            duplicate_window=window,
            # Bounded per model and lane: a full lane refuses the publish at once (the edge
            # answers 503 queue_full with Retry-After) instead of queueing past any deadline.
            max_msgs_per_subject=settings.worker.max_queued,
            max_bytes=settings.worker.queue_max_bytes,
            discard=DiscardPolicy.NEW,
            discard_new_per_subject=True,
        ),
    )
    await _ensure_stream(
        js,
        StreamConfig(
            num_replicas=replicas,
            name=USAGE_STREAM,
            subjects=["tg.usage.>"],
            # Kept exactly until the meter has stored (and acked) it; replays come from ClickHouse.
            retention=RetentionPolicy.INTEREST,
            storage=StorageType.FILE,
            # A redelivered request republishes its usage event under the same
            # Nats-Msg-Id; redelivery stops at the deadline, so this covers it.
            duplicate_window=2 * window,
            # Full (billing far behind): publishes fail and workers retry, nothing unstored is dropped.
            max_bytes=settings.meter.usage_max_bytes,
            discard=DiscardPolicy.NEW,
        ),
    )
    # Interest retention keeps only what a consumer wants: the meter's must exist before any usage.
    await ensure_meter_consumer(js, settings)
    await _ensure_stream(
        js,
        StreamConfig(name=DEAD_LETTER_STREAM, num_replicas=replicas, subjects=["tg.dead.>"], storage=StorageType.FILE,
                     max_age=30 * 86400, max_bytes=1024**3, duplicate_window=2 * window),
    )
    liveness_ttl = 3 * settings.worker.liveness_s
    for config in (
        KeyValueConfig(replicas=replicas, bucket=WORKERS_BUCKET, history=1, ttl=liveness_ttl, limit_marker_ttl=1.0),
        KeyValueConfig(replicas=replicas, bucket=PUBLISHERS_BUCKET, history=1, ttl=liveness_ttl, limit_marker_ttl=1.0),
        KeyValueConfig(replicas=replicas, bucket=ISSUERS_BUCKET, history=1),
        KeyValueConfig(replicas=replicas, bucket=CANCELLED_BUCKET, history=1, ttl=window),
        KeyValueConfig(replicas=replicas, bucket=TENANTS_BUCKET, history=5),
        KeyValueConfig(replicas=replicas, bucket=KEYS_BUCKET, history=5),
        KeyValueConfig(replicas=replicas, bucket=INFLIGHT_BUCKET, history=1),
        KeyValueConfig(replicas=replicas, bucket=BUDGETS_BUCKET, history=5),
        KeyValueConfig(replicas=replicas, bucket=BUDGET_STATE_BUCKET, history=1),
        KeyValueConfig(replicas=replicas, bucket=CREDIT_IDS_BUCKET, history=1),  # no TTL: an id is taken for good
    ):
        await _ensure_bucket(js, config)
    # Object stores, configured as nats-py's create_object_store makes them (so `nats object`
    # reads them): an object outlives the longest deadline, so a redelivery still finds its body.
    for bucket in (REQUEST_BLOBS_BUCKET, RESULT_BLOBS_BUCKET):
        await _ensure_stream(
            js,
            StreamConfig(name=blob_stream(bucket), num_replicas=replicas, storage=StorageType.FILE,
                         subjects=[f"$O.{bucket}.C.>", f"$O.{bucket}.M.>"], max_age=window,
                         max_bytes=settings.edge.blob_store_max_bytes, discard=DiscardPolicy.NEW,
                         allow_rollup_hdrs=True, allow_direct=True),
        )
    # The response cache: a KV bucket laid out as nats-py makes them (so `nats kv` and KeyValue read
    # it), but full means the oldest answers leave (discard old): it is a cache, nothing in it is owed.
    # Each answer carries its own TTL (Nats-TTL); none outlives response_cache_max_ttl_s.
    await _ensure_stream(
        js,
        StreamConfig(name=f"KV_{RESPONSE_CACHE_BUCKET}", num_replicas=replicas, storage=StorageType.FILE,
                     subjects=[f"$KV.{RESPONSE_CACHE_BUCKET}.>"], max_msgs_per_subject=1,
                     max_age=settings.edge.response_cache_max_ttl_s, max_bytes=settings.edge.response_cache_max_bytes,
                     max_msg_size=settings.edge.response_cache_max_entry_bytes, discard=DiscardPolicy.OLD,
                     allow_msg_ttl=True, allow_rollup_hdrs=True, deny_delete=True, allow_direct=True),
    )
    await _ensure_stream(
        js,
        StreamConfig(
            num_replicas=replicas,
            name=RATELIMIT_STREAM,
            subjects=["tg.rl.>"],
            allow_msg_counter=True,  # Nats-Incr: one shared counter per scope and minute
            storage=StorageType.FILE,
            max_age=180,  # a window's counter outlives its minute, then goes
        ),
    )
    # Credit adds are retried under one message id (hold-, settle-, ledger-<id>); the
    # window covers the longest a request or a redelivered usage batch can take.
    await _ensure_stream(
        js,
        StreamConfig(
            num_replicas=replicas,
            name=CREDITS_STREAM,
            subjects=["tg.credit.>"],
            allow_msg_counter=True,
            storage=StorageType.FILE,
            max_msgs_per_subject=1,  # the last add carries the total; history lives in ClickHouse
            duplicate_window=2 * window,
        ),
    )
    # Ledger entries and alerts are kept a month for their consumers (the ledger itself is in
    # ClickHouse); hold reports leave once billing has dealt with them.
    for name, subjects, retention, max_age in (
        (EVENTS_STREAM, ["tg.event.>"], RetentionPolicy.LIMITS, 30 * 86400),
        (HOLDS_STREAM, ["tg.hold.>"], RetentionPolicy.WORK_QUEUE, None),
    ):
        await _ensure_stream(
            js,
            StreamConfig(name=name, subjects=subjects, retention=retention, storage=StorageType.FILE,
                         max_age=max_age, duplicate_window=2 * window, num_replicas=replicas,
                         # Full: a publish is refused (and retried or answered 503), nothing is dropped.
                         max_bytes=1024**3, discard=DiscardPolicy.NEW),
        )


async def ensure_work_consumers(js: JetStreamContext, settings: Settings, model: str) -> None:
    """One durable pull consumer per lane for ``model``, shared by all its workers."""
    for lane in LANES:
        await js.add_consumer(
            REQUESTS_STREAM,
            ConsumerConfig(
                # Named as well: the create request then names its filter in the subject, the one
                # form a worker's NATS user may send (infra/nats/roles.py).
                name=work_consumer(model, lane),
                durable_name=work_consumer(model, lane),
                filter_subject=request_subject(lane, model),
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=settings.worker.ack_wait_s,
                max_deliver=settings.worker.max_deliver,
                max_ack_pending=-1,
            ),
        )


async def ensure_meter_consumer(js: JetStreamContext, settings: Settings) -> int:
    """The meter's consumer: explicit acks, so an ack covers exactly the event it names.

    (An ack-all consumer let a restarted meter's first ack cover a dead meter's batch
    still waiting to be redelivered: that usage was lost.) Returns the stream position
    up to which events must be looked up before being stored, however often they were
    delivered: non-zero only after an older consumer was replaced (kept in the
    consumer's metadata, so it outlives a restart).
    """
    config = ConsumerConfig(
        durable_name=METER_CONSUMER,
        filter_subject="tg.usage.>",
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=settings.meter.ack_wait_s,
        max_ack_pending=-1,
    )
    try:
        current = await js.consumer_info(USAGE_STREAM, METER_CONSUMER)
    except nats.js.errors.NotFoundError:
        current = None
    if current is not None and current.config.ack_policy != AckPolicy.EXPLICIT:
        # An older meter acked whole batches; a consumer's ack policy cannot change, so it
        # is made anew after the last event the old one had acked. Events it had delivered
        # past that may be stored already: they are first deliveries to the new one.
        config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = current.ack_floor.stream_seq + 1
        config.metadata = {_RECHECK: str(current.delivered.stream_seq)}
        # USAGE keeps only what some consumer still wants: a guard holds the unacked events
        # while the meter's consumer is deleted and made again.
        guard = ConsumerConfig(durable_name=_UPGRADE_GUARD, filter_subject="tg.usage.>",
                               ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                               opt_start_seq=config.opt_start_seq)
        await js.add_consumer(USAGE_STREAM, guard)
        await js.delete_consumer(USAGE_STREAM, METER_CONSUMER)
        await js.add_consumer(USAGE_STREAM, config)
        await js.delete_consumer(USAGE_STREAM, _UPGRADE_GUARD)
        return int(config.metadata[_RECHECK])
    if current is not None:
        config.deliver_policy, config.opt_start_seq = current.config.deliver_policy, current.config.opt_start_seq
        config.metadata = current.config.metadata
    await js.add_consumer(USAGE_STREAM, config)
    return int((config.metadata or {}).get(_RECHECK, 0))


async def ensure_billing_consumers(js: JetStreamContext, settings: Settings) -> None:
    """The durable consumers billing reads besides usage: ledger entries, ended holds, alerts to deliver."""
    for stream, name, subject, extra in (
        (EVENTS_STREAM, LEDGER_CONSUMER, "tg.event.credit.>", {}),
        (HOLDS_STREAM, HOLDS_CONSUMER, "tg.hold.>", {}),
        (EVENTS_STREAM, WEBHOOKS_CONSUMER, "tg.event.budget.>", {"max_deliver": settings.meter.webhook_attempts}),
    ):
        await js.add_consumer(
            stream,
            ConsumerConfig(
                durable_name=name, filter_subject=subject, ack_policy=AckPolicy.EXPLICIT,
                ack_wait=settings.meter.ack_wait_s, max_ack_pending=-1, **extra,
            ),
        )
