"""Metering and billing consumers, the ClickHouse schema and queries."""
