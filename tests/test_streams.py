"""Every stream has a bound, and a full one refuses new messages clearly instead of dropping old ones."""

from __future__ import annotations

import msgspec
import nats
import nats.js.errors

from bus.errors import JS_STREAM_FULL
from bus.provision import provision
from bus.settings import Settings
from bus.subjects import METER_CONSUMER, REQUESTS_STREAM, USAGE_STREAM, request_subject, usage_subject
from infra.nats_launcher import NatsServer
from tests.conftest import eventually


def _settings(**sections) -> Settings:
    return msgspec.convert(sections, Settings)


async def _fill(js, subject: str, limit: int = 500) -> int:
    """Publish until the stream refuses; return how many it took."""
    for n in range(limit):  # same-sized messages, so the first refusal means full
        try:
            await js.publish(subject, b"x" * 200, headers={"Nats-Msg-Id": f"{subject}-{n}"})
        except nats.js.errors.APIError as exc:
            assert exc.err_code == JS_STREAM_FULL
            return n
    raise AssertionError(f"{subject} took {limit} messages without refusing")


async def test_usage_is_kept_until_the_meter_acks_it_and_a_full_stream_refuses_new_usage(tmp_path):
    with NatsServer(tmp_path / "nats") as server:
        conn = await nats.connect(server.url)
        js = conn.jetstream()
        await provision(js, _settings(meter={"usage_max_bytes": 8192}))
        stored = await _fill(js, usage_subject("t"))
        assert stored > 5
        assert (await js.stream_info(USAGE_STREAM)).state.messages == stored, "nothing unstored was dropped"
        assert await _fill(js, usage_subject("u")) == 0, "full: refused, not made room for"

        meter = await js.pull_subscribe_bind(METER_CONSUMER, USAGE_STREAM)
        for msg in await meter.fetch(stored, timeout=5):
            await msg.ack()

        async def room_again():  # what the meter stored leaves the stream
            return (await js.stream_info(USAGE_STREAM)).state.messages == 0

        await eventually(room_again)
        await js.publish(usage_subject("t"), b"now it fits")
        await conn.close()


async def test_each_model_and_lane_queues_at_most_max_queued_requests(tmp_path):
    with NatsServer(tmp_path / "nats") as server:
        conn = await nats.connect(server.url)
        js = conn.jetstream()
        await provision(js, _settings(worker={"max_queued": 3}))
        assert await _fill(js, request_subject("normal", "m")) == 3
        assert await _fill(js, request_subject("batch", "m")) == 3, "another lane has its own bound"
        assert await _fill(js, request_subject("normal", "other")) == 3, "and so has another model"
        info = await js.stream_info(REQUESTS_STREAM)
        assert info.config.max_bytes > 0 and info.state.messages == 9
        await conn.close()
