-- Prepaid balances from the credit ledger: credited, spent, lapsed and left, per tenant.
SELECT tenant,
       sum(amount_micros) / 1e6 AS balance,
       sumIf(amount_micros, amount_micros > 0) / 1e6 AS credited,
       -sumIf(amount_micros, kind = 'debit') / 1e6 AS spent,
       -sumIf(amount_micros, kind = 'expire') / 1e6 AS lapsed,
       sumIf(amount_micros, kind = 'debit' AND at >= $__fromTime AND at < $__toTime) / -1e6 AS spent_in_range
FROM credit_ledger FINAL
GROUP BY tenant
ORDER BY balance ASC
LIMIT 50
