-- Share of requests that ended in an error or were cancelled, per minute.
SELECT minute AS time,
       sumIf(requests, status = 'error') / sum(requests) AS error_rate,
       sumIf(requests, status = 'cancelled') / sum(requests) AS cancelled_rate
FROM usage_minute
WHERE minute >= $__fromTime AND minute < $__toTime
GROUP BY time
ORDER BY time
