"""The account domain the edge and billing share: tenants, keys and policy, prices, credits, budgets."""
