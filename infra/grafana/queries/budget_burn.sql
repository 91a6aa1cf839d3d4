-- Budgets that raised alerts in the range: how far each got in its period.
SELECT budget_id, tenant, period, mode,
       max(threshold) AS highest_threshold_pct,
       max(spent_micros) / 1e6 AS spent,
       any(amount_micros) / 1e6 AS budget,
       round(100 * max(spent_micros) / any(amount_micros), 1) AS burn_pct,
       max(at) AS last_alert
FROM budget_alerts FINAL
WHERE at >= $__fromTime AND at < $__toTime
GROUP BY budget_id, tenant, period, mode
ORDER BY burn_pct DESC
LIMIT 50
