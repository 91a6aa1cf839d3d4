"""A stand-in OTLP/HTTP collector for measuring what exporting spans costs the gateway: it takes
``POST /v1/traces`` (``application/x-protobuf``), counts the spans, and says how many on SIGINT or SIGTERM.

    .venv/bin/python bench/otlp_sink.py --port 4318 &
    TOLLGATE_TRACING_OTLP_ENDPOINT=http://127.0.0.1:4318 .venv/bin/python bench/gateway_overhead.py --rates 200
"""

from __future__ import annotations

import argparse

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest, ExportTraceServiceResponse,
)

_SPANS = web.AppKey("spans", list)


async def traces(request: web.Request) -> web.Response:
    """Count one export's spans and acknowledge it, as a collector would."""
    export = ExportTraceServiceRequest.FromString(await request.read())
    request.app[_SPANS][0] += sum(len(s.spans) for r in export.resource_spans for s in r.scope_spans)
    return web.Response(body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=4318)
    args = parser.parse_args()
    app = web.Application(client_max_size=64 * 1024**2)
    app[_SPANS] = [0]
    app.router.add_post("/v1/traces", traces)

    async def report(app: web.Application) -> None:
        print(f"otlp sink: {app[_SPANS][0]} spans received", flush=True)

    app.on_shutdown.append(report)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
