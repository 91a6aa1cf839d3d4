"""The Grafana dashboard's queries are the named SQL files, and each runs on the real engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bus.account.tenants import Tenant
from tests.conftest import CHAT_MODEL, admin, eventually, request_id, usage_rows

GRAFANA = Path(__file__).resolve().parent.parent / "infra" / "grafana"
QUERIES = sorted((GRAFANA / "queries").glob("*.sql"))


def as_run_by_grafana(sql: str) -> str:
    """Expand the ClickHouse data source's time macros as Grafana would, for the last day."""
    return sql.replace("$__fromTime", "toDateTime(now() - INTERVAL 1 DAY)").replace("$__toTime", "toDateTime(now() + 60)")


@pytest.fixture(scope="module")
async def traffic(stack, meter, clickhouse):
    """Inside the dashboards' range: a metered request, a ledger entry and a budget alert."""
    reply = await stack.client().chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    await usage_rows(clickhouse, [request_id(reply.id)], expect=1)
    await stack.tenancy(lambda store: store.create_tenant(Tenant(id="dashboards")))
    assert (await admin(stack, "POST", "/admin/tenants/dashboards/credits", json={"amount_micros": 1_000}))[0] == 202
    assert (await admin(stack, "POST", "/admin/budgets",
                        json={"tenant": "default", "name": "dashboards", "amount_micros": 1}))[0] == 201

    async def recorded():
        [(entries,)] = await clickhouse.query("SELECT count() FROM credit_ledger WHERE tenant = 'dashboards'")
        [(alerts,)] = await clickhouse.query("SELECT count() FROM budget_alerts WHERE budget_id = 'default.dashboards'")
        return entries and alerts

    await eventually(recorded)


def test_every_panel_is_a_named_query():
    dashboard = json.loads((GRAFANA / "tollgate-usage.json").read_text())
    panels = {t["tollgateQuery"]: t["rawSql"] for p in dashboard["panels"] for t in p["targets"]}
    assert panels == {path.stem: path.read_text() for path in QUERIES}


@pytest.mark.parametrize("path", QUERIES, ids=[p.stem for p in QUERIES])
async def test_named_query_runs_on_recorded_usage(path, traffic, clickhouse):
    rows = await clickhouse.query(as_run_by_grafana(path.read_text()))
    assert rows, f"{path.stem} returned nothing over a day with traffic"
