-- The W3C trace id of the request (from the client's traceparent, or begun at the edge): a usage
-- row joins the traces and log lines of the request it bills.
ALTER TABLE usage_events ADD COLUMN IF NOT EXISTS trace_id String DEFAULT '';
