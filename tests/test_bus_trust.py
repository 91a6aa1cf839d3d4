"""Envelopes published straight to NATS: only verified, trusted, timely work runs and is metered."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import msgspec

from bus.envelopes import TICKET_HEADER, seal
from bus.ids import new_request_id
from bus.issuers import register_issuer
from bus.liveness import announced
from bus.protocol import ChatBody, ChatMessage, Envelope, Final, IssuerGrant, decode_envelope, decode_frame
from bus.signing import SIGNATURE_HEADER, Identity
from bus.subjects import PUBLISHERS_BUCKET, REQUESTS_STREAM, request_subject, token
from consumers.serve import worker_identity_path
from tests.conftest import CHAT_MODEL, eventually, usage_rows

BODY = ChatBody([ChatMessage("user", "Say hi.")], max_tokens=3, temperature=0)


def _envelope(identity: Identity, tenant: str = "default", deadline_in: float = 30.0, replies: str = "edge-bustest",
              **fields) -> Envelope:
    now = time.time()
    rid = new_request_id()
    return Envelope(**{
        **dict(id=rid, tenant=tenant, principal="svc-test", issuer=identity.public_key, kind="chat", model=CHAT_MODEL,
               lane="normal", created=now, deadline=now + deadline_in, reply=f"tg.reply.{replies}.{rid}", body=BODY),
        **fields,
    })


class Replies:
    """Collects every reply frame published for the test's envelopes."""

    def __init__(self):
        self.frames: dict[str, list] = {}
        self.finals: dict[str, asyncio.Event] = {}

    async def on_msg(self, msg):
        rid = msg.subject.rsplit(".", 1)[-1]
        frame = decode_frame(msg.data)
        self.frames.setdefault(rid, []).append(frame)
        if isinstance(frame, Final):
            self.finals.setdefault(rid, asyncio.Event()).set()

    async def final(self, rid: str, timeout: float = 30.0) -> None:
        await asyncio.wait_for(self.finals.setdefault(rid, asyncio.Event()).wait(), timeout)


async def test_only_trusted_timely_envelopes_run_and_are_metered(stack, nc, meter, clickhouse):
    js = nc.jetstream()
    edge = Identity.load_or_create(Path(stack.settings.state_dir, "keys", "edge.seed"))
    stranger = Identity.generate()
    acme_service = Identity.generate()
    await register_issuer(js, acme_service.public_key, IssuerGrant("acme-service", ["acme"]))
    await asyncio.sleep(0.3)  # the worker's issuer mirror follows the registry by watch

    worker = Identity.load_or_create(worker_identity_path(stack.settings))
    publishers = await js.key_value(PUBLISHERS_BUCKET)
    # As a running edge and service announce themselves, for as long as the test runs.
    announcements = contextlib.AsyncExitStack()
    for alive in ("edge-bustest", "acme-service"):
        await announcements.enter_async_context(announced(publishers, alive, b"", stack.settings.worker.liveness_s))
    replies = Replies()
    sub = await nc.subscribe("tg.reply.*.*", cb=replies.on_msg)

    async def publish(envelope: Envelope, signer: Identity, headers: dict | None = None, lane: str = "normal"):
        data, hdrs = seal(envelope, signer, ttl_s=30)
        hdrs.update(headers or {})
        return await js.publish(request_subject(lane, CHAT_MODEL), data, headers=hdrs)

    unknown = _envelope(stranger)
    await publish(unknown, stranger)
    forged = _envelope(edge)
    await publish(forged, edge, {SIGNATURE_HEADER: stranger.sign(msgspec.msgpack.encode(forged))})
    expired = _envelope(edge, deadline_in=-1.0)
    await publish(expired, edge)
    cross_tenant = _envelope(acme_service, tenant="globex", replies="acme-service")
    await publish(cross_tenant, acme_service)
    # Priced as batch, run as critical: the lane must be the subject's.
    lane_swapped = _envelope(edge, lane="batch")
    await publish(lane_swapped, edge, lane="critical")
    # Frames sent where the issuer does not read: another service's replies, or a usage subject.
    foreign_reply = _envelope(acme_service, tenant="acme", replies="reports")
    await publish(foreign_reply, acme_service)
    odd_reply = _envelope(edge)
    odd_reply = msgspec.structs.replace(odd_reply, reply=f"tg.usage.acme.{odd_reply.id}")
    await publish(odd_reply, edge)
    # A life longer than the dedupe window: a replay after the window could run it again.
    too_long = _envelope(edge, deadline_in=stack.settings.max_deadline_s + 5)
    await publish(too_long, edge)
    # A service may not claim a credit hold (settling it would mint credits), nor a worker publish work.
    service_hold = _envelope(acme_service, tenant="acme", replies="acme-service", hold_micros=1_000_000)
    await publish(service_hold, acme_service)
    from_worker = _envelope(worker)
    await publish(from_worker, worker)
    # Signed, but without a valid ticket signature (its usage could not be bound to it).
    no_ticket = _envelope(edge)
    await publish(no_ticket, edge, {TICKET_HEADER: stranger.sign(b"x")})
    tampered = _envelope(edge)
    data, hdrs = seal(tampered, edge, ttl_s=30)
    await js.publish(request_subject("normal", CHAT_MODEL), data.replace(b"svc-test", b"svc-evil"), headers=hdrs)

    valid = _envelope(edge)
    first = await publish(valid, edge)
    replay = await publish(valid, edge)
    own_tenant = _envelope(acme_service, tenant="acme", replies="acme-service")
    await publish(own_tenant, acme_service)

    await replies.final(valid.id)
    await replies.final(own_tenant.id)
    assert not first.duplicate and replay.duplicate, "the server drops a replay of the same request id"

    bad = [unknown, forged, expired, cross_tenant, tampered, lane_swapped, foreign_reply, odd_reply, too_long,
           service_hold, from_worker, no_ticket]
    for env in bad:
        assert env.id not in replies.frames, "a rejected envelope never produced a frame"
    assert [type(f).__name__ for f in replies.frames[valid.id]][0] == "Started"
    assert sum(isinstance(f, Final) for f in replies.frames[valid.id]) == 1, "the replay did not run"

    async def queue_empty():
        return (await js.stream_info(REQUESTS_STREAM)).state.messages == 0

    await eventually(queue_empty)  # rejected work is terminated, not left queued
    rows = await usage_rows(clickhouse, [e.id for e in [*bad, valid, own_tenant]], expect=2)
    assert sorted(r["request_id"] for r in rows) == sorted([valid.id, own_tenant.id])
    await sub.unsubscribe()
    await announcements.aclose()


async def test_work_whose_publisher_is_gone_is_dead_lettered_unrun_and_unbilled(stack, nc, meter, clickhouse):
    """An edge that died (or stopped) announces itself no more: its queued work would be run and
    billed for a client nobody can answer any longer."""
    js = nc.jetstream()
    edge = Identity.load_or_create(Path(stack.settings.state_dir, "keys", "edge.seed"))
    publishers = await js.key_value(PUBLISHERS_BUCKET)
    announcement = announced(publishers, "edge-alive", b"", stack.settings.worker.liveness_s)
    await announcement.__aenter__()
    replies = Replies()
    sub = await nc.subscribe("tg.reply.*.*", cb=replies.on_msg)
    orphans = [_envelope(edge, replies="edge-long-gone") for _ in range(3)]
    live = _envelope(edge, replies="edge-alive")
    for envelope in [*orphans, live]:
        data, headers = seal(envelope, edge, ttl_s=30)
        await js.publish(request_subject("normal", CHAT_MODEL), data, headers=headers)
    await replies.final(live.id)  # queued behind the orphans: the worker got past them
    assert all(e.id not in replies.frames for e in orphans), "never started"
    rows = await usage_rows(clickhouse, [e.id for e in [*orphans, live]], expect=1)
    assert [r["request_id"] for r in rows] == [live.id], "only the live publisher's request was billed"
    dead = await js.subscribe("tg.dead.work", stream="DEADLETTER", ordered_consumer=True)
    reasons = {}
    with contextlib.suppress(TimeoutError):
        while True:
            msg = await dead.next_msg(timeout=1)
            reasons[decode_envelope(msg.data).id] = msg.headers["Tg-Reason"]
    await dead.unsubscribe()
    await sub.unsubscribe()
    await announcement.__aexit__(None, None, None)
    assert all("publisher is gone" in reasons.get(e.id, "") for e in orphans), reasons


async def test_a_publish_on_an_unknown_lane_does_not_stop_the_worker(stack, nc, client):
    """Every worker of the model hears it on its doorbell; a made-up lane once killed their dispatchers."""
    subject = f"tg.req.bogus.{token(CHAT_MODEL)}"
    await nc.publish(subject, b"")
    await nc.flush()
    await nc.jetstream().purge_stream(REQUESTS_STREAM, subject=subject)  # no consumer would ever take it
    reply = await client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=1)
    assert reply.choices[0].finish_reason in ("stop", "length")
