-- Share of requests answered from the response cache, per minute.
SELECT toStartOfMinute(queued_at) AS time, avg(cache_hit) AS cache_hit_rate
FROM usage_events
WHERE queued_at >= $__fromTime AND queued_at < $__toTime
GROUP BY time
ORDER BY time
