-- Tenants by cost, then by requests, over the dashboard's range.
SELECT tenant, sum(requests) AS requests, sum(input_units) AS input_tokens, sum(output_units) AS output_tokens,
       sum(cost_micros) / 1e6 AS credits
FROM usage_hour
WHERE hour >= toStartOfHour($__fromTime) AND hour < $__toTime
GROUP BY tenant
ORDER BY credits DESC, requests DESC
LIMIT 20
