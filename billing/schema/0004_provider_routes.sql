-- Provider workers and routes: prompt tokens an upstream's cache served, and which route (and
-- which client request) a target's attempt belonged to. A route's failed attempts are rows too.
ALTER TABLE usage_events ADD COLUMN IF NOT EXISTS cached_input_units UInt64 DEFAULT 0;
ALTER TABLE usage_events ADD COLUMN IF NOT EXISTS route LowCardinality(String) DEFAULT '';
ALTER TABLE usage_events ADD COLUMN IF NOT EXISTS route_request_id String DEFAULT '';
