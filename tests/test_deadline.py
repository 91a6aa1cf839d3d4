"""A request that outlives its deadline ends with a 504, and the worker stops spending on it."""

from __future__ import annotations

import time

import openai

from tests.conftest import CHAT_MODEL, free_port, usage_rows


async def test_deadline_gives_504_and_stops_the_work(stack, meter, clickhouse):
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    stack.spawn("edge", "edge", env={"TOLLGATE_EDGE_PORT": str(port), "TOLLGATE_EDGE_REQUEST_TIMEOUT_S": "1.5"})
    stack.wait_serving(CHAT_MODEL, base_url=base_url, timeout=60)
    client = stack.client(base_url=base_url)
    started = time.monotonic()
    raw = None
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "Write a very long story about a lighthouse."}],
            temperature=0, max_tokens=2000,
        )
    except openai.APIStatusError as exc:
        assert exc.status_code == 504
        assert exc.code == "deadline_exceeded"
        rid = exc.response.headers["x-request-id"]
    assert raw is None, "2000 tokens do not fit in 1.5 s on this machine"
    assert time.monotonic() - started < 4
    [row] = await usage_rows(clickhouse, [rid], expect=1)
    assert row["status"] == "cancelled" and 0 < row["output_units"] < 2000
