-- Requests, tokens and cost per tenant per minute.
SELECT minute AS time, tenant, sum(requests) AS requests, sum(input_units + output_units) AS tokens,
       sum(cost_micros) / 1e6 AS credits
FROM usage_minute
WHERE minute >= $__fromTime AND minute < $__toTime
GROUP BY time, tenant
ORDER BY time
