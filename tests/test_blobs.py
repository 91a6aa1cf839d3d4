"""Large bodies travel through the tg_blobs object store: nothing under the edge's limit fails for its
size, a body over it is a 413 naming the limit, and a blob that is not what its issuer signed never runs."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import msgspec
import nats
import pytest

from bus import blobs
from bus.envelopes import seal
from bus.errors import WorkerFailed
from bus.protocol import ChatBody, ChatMessage, Final, Started, Usage, WorkerAnnouncement, decode_envelope, encode
from bus.provision import provision
from bus.publisher import Publisher
from bus.settings import load_settings
from bus.signing import Identity
from bus.subjects import (
    PUBLISHERS_BUCKET, REQUEST_BLOBS_BUCKET, REQUESTS_STREAM, WORKERS_BUCKET, liveness_key, request_subject,
)
from infra.nats_launcher import NatsServer
from tests.conftest import CHAT_MODEL, eventually, usage_rows
from tests.test_bus_trust import Replies, _envelope
from tests.test_hostile_input import _key

PUBLISHER = "edge-blobtest"


async def _post(stack, body: bytes, secret: str) -> tuple[int, dict, str | None]:
    async with aiohttp.ClientSession() as client:
        async with client.post(f"{stack.base_url}/v1/chat/completions", data=body,
                               headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}) as resp:
            return resp.status, await resp.json(), resp.headers.get("x-request-id")


async def test_a_body_just_under_the_edges_limit_reaches_the_model_through_the_object_store(stack, nc, meter):
    """A chat body of almost 8 MiB is far over one NATS message's share: the worker's own answer
    (context too long, found after it fetched the blob) proves it got there, not a 413 or a 503."""
    _, secret = await _key(stack)
    limit = stack.settings.edge.max_body_bytes
    filler = "hi " * ((limit - 1024) // 3)
    body = msgspec.json.encode({"model": CHAT_MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": filler}]})
    assert 7 * 1024 * 1024 < len(body) <= limit
    status, answer, request_id = await _post(stack, body, secret)
    assert status == 400 and answer["error"]["code"] == "context_length_exceeded", answer
    meta = await nc.jetstream().get_last_msg(blobs.blob_stream(REQUEST_BLOBS_BUCKET),
                                             blobs._meta_subject(REQUEST_BLOBS_BUCKET, request_id), direct=True)
    assert msgspec.json.decode(meta.data)["size"] > 7 * 1024 * 1024


async def test_a_body_over_the_edges_limit_is_a_413_naming_the_limit(stack):
    _, secret = await _key(stack)
    limit = stack.settings.edge.max_body_bytes
    status, answer, _ = await _post(stack, b" " * (limit + 1), secret)
    assert status == 413 and answer["error"]["code"] == "request_too_large", answer
    assert str(limit) in answer["error"]["message"], answer


@pytest.fixture
async def publisher(stack, nc):
    """A publisher with a 1 KiB blob threshold, signing as the stack's edge."""
    edge = Identity.load_or_create(Path(stack.settings.state_dir, "keys", "edge.seed"))
    pub = Publisher(nc, edge, PUBLISHER, deadline_s=30, silence_s=5, blob_threshold=1024)
    await pub.start()
    yield pub
    await pub.stop()


async def test_a_body_over_the_threshold_round_trips_through_the_blob_store_to_the_worker(stack, nc, meter, clickhouse,
                                                                                         publisher):
    body = ChatBody([ChatMessage("system", "Be brief. " * 300), ChatMessage("user", "Say hi.")], max_tokens=3,
                    temperature=0, stream=False)
    assert len(encode(body)) > 1024
    async with publisher.submit(tenant="default", principal="svc-test", model=CHAT_MODEL, lane="normal", kind="chat",
                                body=body) as call:
        frames = [frame async for frame in call.frames()]
    assert call.envelope.body is None and call.envelope.blob.size == len(encode(body))
    assert isinstance(frames[-1], Final) and frames[-1].usage.prompt_tokens > 300
    rows = await usage_rows(clickhouse, [call.envelope.id], expect=1)
    assert [r["status"] for r in rows] == ["ok"]


async def test_a_tampered_blob_is_not_run_and_not_billed(stack, nc, meter, clickhouse):
    js = nc.jetstream()
    edge = Identity.load_or_create(Path(stack.settings.state_dir, "keys", "edge.seed"))
    await (await js.key_value(PUBLISHERS_BUCKET)).put(PUBLISHER, b"")
    replies = Replies()
    sub = await nc.subscribe(f"tg.reply.{PUBLISHER}.*", cb=replies.on_msg)

    async def publish(envelope):
        data, headers = seal(envelope, edge, ttl_s=30)
        await js.publish(request_subject("normal", CHAT_MODEL), data, headers=headers)

    # Stored as signed, then overwritten under the same name by someone who may write the bucket.
    overwritten = await blobs.outline(js, _envelope(edge, replies=PUBLISHER), threshold=0)
    await blobs.put(js, REQUEST_BLOBS_BUCKET, overwritten.id,
                    encode(ChatBody([ChatMessage("user", "Something else entirely.")], max_tokens=3)))
    # A reference whose digest is not the stored object's; and one naming an object never stored.
    wrong_digest = await blobs.outline(js, _envelope(edge, replies=PUBLISHER), threshold=0)
    wrong_digest = msgspec.structs.replace(wrong_digest, blob=msgspec.structs.replace(wrong_digest.blob, sha256="0" * 64))
    missing = await blobs.outline(js, _envelope(edge, replies=PUBLISHER), threshold=0)
    missing = msgspec.structs.replace(missing, blob=msgspec.structs.replace(missing.blob, name="never-stored"))
    good = await blobs.outline(js, _envelope(edge, replies=PUBLISHER), threshold=0)
    bad = [overwritten, wrong_digest, missing]
    for envelope in [*bad, good]:
        await publish(envelope)

    await replies.final(good.id)  # the worker got past the bad ones
    assert isinstance(replies.frames[good.id][0], Started)
    for envelope in bad:
        assert envelope.id not in replies.frames, "a tampered blob never started"

    async def queue_empty():
        return (await js.stream_info(REQUESTS_STREAM)).state.messages == 0

    await eventually(queue_empty)  # terminated, not left queued
    rows = await usage_rows(clickhouse, [e.id for e in [*bad, good]], expect=1)
    assert [r["request_id"] for r in rows] == [good.id]
    await sub.unsubscribe()


async def test_a_result_blob_is_read_only_as_its_reference_says(stack, nc):
    js = nc.jetstream()
    data = bytes(range(256)) * 2048  # 512 KiB: several chunks
    ref = await blobs.store_result(js, "result-test", data)
    final = Final(seq=3, finish_reason="stop", usage=Usage(1, 1), blob=ref)
    assert await blobs.read_result(js, final) == data
    await blobs.store_result(js, "result-test", data[:-1] + b"x")
    with pytest.raises(WorkerFailed):
        await blobs.read_result(js, final)


async def test_a_large_body_fits_a_bus_whose_max_payload_is_small(tmp_path):
    """An operator's 1 MB max_payload no longer limits bodies: the publisher keeps envelopes
    under it and the body goes by blob."""
    operator = tmp_path / "operator.conf"
    operator.write_text("max_payload: 1MB\n")
    with NatsServer(tmp_path / "nats", config=operator) as server:
        settings = load_settings(env={"TOLLGATE_STATE_DIR": str(tmp_path / "state")})
        conn = await nats.connect(server.url)
        js = conn.jetstream()
        try:
            await provision(js, settings)
            announcement = encode(WorkerAnnouncement("w", CHAT_MODEL, time.time()))
            await (await js.key_value(WORKERS_BUCKET)).put(liveness_key(CHAT_MODEL, "w"), announcement)
            pub = Publisher(conn, Identity.generate(), PUBLISHER, deadline_s=30, silence_s=5)
            await pub.start()
            await eventually(lambda: asyncio.sleep(0, pub.live.serving(CHAT_MODEL)))
            body = ChatBody([ChatMessage("user", "x" * (2 << 20))])
            async with pub.submit(tenant="default", principal="p", model=CHAT_MODEL, lane="normal", kind="chat",
                                  body=body) as call:
                call.done = True  # nothing will answer; no cancel needed
            await pub.stop()
            queued = await js.get_last_msg(REQUESTS_STREAM, request_subject("normal", CHAT_MODEL))
            assert len(queued.data) < conn.max_payload
            assert (await blobs.inline(js, decode_envelope(queued.data))).body == body
        finally:
            await conn.close()
