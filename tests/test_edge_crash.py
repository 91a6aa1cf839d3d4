"""An edge killed with requests queued or running: nobody can receive their answers, so queued ones
are never run or billed (before, a restarted stack ran and billed every one of them), and running
ones stop, billed as cancelled with what they used (before, they decoded to the end for nobody)."""

from __future__ import annotations

import asyncio
import json
import signal

import aiohttp

from bus.subjects import REQUESTS_STREAM
from tests.conftest import CHAT_MODEL, admin, eventually, free_port, request_id, usage_rows
from tests.test_tenancy import HI, _tenant


async def _doomed_edge(stack):
    """Another edge process on the stack's NATS, to be killed: the process and its base URL."""
    port = free_port()
    doomed = stack.spawn("edge", "edge", env={"TOLLGATE_EDGE_PORT": str(port)})
    doomed_url = f"http://127.0.0.1:{port}"
    await asyncio.to_thread(stack.wait_serving, CHAT_MODEL, base_url=doomed_url, timeout=60)
    return doomed, doomed_url


async def test_work_queued_by_a_killed_edge_is_never_run_or_billed(stack, nc, meter, clickhouse):
    doomed, doomed_url = await _doomed_edge(stack)
    key = await _tenant(stack, "orphaned", tier="pro")
    js = nc.jetstream()
    queued_before = (await js.stream_info(REQUESTS_STREAM)).state.messages

    # The only worker is busy with a long answer while the doomed edge's requests queue behind it.
    busy = asyncio.create_task(stack.client().chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "Write a long story about a lighthouse."}],
        max_tokens=120, temperature=0))
    await asyncio.sleep(0.5)
    async with aiohttp.ClientSession() as http:
        async def ask():
            async with http.post(doomed_url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                 json={"model": CHAT_MODEL, "messages": HI, "max_tokens": 2}) as resp:
                return resp.status

        orphans = [asyncio.create_task(ask()) for _ in range(6)]

        async def all_queued():
            return (await js.stream_info(REQUESTS_STREAM)).state.messages >= queued_before + 6

        await eventually(all_queued)
        doomed.send_signal(signal.SIGKILL)  # no clean stop: it cancels nothing
        results = await asyncio.gather(*orphans, return_exceptions=True)
    assert all(isinstance(r, aiohttp.ClientError) for r in results), results

    await busy
    # Work runs in queue order: once a later request is metered, the orphans were dealt with.
    later = await stack.client().chat.completions.create(model=CHAT_MODEL, messages=HI, max_tokens=1)
    await usage_rows(clickhouse, [request_id(later.id)], expect=1)
    billed = await clickhouse.query("SELECT count() FROM usage_events WHERE tenant = 'orphaned'")
    assert billed == [(0,)], "nothing the dead edge queued was run or billed"
    status, _ = await admin(stack, "GET", "/admin/usage?tenant=orphaned")
    assert status == 200


async def test_work_running_for_a_killed_edge_stops_and_is_billed_as_cancelled(stack, meter, clickhouse):
    doomed, doomed_url = await _doomed_edge(stack)
    key = await _tenant(stack, "orphaned-running", tier="pro")
    max_tokens = 400  # a minute of decoding here: it could not end by itself before the check below
    async with aiohttp.ClientSession() as http:
        async with http.post(doomed_url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                             json={"model": CHAT_MODEL, "stream": True, "max_tokens": max_tokens, "temperature": 0,
                                   "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}]}
                             ) as resp:
            first = json.loads((await resp.content.readline()).removeprefix(b"data: "))
            doomed.send_signal(signal.SIGKILL)  # mid-stream, no clean stop: it cancels nothing
    [row] = await usage_rows(clickhouse, [request_id(first["id"])], expect=1, timeout=30)
    assert row["status"] == "cancelled" and 0 < row["output_units"] < max_tokens, row
