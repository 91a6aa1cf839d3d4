-- Prepaid credits: every change to a balance, and the alerts budgets raised.
ALTER TABLE usage_events ADD COLUMN IF NOT EXISTS hold_micros Int64 DEFAULT 0;

-- Grants, top-ups, refunds and expiries arrive as ledger entries on tg.event.credit.<tenant>;
-- debits come from prepaid usage events (the view below). A balance is sum(amount_micros).
CREATE TABLE IF NOT EXISTS credit_ledger
(
    id             String,
    tenant         LowCardinality(String),
    kind           LowCardinality(String),
    amount_micros  Int64,
    at             DateTime64(6, 'UTC'),
    expires_at     Nullable(DateTime64(6, 'UTC')),
    grant_id       Nullable(String),
    request_id     Nullable(String),
    note           String DEFAULT ''
)
ENGINE = ReplacingMergeTree
ORDER BY (tenant, id);

-- Exactly one debit per prepaid request: usage_events never holds a request twice. A debit is
-- dated when its credits were held (the request was queued): a grant live then pays for it.
CREATE MATERIALIZED VIEW IF NOT EXISTS credit_debits_mv TO credit_ledger AS
SELECT concat('debit-', request_id) AS id, tenant, 'debit' AS kind, -cost_micros AS amount_micros,
       queued_at AS at, CAST(NULL, 'Nullable(DateTime64(6, \'UTC\'))') AS expires_at,
       CAST(NULL, 'Nullable(String)') AS grant_id, request_id, '' AS note
FROM usage_events
WHERE hold_micros > 0;

CREATE TABLE IF NOT EXISTS budget_alerts
(
    id             String,
    budget_id      String,
    tenant         LowCardinality(String),
    key            Nullable(String),
    threshold      UInt8,
    period         String,
    spent_micros   Int64,
    amount_micros  Int64,
    mode           LowCardinality(String),
    at             DateTime64(6, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY (tenant, id);
