"""W3C trace context: a client's traceparent (or a new trace) reaches the usage row and the log lines."""

from __future__ import annotations

import logging
import re

import aiohttp

from bus import tracing
from tests.conftest import CHAT_MODEL, eventually, request_id, usage_rows

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


async def _chat(stack, headers: dict[str, str]) -> str:
    """One chat request with ``headers``; its request id."""
    async with aiohttp.ClientSession() as http:
        async with http.post(stack.base_url + "/v1/chat/completions",
                             json={"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
                             headers={"Authorization": f"Bearer {stack.api_key}", **headers}) as resp:
            assert resp.status == 200
            return request_id((await resp.json())["id"])


async def _trace_ids(clickhouse, ids: list[str]) -> dict[str, str]:
    await usage_rows(clickhouse, ids, expect=len(ids))
    rows = await clickhouse.query("SELECT request_id, trace_id FROM usage_events WHERE request_id IN {ids:Array(String)}",
                                  {"ids": ids})
    return dict(rows)


async def test_the_clients_trace_id_reaches_the_usage_row(stack, meter, clickhouse):
    given = await _chat(stack, {"traceparent": f"00-{CLIENT_TRACE}-00f067aa0ba902b7-01"})
    none = await _chat(stack, {})
    garbage = await _chat(stack, {"traceparent": f"00-{CLIENT_TRACE}-0000000000000000-01"})  # an all-zero parent id
    traces = await eventually(lambda: _trace_ids(clickhouse, [given, none, garbage]))
    assert traces[given] == CLIENT_TRACE
    # no valid traceparent: the edge begins a trace of its own for each request
    assert re.fullmatch("[0-9a-f]{32}", traces[none]) and re.fullmatch("[0-9a-f]{32}", traces[garbage])
    assert len({traces[none], traces[garbage], CLIENT_TRACE}) == 3


def test_a_hop_keeps_the_trace_and_makes_a_parent_id_of_its_own():
    sent = tracing.continued(f"00-{CLIENT_TRACE}-00f067aa0ba902b7-01")
    _, trace, parent, flags = sent.split("-")
    assert (trace, flags) == (CLIENT_TRACE, "01") and parent != "00f067aa0ba902b7"
    assert tracing.trace_id({"traceparent": sent}) == CLIENT_TRACE
    assert tracing.trace_id({"traceparent": "nonsense"}) == "" and tracing.trace_id({}) == ""


def test_log_lines_name_the_current_trace(caplog):
    log = logging.getLogger("tests.tracing")
    log.addFilter(tracing.TraceIds())
    token = tracing.CURRENT.set(f"00-{CLIENT_TRACE}-00f067aa0ba902b7-01")
    try:
        with caplog.at_level(logging.INFO, "tests.tracing"):
            log.info("inside a request")
    finally:
        tracing.CURRENT.reset(token)
    with caplog.at_level(logging.INFO, "tests.tracing"):
        log.info("outside any request")
    assert [r.trace_id for r in caplog.records] == [CLIENT_TRACE, "-"]
