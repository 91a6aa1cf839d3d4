"""What spans cost one request, in process: the tracing calls a request makes on the edge, the worker
and billing, timed with spans off (the hot path's price of having them) and on (made, sampled and
exported over OTLP/HTTP by the BatchSpanProcessor's thread to ``bench/otlp_sink.py``, whose CPU is not
counted: a collector runs elsewhere). CPU time of the whole process, export thread included.

    .venv/bin/python bench/tracing_overhead.py [--n 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bus import tracing  # noqa: E402
from bus.protocol import ChatBody, ChatMessage, Envelope, UsageEvent  # noqa: E402
from bus.settings import TracingSettings  # noqa: E402
from infra.nats_launcher import free_port  # noqa: E402

# The client's traceparent, sampled; none when sampling by ratio (a client's flag would decide instead).
CLIENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
_NOW = time.time()
USAGE = UsageEvent(request_id="r", tenant="t", principal="k", model="m", kind="chat", lane="normal", queued_at=_NOW,
                   started_at=_NOW, first_token_at=_NOW, finished_at=_NOW, input_units=9, output_units=2, unit="tokens",
                   cost_micros=13, status="ok", cache_hit=False, worker_id="w")


async def _frames():
    for frame in ("Paris", "."):
        yield frame


@tracing.traced("tollgate.admit")
async def _admit() -> None:
    pass


async def _edge(envelope: Envelope) -> dict[str, str]:
    await _admit()
    carried = tracing.carrier()
    tracing.record("tollgate.publish", envelope.created, kind="producer", envelope=envelope)
    async for _ in tracing.relayed(_frames(), envelope):
        pass
    return carried


async def one_request(envelope: Envelope, client: str) -> None:
    """The tracing calls of one request, in the order the edge, the worker and the meter make them."""
    if tracing.enabled():  # the edge's middleware: a server span, or (off) the traceparent alone
        with tracing.span("POST /v1/chat/completions", parent=client, kind="server",
                          attributes={"http.request.method": "POST", "http.route": "/v1/chat/completions"}):
            carried = await _edge(envelope)
    else:
        token = tracing.CURRENT.set(tracing.continued(client))
        carried = await _edge(envelope)
        tracing.CURRENT.reset(token)
    # the worker, under the envelope's traceparent
    token = tracing.CURRENT.set(carried[tracing.HEADER])
    tracing.record("tollgate.queue_wait", envelope.created, time.time(), envelope=envelope)
    with tracing.span("tollgate.run", kind="consumer", envelope=envelope) as span:
        tracing.finished(span, USAGE)
    tracing.CURRENT.reset(token)
    # billing: a store span in the request's trace (a batch of one)
    now = time.time()
    tracing.record("tollgate.store", now, now, parents=(tracing.sent_in(carried, tracing.trace_id(carried)),),
                   attributes={"tollgate.batch_size": 1})


async def measure(n: int, client: str = CLIENT) -> float:
    """CPU microseconds per request over ``n`` requests (after a warm-up), export thread included."""
    now = time.time()
    envelope = Envelope(id="r", tenant="t", principal="k", issuer="i", kind="chat", model="m", lane="normal",
                        created=now, deadline=now + 60, reply="tg.reply.e.r",
                        body=ChatBody([ChatMessage("user", "Hi")]))
    for _ in range(1000):
        await one_request(envelope, client)
    began = time.process_time()
    for _ in range(n):
        await one_request(envelope, client)
    if tracing.enabled():
        await asyncio.to_thread(tracing.uninstall)  # everything made is exported before the clock stops
    return (time.process_time() - began) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20000)
    args = parser.parse_args()
    off = asyncio.run(measure(args.n))
    port = free_port()
    sink = subprocess.Popen([sys.executable, str(ROOT / "bench" / "otlp_sink.py"), "--port", str(port)],
                            stdout=subprocess.PIPE, text=True)
    on = {}
    try:
        time.sleep(1.5)  # the sink's start
        for ratio in (1.0, 0.1):
            tracing.install(TracingSettings(otlp_endpoint=f"http://127.0.0.1:{port}", max_queued_spans=100_000,
                                            sample_ratio=ratio), "bench")
            on[ratio] = asyncio.run(measure(args.n, CLIENT if ratio == 1.0 else ""))
    finally:
        sink.terminate()
        received = sink.communicate(timeout=10)[0].strip()
    print(f"one request's tracing calls (7 spans), CPU per request over {args.n} requests:\n")
    print("| spans | CPU per request |\n|---|---|")
    print(f"| off | {off:.2f} µs |\n| on, every request kept and exported | {on[1.0]:.1f} µs |")
    print(f"| on, sample_ratio 0.1 (new traces) | {on[0.1]:.1f} µs |\n\n{received}")


if __name__ == "__main__":
    main()
