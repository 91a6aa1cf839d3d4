-- p50 and p95 of total latency and of time to first token, per minute, in milliseconds.
SELECT toStartOfMinute(queued_at) AS time,
       quantile(0.5)((toUnixTimestamp64Micro(finished_at) - toUnixTimestamp64Micro(queued_at)) / 1000) AS latency_p50_ms,
       quantile(0.95)((toUnixTimestamp64Micro(finished_at) - toUnixTimestamp64Micro(queued_at)) / 1000) AS latency_p95_ms,
       quantileIf(0.5)((toUnixTimestamp64Micro(first_token_at) - toUnixTimestamp64Micro(queued_at)) / 1000,
                       first_token_at IS NOT NULL) AS ttft_p50_ms,
       quantileIf(0.95)((toUnixTimestamp64Micro(first_token_at) - toUnixTimestamp64Micro(queued_at)) / 1000,
                        first_token_at IS NOT NULL) AS ttft_p95_ms
FROM usage_events
WHERE queued_at >= $__fromTime AND queued_at < $__toTime
GROUP BY time
ORDER BY time
