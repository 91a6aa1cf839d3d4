"""Each role's NATS user can do its job and nothing else."""

from __future__ import annotations

import asyncio

import nats.errors
import pytest

from bus.subjects import KEYS_BUCKET, REQUESTS_STREAM, request_subject
from bus.tenancy import key_id_of
from tests.conftest import CHAT_MODEL


class Violations:
    """Collects the server's errors for one connection (its ``error_cb``)."""

    def __init__(self):
        self.seen: list[str] = []

        async def record(err: Exception) -> None:
            self.seen.append(str(err))

        self.callback = record


async def test_a_worker_cannot_publish_work(stack, nc):
    violations = Violations()
    worker = await stack.connect("worker", error_cb=violations.callback)
    before = (await nc.jetstream().stream_info(REQUESTS_STREAM)).state.last_seq
    with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
        await worker.jetstream().publish(request_subject("normal", CHAT_MODEL), b"forged work", timeout=1)
    await worker.close()
    assert any("permissions violation" in v.lower() for v in violations.seen)
    assert (await nc.jetstream().stream_info(REQUESTS_STREAM)).state.last_seq == before


async def test_a_service_cannot_read_another_services_replies(stack, nc):
    violations = Violations()
    snoop = await stack.connect("svc:svc-a", error_cb=violations.callback)
    owner = await stack.connect("svc:svc-b")
    stolen, received = asyncio.Queue(), asyncio.Queue()
    await snoop.subscribe("tg.reply.svc-b.>", cb=stolen.put)
    await owner.subscribe("tg.reply.svc-b.>", cb=received.put)
    await snoop.flush()
    await owner.flush()
    await nc.publish("tg.reply.svc-b.req1", b"the answer")
    assert (await asyncio.wait_for(received.get(), 2)).data == b"the answer"
    await asyncio.sleep(0.3)
    assert stolen.empty()
    assert any("permissions violation" in v.lower() for v in violations.seen)
    await snoop.close()
    await owner.close()


async def test_billing_cannot_touch_work_or_tenants(stack):
    violations = Violations()
    billing = await stack.connect("billing", error_cb=violations.callback)
    with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
        await billing.jetstream().publish(request_subject("normal", CHAT_MODEL), b"x", timeout=1)
    with pytest.raises(nats.errors.Error):  # the key exists: only a refusal can raise here
        await (await billing.jetstream().key_value(KEYS_BUCKET)).get(key_id_of(stack.api_key))
    await billing.close()
    assert violations.seen
