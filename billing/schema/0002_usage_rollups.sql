-- Per-minute and per-hour rollups, fed by materialized views on usage_events. Exact under
-- redelivery because the meter never inserts a request twice into usage_events.
CREATE TABLE IF NOT EXISTS usage_minute
(
    minute        DateTime('UTC'),
    tenant        LowCardinality(String),
    principal     String,
    model         LowCardinality(String),
    lane          LowCardinality(String),
    status        LowCardinality(String),
    requests      UInt64,
    input_units   UInt64,
    output_units  UInt64,
    cost_micros   Int64
)
ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(minute)
ORDER BY (tenant, minute, principal, model, lane, status);

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_minute_mv TO usage_minute AS
SELECT toStartOfMinute(queued_at) AS minute, tenant, principal, model, lane, status,
       count() AS requests, sum(input_units) AS input_units, sum(output_units) AS output_units,
       sum(cost_micros) AS cost_micros
FROM usage_events
GROUP BY minute, tenant, principal, model, lane, status;

CREATE TABLE IF NOT EXISTS usage_hour
(
    hour          DateTime('UTC'),
    tenant        LowCardinality(String),
    principal     String,
    model         LowCardinality(String),
    lane          LowCardinality(String),
    status        LowCardinality(String),
    requests      UInt64,
    input_units   UInt64,
    output_units  UInt64,
    cost_micros   Int64
)
ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (tenant, hour, principal, model, lane, status);

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_hour_mv TO usage_hour AS
SELECT toStartOfHour(queued_at) AS hour, tenant, principal, model, lane, status,
       count() AS requests, sum(input_units) AS input_units, sum(output_units) AS output_units,
       sum(cost_micros) AS cost_micros
FROM usage_events
GROUP BY hour, tenant, principal, model, lane, status;
