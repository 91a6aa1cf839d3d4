"""Each role's NATS user can do its job and nothing else."""

from __future__ import annotations

import asyncio

import nats.errors
import pytest

from bus import blobs
from bus.provision import ensure_work_consumers
from bus.subjects import (
    CANCELLED_BUCKET, ISSUERS_BUCKET, KEYS_BUCKET, LANES, REQUEST_BLOBS_BUCKET, REQUESTS_STREAM, WORKERS_BUCKET, budget_event_subject, liveness_key, request_subject,
    bell_wildcard, tokenize_subject, usage_subject, work_consumer,
)
from bus.account.tenants import key_id_of
from infra import supervisor
from infra.nats.roles import worker_role
from infra.bootstrap import DEFAULT_TENANT
from tests.conftest import CHAT_MODEL

# A model no worker serves in the suite: work queued for it stays put unless a worker steals it.
OTHER_MODEL = "not-served-here"


class Violations:
    """Collects the server's errors for one connection (its ``error_cb``)."""

    def __init__(self):
        self.seen: list[str] = []

        async def record(err: Exception) -> None:
            self.seen.append(str(err))

        self.callback = record

    def refused(self, subject: str) -> bool:
        return any("permissions violation" in v.lower() and subject.lower() in v.lower() for v in self.seen)


async def _refused_write(conn, subject: str, data: bytes = b"forged") -> None:
    """A JetStream publish the server must drop (no ack ever comes)."""
    with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
        await conn.jetstream().publish(subject, data, timeout=1)


async def test_a_worker_cannot_publish_work_write_the_issuer_registry_or_announce_another_model(stack, nc):
    violations = Violations()
    worker = await stack.connect(worker_role(CHAT_MODEL), error_cb=violations.callback)
    before = (await nc.jetstream().stream_info(REQUESTS_STREAM)).state.last_seq
    await _refused_write(worker, request_subject("normal", CHAT_MODEL), b"forged work")
    await _refused_write(worker, f"$KV.{ISSUERS_BUCKET}.forged")
    # Announcing a live worker of a model it does not serve would send that model's work to nobody.
    other_liveness = f"$KV.{WORKERS_BUCKET}.{liveness_key(OTHER_MODEL, 'forged')}"
    await _refused_write(worker, other_liveness)
    await worker.close()
    for subject in (request_subject("normal", CHAT_MODEL), f"$KV.{ISSUERS_BUCKET}.forged", other_liveness):
        assert violations.refused(subject), (subject, violations.seen)
    assert (await nc.jetstream().stream_info(REQUESTS_STREAM)).state.last_seq == before


async def test_a_worker_reads_request_blobs_but_cannot_write_one(stack, nc):
    """Request bodies are the publishers' to store: a worker only reads them."""
    ref = await blobs.put(nc.jetstream(), REQUEST_BLOBS_BUCKET, "permissions-test", b"x" * 200_000)
    violations = Violations()
    worker = await stack.connect(worker_role(CHAT_MODEL), error_cb=violations.callback)
    assert await blobs.get(worker.jetstream(), ref) == b"x" * 200_000
    forged = (f"$O.{REQUEST_BLOBS_BUCKET}.C.forged", f"$O.{REQUEST_BLOBS_BUCKET}.M.forged")
    for subject in forged:
        await _refused_write(worker, subject)
    await worker.close()
    for subject in forged:
        assert violations.refused(subject), (subject, violations.seen)


async def test_a_worker_of_one_model_cannot_pull_be_rung_for_or_retarget_another_models_work(stack, nc):
    js = nc.jetstream()
    await ensure_work_consumers(js, stack.settings, OTHER_MODEL)
    await js.publish(request_subject("normal", OTHER_MODEL), b"another model's work")
    theirs = work_consumer(OTHER_MODEL, "normal")
    violations = Violations()
    worker = await stack.connect(worker_role(CHAT_MODEL), error_cb=violations.callback)
    try:
        inbox = worker.new_inbox()
        pulled = await worker.subscribe(inbox)
        steal = f"$JS.API.CONSUMER.MSG.NEXT.{REQUESTS_STREAM}.{theirs}"
        await worker.publish(steal, b'{"batch": 1, "no_wait": true}', reply=inbox)
        # Its own consumer pointed at the other model's subject, in every form of the create call.
        mine = work_consumer(CHAT_MODEL, "normal")
        retarget = (f"$JS.API.CONSUMER.CREATE.{REQUESTS_STREAM}.{mine}.{request_subject('normal', OTHER_MODEL)}",
                    f"$JS.API.CONSUMER.DURABLE.CREATE.{REQUESTS_STREAM}.{mine}",
                    f"$JS.API.CONSUMER.CREATE.{REQUESTS_STREAM}.{mine}")
        for subject in retarget:
            await worker.publish(subject, b"{}", reply=inbox)
        await worker.subscribe(bell_wildcard(OTHER_MODEL))  # the other model's doorbell
        await worker.subscribe(bell_wildcard(CHAT_MODEL))  # its own: allowed
        await worker.subscribe(tokenize_subject(OTHER_MODEL))  # the other model's tokenize asks
        await worker.subscribe(tokenize_subject(CHAT_MODEL))  # its own: allowed (outside the queue group: steals no ask)
        await worker.flush()
        await asyncio.sleep(0.5)
        with pytest.raises(nats.errors.TimeoutError):
            await pulled.next_msg(timeout=0.5)
        for subject in (steal, *retarget, bell_wildcard(OTHER_MODEL), tokenize_subject(OTHER_MODEL)):
            assert violations.refused(subject), (subject, violations.seen)
        assert not violations.refused(bell_wildcard(CHAT_MODEL))
        assert not violations.refused(tokenize_subject(CHAT_MODEL))
        assert (await js.consumer_info(REQUESTS_STREAM, theirs)).num_pending == 1  # still there
    finally:
        await worker.close()
        await js.purge_stream(REQUESTS_STREAM, subject=request_subject("normal", OTHER_MODEL))
        for lane in LANES:
            await js.delete_consumer(REQUESTS_STREAM, work_consumer(OTHER_MODEL, lane))


async def test_the_edge_cannot_write_the_issuer_registry_or_forge_alerts_or_usage(stack):
    violations = Violations()
    edge = await stack.connect("edge", error_cb=violations.callback)
    forged = (f"$KV.{ISSUERS_BUCKET}.forged", budget_event_subject(DEFAULT_TENANT), usage_subject(DEFAULT_TENANT))
    for subject in forged:
        await _refused_write(edge, subject)
    await edge.close()
    for subject in forged:
        assert violations.refused(subject), (subject, violations.seen)


def test_only_edges_are_handed_the_admin_token_and_each_worker_its_own_models_user(stack):
    # The operator exported the token for the edges; billing and workers must not inherit it.
    env = {"PATH": "/usr/bin", "TOLLGATE_EDGE_ADMIN_TOKEN": "tga-exported"}
    children = supervisor._children(stack.settings, env, stack.passwords, "tga-exported")
    edges = [c for c in children if c.role == "edge"]
    assert edges and all(c.env["TOLLGATE_EDGE_ADMIN_TOKEN"] == "tga-exported" for c in edges)
    others = [c for c in children if c.role != "edge"]
    assert {c.role for c in others} == {"billing", "worker"}
    assert not [c.name for c in others if "TOLLGATE_EDGE_ADMIN_TOKEN" in c.env]
    for c in others:
        if c.role == "worker":
            model = c.argv[-1]
            assert c.env["TOLLGATE_NATS_USER"] == f"worker_{model}"
            assert c.env["TOLLGATE_NATS_PASSWORD"] == stack.passwords[worker_role(model)]


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


async def test_a_watch_keeps_up_when_the_server_asks_for_flow_control(stack, nc):
    """A KV watch (how edges follow workers, tenants and keys) is an ordered consumer with flow
    control: its user must be allowed to answer, or once enough is in flight the server stalls the
    watch and the edge silently stops seeing changes (new workers never served)."""
    violations = Violations()
    edge = await stack.connect("edge", error_cb=violations.callback)
    try:
        # A bucket no process watches, so the probe's keys disturb nothing.
        kv = await edge.jetstream().key_value(CANCELLED_BUCKET)
        watcher = await kv.watch("flow-control-probe.>")
        admin_kv = await nc.jetstream().key_value(CANCELLED_BUCKET)
        value = b"x" * 8192
        last = None
        for i in range(400):  # ~3 MiB: far past what the server sends before it asks for flow control
            last = f"flow-control-probe.{i}"
            await admin_kv.put(last, value)

        seen = 0

        async def saw_the_last():
            nonlocal seen
            async for entry in watcher:
                seen += 1
                if entry is not None and entry.key == last:
                    return

        try:
            await asyncio.wait_for(saw_the_last(), timeout=20)
        except TimeoutError:
            raise AssertionError(f"the watch stalled after {seen} of 400 changes: {violations.seen[:1]}") from None
        assert not any("permissions violation" in v.lower() for v in violations.seen), violations.seen
    finally:
        for i in range(400):
            await admin_kv.purge(f"flow-control-probe.{i}")
        await edge.close()
