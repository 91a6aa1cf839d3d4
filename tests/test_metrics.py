"""Prometheus: the edge, a worker and billing each serve /metrics, and real requests move them as they should."""

from __future__ import annotations

import json
import re
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from billing import metrics as billing_metrics
from bus.account.tenants import Limits, Tenant
from bus.metrics import serve_metrics
from bus.settings import load_settings
from infra.nats_launcher import free_port
from infra.supervisor import _children
from tests.conftest import CHAT_MODEL, UNSERVED_MODEL, eventually, fresh_minute, known_to_edge

MODEL = "all-minilm-l6-v2-metrics"  # tests/stack_models/metrics.toml: only this module sends it work
DASHBOARD = Path(__file__).resolve().parent.parent / "infra" / "grafana" / "tollgate-operations.json"
CHAT = "/v1/chat/completions"
EMBED = "/v1/embeddings"

Samples = dict[tuple[str, frozenset], float]


async def scrape(url: str) -> Samples:
    """Every sample ``url`` serves, by name and labels."""
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as resp:
            assert resp.status == 200 and resp.content_type == "text/plain"
            text = await resp.text()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def edge(stack) -> tuple[str, str]:
    """An edge of this module's own, /metrics on a port of its own: (API base URL, metrics URL)."""
    metrics_port = free_port()
    base_url = stack.edge("edge-metrics", env={"TOLLGATE_EDGE_METRICS_PORT": str(metrics_port)})
    return base_url, f"http://127.0.0.1:{metrics_port}/metrics"


@pytest.fixture(scope="module")
def worker(stack) -> str:
    """The metrics URL of the one worker serving ``MODEL``."""
    port = free_port()
    stack.serve(MODEL, env={"TOLLGATE_WORKER_METRICS_PORT": str(port)})
    return f"http://127.0.0.1:{port}/metrics"


@pytest.fixture(scope="module")
async def billing(meter) -> str:
    """The metrics URL of the session's billing (it runs in this process), served as `tollgate billing` serves it."""
    port = free_port()
    runner = await serve_metrics("127.0.0.1", port, billing_metrics.collector(meter.billing.js))
    yield f"http://127.0.0.1:{port}/metrics"
    await runner.cleanup()


async def test_edge_counts_requests_latency_and_first_token_by_route_model_lane_and_status(stack, meter, edge):
    base_url, metrics_url = edge
    client = stack.client(base_url=base_url)
    before = await scrape(metrics_url)
    await client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    stream = await client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=2, stream=True)
    async for _ in stream:
        pass
    async with aiohttp.ClientSession() as http:
        async with http.get(base_url + "/v1/no/such/route/abc123") as resp:
            assert resp.status == 404
    after = await scrape(metrics_url)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("tollgate_edge_requests_total", route=CHAT, model=CHAT_MODEL, lane="normal", status="200") == 2
    assert moved("tollgate_edge_request_seconds_count", route=CHAT, model=CHAT_MODEL) == 2
    assert moved("tollgate_edge_first_output_seconds_count", model=CHAT_MODEL) == 2
    # time to first token is within the request's whole time
    assert 0 < moved("tollgate_edge_first_output_seconds_sum", model=CHAT_MODEL) <= moved(
        "tollgate_edge_request_seconds_sum", route=CHAT, model=CHAT_MODEL)
    # a path no route matches is one bounded label, never the path itself
    assert moved("tollgate_edge_requests_total", route="unmatched", model="", lane="", status="404") == 1
    assert not any("abc123" in str(labels) for _, labels in after)
    assert value(after, "tollgate_edge_requests_in_flight", route=CHAT) == 0


async def test_edge_counts_refusals_by_reason(stack, meter, edge):
    base_url, metrics_url = edge

    async def tenant_key(tenant: Tenant) -> str:
        async def make(store):
            await store.create_tenant(tenant)
            return (await store.create_key(tenant.id, name="metrics"))[1]
        return await known_to_edge(base_url, await stack.tenancy(make))

    prepaid = await tenant_key(Tenant(id="metrics-prepaid", tier="enterprise", prepaid=True))  # no credits
    limited = await tenant_key(Tenant(id="metrics-limited", tier="enterprise", limits=Limits(rpm=1)))
    hi = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    before = await scrape(metrics_url)
    await fresh_minute()  # the limited key's two requests fall in one calendar minute
    statuses = []
    async with aiohttp.ClientSession() as http:
        for key, model in ((prepaid, CHAT_MODEL), (limited, CHAT_MODEL), (limited, CHAT_MODEL),
                           (stack.api_key, UNSERVED_MODEL)):
            async with http.post(base_url + CHAT, json={"model": model, **hi},
                                 headers={"Authorization": f"Bearer {key}"}) as resp:
                statuses.append(resp.status)
    assert statuses == [429, 200, 429, 503]
    after = await scrape(metrics_url)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert {reason: moved("tollgate_edge_refusals_total", reason=reason)
            for reason in ("credits", "rate_limit", "no_worker", "budget", "queue_full")} == {
        "credits": 1, "rate_limit": 1, "no_worker": 1, "budget": 0, "queue_full": 0}
    assert moved("tollgate_edge_requests_total", route=CHAT, model=CHAT_MODEL, lane="high", status="429") == 2  # enterprise
    assert moved("tollgate_edge_requests_total", route=CHAT, model=UNSERVED_MODEL, lane="normal", status="503") == 1


async def test_worker_reports_runs_units_and_its_lane_queues(stack, meter, clickhouse, edge, worker):
    base_url, _ = edge
    client = stack.client(base_url=base_url)
    before = await scrape(worker)
    replies = [await client.embeddings.create(model=MODEL, input=text)
               for text in ("one two three", "a somewhat longer sentence to embed")]
    tokens = sum(r.usage.prompt_tokens for r in replies)
    after = await eventually(lambda: _moved_by(worker, before, "tollgate_worker_run_seconds_count", 2,
                                               model=MODEL, kind="embeddings", status="ok"))

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("tollgate_worker_units_total", model=MODEL, unit="tokens", direction="input") == tokens
    assert moved("tollgate_worker_queue_wait_seconds_count", model=MODEL, lane="normal") == 2
    assert moved("tollgate_worker_pull_wait_seconds_count", model=MODEL) == 2
    assert value(after, "tollgate_worker_slots", model=MODEL) == 4
    assert value(after, "tollgate_worker_busy_slots", model=MODEL) == 0
    for lane in ("critical", "high", "normal", "batch"):  # read from JetStream: nothing waits, nothing runs
        assert (("tollgate_queue_depth", frozenset({"model": MODEL, "lane": lane}.items())) in after
                and value(after, "tollgate_queue_depth", model=MODEL, lane=lane) == 0)
        assert value(after, "tollgate_queue_ack_pending", model=MODEL, lane=lane) == 0


async def test_billing_reports_inserts_and_what_waits(stack, meter, clickhouse, billing):
    before = await scrape(billing)
    await stack.client().embeddings.create(model=MODEL, input="billed")
    after = await eventually(lambda: _moved_by(billing, before, "tollgate_meter_events_stored_total", 1))
    assert value(after, "tollgate_meter_batch_events_count") > value(before, "tollgate_meter_batch_events_count")
    assert value(after, "tollgate_meter_insert_seconds_count", outcome="ok") > value(
        before, "tollgate_meter_insert_seconds_count", outcome="ok")
    assert 0 <= value(after, "tollgate_meter_lag_seconds") < 60
    assert ("tollgate_meter_pending_events", frozenset()) in after  # read from JetStream at the scrape
    assert ("tollgate_meter_unacked_events", frozenset()) in after


async def _moved_by(url: str, before: Samples, name: str, at_least: float, **labels) -> Samples | None:
    after = await scrape(url)
    return after if value(after, name, **labels) - value(before, name, **labels) >= at_least else None


async def test_every_dashboard_panel_reads_metrics_the_processes_serve(edge, worker, billing):
    served = set()  # metric families, with or without samples yet (a labelled one has none until first used)
    for url in (edge[1], worker, billing):
        async with aiohttp.ClientSession() as http:
            async with http.get(url) as resp:
                served |= {family.name for family in text_string_to_metric_families(await resp.text())}
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|count|sum|total)$", "", name)
            for expr in exprs for name in re.findall(r"\btollgate_[a-z_]+", expr)}
    assert used and used <= served, f"panels read metrics nobody serves: {sorted(used - served)}"


def test_tollgate_up_gives_each_process_its_own_metrics_port(stack):
    settings = load_settings(stack.config, {"TOLLGATE_EDGE_METRICS_PORT": "9500", "TOLLGATE_WORKER_METRICS_PORT": "9600",
                                            "TOLLGATE_PROCESSES_EDGES": "2", "TOLLGATE_PROCESSES_WORKERS_PER_MODEL": "2"})
    passwords = {role: "x" for role in stack.passwords}
    children = _children(settings, {}, passwords, "admin")
    edges = [c.env["TOLLGATE_EDGE_METRICS_PORT"] for c in children if c.role == "edge"]
    workers = [c.env["TOLLGATE_WORKER_METRICS_PORT"] for c in children if c.role == "worker"]
    assert edges == ["9500", "9501"]
    assert workers == [str(9600 + n) for n in range(2 * len(settings.models))]
    assert all("TOLLGATE_WORKER_METRICS_PORT" not in c.env for c in children if c.role != "worker")
