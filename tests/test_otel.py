"""OpenTelemetry: one request's spans reach an OTLP/HTTP collector from the edge, the worker and billing,
all in the client's trace, each with its parent.

The collector is a test double speaking the real wire format: an aiohttp server taking
``POST /v1/traces`` as ``application/x-protobuf`` and decoding it as opentelemetry-proto's
``ExportTraceServiceRequest``.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest, ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from bus import tracing
from bus.settings import SettingsError, TracingSettings, load_settings
from infra.nats_launcher import free_port
from tests.conftest import eventually

MODEL = "smollm2-135m-traced"  # tests/stack_models/otel.toml: only this module's traced worker serves it
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_PARENT = "b7ad6b7169203331"
CHAT = "/v1/chat/completions"


class Collector:
    """The spans an OTLP/HTTP exporter sent, flattened: service, name, ids, kind, times, attributes, events."""

    def __init__(self):
        self.spans: list[dict] = []
        self.url = ""

    async def traces(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        export = ExportTraceServiceRequest.FromString(await request.read())
        for resource_spans in export.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append({
                        "service": resource["service.name"], "name": span.name, "kind": span.kind,
                        "trace": span.trace_id.hex(), "id": span.span_id.hex(), "parent": span.parent_span_id.hex(),
                        "start": span.start_time_unix_nano, "end": span.end_time_unix_nano,
                        "attributes": {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes},
                        "events": [e.name for e in span.events], "error": span.status.code == 2,
                    })
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf")

    def of(self, trace: str) -> list[dict]:
        return [s for s in self.spans if s["trace"] == trace]


@pytest.fixture(scope="module")
async def collector():
    found = Collector()
    app = web.Application()
    app.router.add_post("/v1/traces", found.traces)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    found.url = f"http://127.0.0.1:{port}"
    yield found
    await runner.cleanup()


@pytest.fixture(scope="module")
def traced_edge(stack, collector) -> str:
    """An edge and a worker for ``MODEL``, both exporting spans to the collector: the edge's base URL."""
    spans_on = {"TOLLGATE_TRACING_OTLP_ENDPOINT": collector.url, "TOLLGATE_TRACING_EXPORT_INTERVAL_S": "0.2"}
    stack.serve(MODEL, env=spans_on)
    return stack.edge("edge-otel", MODEL, env=spans_on)


@pytest.fixture(scope="module")
async def traced_billing(meter, collector):
    """The session's billing runs in this process: its spans go to the collector while this module runs."""
    tracing.install(TracingSettings(otlp_endpoint=collector.url, export_interval_s=0.2), "billing")
    yield meter
    await asyncio.to_thread(tracing.uninstall)  # exports to the collector on this loop: never block it


async def test_a_requests_spans_from_edge_worker_and_billing_share_the_clients_trace(
        stack, traced_edge, traced_billing, collector):
    async with aiohttp.ClientSession() as http:
        async with http.post(traced_edge + CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                                       "max_tokens": 3, "stream": True},
                             headers={"Authorization": f"Bearer {stack.api_key}",
                                      "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"}) as resp:
            assert resp.status == 200
            request_id = resp.headers["x-request-id"]
            await resp.read()
    expected = {("tollgate-edge", f"POST {CHAT}"), ("tollgate-edge", "tollgate.admit"),
                ("tollgate-edge", "tollgate.publish"), ("tollgate-edge", "tollgate.relay"),
                ("tollgate-worker", "tollgate.queue_wait"), ("tollgate-worker", "tollgate.run"),
                ("tollgate-billing", "tollgate.store")}

    async def all_arrived():
        return expected <= {(s["service"], s["name"]) for s in collector.of(CLIENT_TRACE)}

    await eventually(all_arrived, timeout=20)
    spans = {s["name"]: s for s in collector.of(CLIENT_TRACE)}
    assert len(collector.of(CLIENT_TRACE)) == len(expected)  # one of each
    server = spans[f"POST {CHAT}"]
    # the client's span is the edge's parent; everything else hangs off the edge's server span
    assert server["parent"] == CLIENT_PARENT and server["kind"] == Span.SPAN_KIND_SERVER
    assert server["attributes"]["http.response.status_code"] == 200
    assert server["attributes"]["http.route"] == CHAT
    for name, span in spans.items():
        if span is not server:
            assert span["parent"] == server["id"], name
            assert server["start"] <= span["start"] <= span["end"], name
    for name in ("tollgate.publish", "tollgate.relay", "tollgate.queue_wait", "tollgate.run"):
        assert spans[name]["attributes"]["tollgate.request_id"] == request_id
        assert spans[name]["attributes"]["tollgate.model"] == MODEL
    # queued from the moment the edge began publishing until the worker pulled it, then run
    assert spans["tollgate.queue_wait"]["start"] == spans["tollgate.publish"]["start"]
    assert spans["tollgate.queue_wait"]["end"] <= spans["tollgate.run"]["start"]
    assert spans["tollgate.publish"]["kind"] == Span.SPAN_KIND_PRODUCER
    assert spans["tollgate.run"]["kind"] == Span.SPAN_KIND_CONSUMER
    assert spans["tollgate.run"]["attributes"]["tollgate.status"] == "ok"
    assert spans["tollgate.relay"]["events"] == ["first frame"]
    assert spans["tollgate.store"]["attributes"]["tollgate.batch_size"] >= 1
    assert not any(span["error"] for span in spans.values())


async def test_without_a_traceparent_the_edge_begins_a_trace_and_a_refusal_is_no_server_error(
        stack, traced_edge, collector):
    known = {s["trace"] for s in collector.spans}
    async with aiohttp.ClientSession() as http:
        async with http.post(traced_edge + CHAT, json={"model": MODEL, "messages": [], "max_tokens": 1},
                             headers={"Authorization": f"Bearer {stack.api_key}"}) as resp:
            assert resp.status == 400  # no messages: refused by the edge, never run

    async def new_server_span():
        return [s for s in collector.spans if s["trace"] not in known and s["name"] == f"POST {CHAT}"]

    [span] = await eventually(new_server_span, timeout=10)
    assert span["parent"] == ""  # a root: the trace began at the edge
    assert span["attributes"]["http.response.status_code"] == 400
    assert not span["error"]  # the client's mistake, not the server's


def test_the_collector_is_an_http_url(tmp_path):
    config = tmp_path / "tollgate.toml"
    config.write_text('[tracing]\notlp_endpoint = "http://collector:4318"\nsample_ratio = 0.25\n')
    settings = load_settings(config, {})
    assert settings.tracing.otlp_endpoint == "http://collector:4318" and settings.tracing.sample_ratio == 0.25
    assert tracing.traces_url(settings.tracing.otlp_endpoint) == "http://collector:4318/v1/traces"
    assert tracing.traces_url("http://collector:4318/v1/traces") == "http://collector:4318/v1/traces"
    with pytest.raises(SettingsError, match="otlp_endpoint"):
        load_settings(config, {"TOLLGATE_TRACING_OTLP_ENDPOINT": "collector:4317"})
    with pytest.raises(SettingsError, match="sample_ratio"):
        load_settings(config, {"TOLLGATE_TRACING_SAMPLE_RATIO": "2"})
