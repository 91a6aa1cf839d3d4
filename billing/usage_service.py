"""The usage query service: billing answers usage questions over NATS request-reply.

Billing owns the ClickHouse engine (embedded chDB allows one process per
path), so the edge asks here instead of opening ClickHouse itself. Queries
read the per-hour rollup.

It is a FastStream subscriber, on a connection of its own as billing's NATS user: the pattern for
internal consumers off the hot path (README, "Writing an internal service"). The hot paths (edge
publish, worker dispatch, meter ingest) stay on nats-py: BENCHMARKS.md, "FastStream against nats-py".
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone

import msgspec

from billing.clickhouse import ClickHouse
from bus.connect import broker
from bus.errors import InvalidRequest, TollgateError
from bus.protocol import USAGE_GROUPS, UsageAnswer, UsageQuery, UsageTotals
from bus.settings import NatsSettings
from bus.subjects import USAGE_QUERY_SUBJECT

log = logging.getLogger(__name__)

_decode = msgspec.msgpack.Decoder(UsageQuery).decode
_GROUP_SQL = {"hour": "toString(hour)", "day": "toString(toDate(hour))"}
_LATEST = 2**32 - 1  # ClickHouse's DateTime ends in 2106


def _time(name: str, seconds: float) -> datetime:
    if not 0 <= seconds <= _LATEST:  # also refuses nan
        raise InvalidRequest(f"{name} must be unix seconds from 0 to {_LATEST}", param=name)
    return datetime.fromtimestamp(seconds, timezone.utc)


def usage_sql(query: UsageQuery) -> tuple[str, dict]:
    """The SQL and parameters that answer ``query`` from the hourly rollup."""
    unknown = [g for g in query.group_by if g not in USAGE_GROUPS]
    if unknown:
        raise InvalidRequest(f"cannot group by {unknown[0]!r}; choose from {', '.join(USAGE_GROUPS)}", param="group_by")
    where, params = [], {}
    if query.tenant is not None:
        where.append("tenant = {tenant:String}")
        params["tenant"] = query.tenant
    if query.start is not None:
        where.append("hour >= toStartOfHour({start:DateTime})")
        params["start"] = _time("start", query.start)
    if query.end is not None:
        where.append("hour < {end:DateTime}")
        params["end"] = _time("end", query.end)
    # Aliases of their own: ClickHouse resolves an alias before a column of the same name, so
    # `toString(hour) AS hour` would turn `WHERE hour >= …` into a comparison with a string.
    aliases = [f"g_{g}" for g in query.group_by]
    groups = [f"{_GROUP_SQL.get(g, g)} AS {a}" for g, a in zip(query.group_by, aliases)]
    select = ", ".join([*groups, "sum(requests)", "sum(input_units)", "sum(output_units)", "sum(cost_micros)"])
    sql = f"SELECT {select} FROM usage_hour"
    if where:
        sql += " WHERE " + " AND ".join(where)
    if groups:
        sql += " GROUP BY " + ", ".join(aliases) + " ORDER BY sum(cost_micros) DESC, sum(requests) DESC"
    return sql + f" LIMIT {max(1, min(query.limit, 10_000))}", params


class UsageService:
    """Answers usage queries on ``tg.billing.usage``; billing processes share them (queue group ``billing``)."""

    def __init__(self, nats: NatsSettings, ch: ClickHouse):
        self.ch = ch
        self.broker = broker(nats, "tollgate-billing-usage")
        self.broker.subscriber(USAGE_QUERY_SUBJECT, queue="billing")(self.answer)

    async def start(self) -> None:
        await self.broker.start()

    async def stop(self) -> None:
        await self.broker.stop()  # drains: queries taken are answered first

    async def answer(self, data: bytes) -> bytes:
        """The encoded ``UsageAnswer`` to an encoded ``UsageQuery``: the totals, or the error saying why not."""
        try:
            query = _decode(data)
            sql, params = usage_sql(query)
            rows = await self.ch.query(sql, params)
            n = len(query.group_by)
            answer = UsageAnswer([
                UsageTotals(dict(zip(query.group_by, map(str, row[:n]))), *map(int, row[n:])) for row in rows
            ])
        except TollgateError as exc:
            answer = UsageAnswer(error=exc.info())
        except msgspec.DecodeError:
            answer = UsageAnswer(error=InvalidRequest("malformed usage query").info())
        except Exception:
            log.exception("usage query failed")
            answer = UsageAnswer(error=TollgateError("The usage query failed.").info())
        return msgspec.msgpack.encode(answer)
