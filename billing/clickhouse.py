"""ClickHouse through clickhouse-connect: embedded chDB (``chdb:///path``) or a server URL.

Every call runs on one dedicated thread: the driver is blocking, and chDB
wants a single owner.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, Sequence

import clickhouse_connect


class ClickHouse:
    def __init__(self, dsn: str):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse")
        self._client = self._pool.submit(clickhouse_connect.get_client, dsn=dsn).result()

    async def _call(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    async def command(self, sql: str) -> None:
        await self._call(self._client.command, sql)

    async def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple]:
        result = await self._call(self._client.query, sql, parameters=parameters)
        return result.result_rows

    async def insert(self, table: str, rows: Sequence[Sequence[Any]], columns: Sequence[str]) -> None:
        await self._call(self._client.insert, table, rows, column_names=list(columns))

    async def insert_columns(self, table: str, data: Sequence[Sequence[Any]], columns: Sequence[str]) -> None:
        """Insert data given as one sequence per column."""
        await self._call(self._client.insert, table, data, column_names=list(columns), column_oriented=True)

    def close(self) -> None:
        self._pool.submit(self._client.close).result()
        self._pool.shutdown()


def utc(ts: float | None) -> datetime | None:
    """Unix seconds as the timezone-aware datetime a DateTime64 column takes."""
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc)
