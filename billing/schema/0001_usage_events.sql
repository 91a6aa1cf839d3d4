-- One row per request that a worker accepted (exactly one: the meter skips ids already stored).
CREATE TABLE IF NOT EXISTS usage_events
(
    request_id      String,
    tenant          LowCardinality(String),
    principal       String,
    model           LowCardinality(String),
    kind            LowCardinality(String),
    lane            LowCardinality(String),
    queued_at       DateTime64(6, 'UTC'),
    started_at      DateTime64(6, 'UTC'),
    first_token_at  Nullable(DateTime64(6, 'UTC')),
    finished_at     DateTime64(6, 'UTC'),
    input_units     UInt64,
    output_units    UInt64,
    unit            LowCardinality(String),
    cost_micros     Int64,
    status          LowCardinality(String),
    cache_hit       Bool,
    worker_id       String,
    error_code      Nullable(String),
    inserted_at     DateTime64(6, 'UTC') DEFAULT now64(6),
    INDEX request_id_bloom request_id TYPE bloom_filter GRANULARITY 4
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(queued_at)
ORDER BY (tenant, request_id);
