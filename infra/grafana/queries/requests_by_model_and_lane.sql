-- Requests per model and lane per minute.
SELECT minute AS time, concat(model, ' / ', lane) AS series, sum(requests) AS requests
FROM usage_minute
WHERE minute >= $__fromTime AND minute < $__toTime
GROUP BY time, series
ORDER BY time
