"""Request bodies and results too large for one bus message, kept in JetStream object stores.

A publisher stores a body whose encoding is over its threshold in ``tg_blobs`` and puts a
``BlobRef`` (bucket, name, size, sha256) in the envelope in its place; the envelope's
signature covers the reference, and the worker checks size and digest before the body is
trusted (``inline``). Large results go the other way, through ``tg_results``, referenced
from the final frame. Both buckets keep an object for the longest deadline (their TTL),
so a redelivered request still finds its body.

Objects are laid out as the JetStream object store lays them out (chunks on
``$O.<bucket>.C.<nuid>``, a JSON meta record on ``$O.<bucket>.M.<base64 name>``), so
``nats object`` tools read them. They are written and read here by hand: chunks are read
with direct gets, which needs no consumer, and writing needs only publish rights on the
bucket's subjects (infra/nats/roles.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from datetime import datetime, timezone

import msgspec
import nats.js.errors
from nats.js import JetStreamContext

from bus.errors import BadEnvelope, WorkerFailed
from bus.protocol import BlobRef, Envelope, Final, RequestBody, encode
from bus.subjects import REQUEST_BLOBS_BUCKET, RESULT_BLOBS_BUCKET

# Bodies encoded larger than this travel as blobs (settings: edge.blob_threshold_bytes).
BLOB_THRESHOLD_BYTES = 256 * 1024
# The object store's own default chunk: well under any nats-server's max_payload.
CHUNK_BYTES = 128 * 1024
# JetStream's error code when a publish's expected last sequence is not the subject's last.
_WRONG_LAST_SEQUENCE = 10071

_body_decoder = msgspec.msgpack.Decoder(RequestBody)


class BlobMismatch(Exception):
    """A blob that is missing, or whose size or digest differs from its reference's."""


def blob_stream(bucket: str) -> str:
    """The stream holding object store ``bucket``."""
    return f"OBJ_{bucket}"


def _meta_subject(bucket: str, name: str) -> str:
    return f"$O.{bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"


async def put(js: JetStreamContext, bucket: str, name: str, data: bytes) -> BlobRef:
    """Store ``data`` as object ``name`` of ``bucket`` and return its reference.

    Each chunk is acknowledged by JetStream before the next is sent. A put that fails
    half way leaves its chunks to the bucket's TTL: writers hold no purge right.
    """
    nuid = uuid.uuid4().hex  # a new chunk subject per put, as the object store does
    chunks = f"$O.{bucket}.C.{nuid}"
    for start in range(0, len(data), CHUNK_BYTES):
        await js.publish(chunks, data[start:start + CHUNK_BYTES])
    digest = hashlib.sha256(data)
    meta = {
        "name": name, "bucket": bucket, "nuid": nuid, "size": len(data), "chunks": -(-len(data) // CHUNK_BYTES),
        "mtime": datetime.now(timezone.utc).isoformat(), "options": {"max_chunk_size": CHUNK_BYTES},
        "digest": "SHA-256=" + base64.urlsafe_b64encode(digest.digest()).decode(),
    }
    # The rollup keeps one meta record per name, as the object store does.
    await js.publish(_meta_subject(bucket, name), json.dumps(meta).encode(), headers={"Nats-Rollup": "sub"})
    return BlobRef(bucket, name, len(data), digest.hexdigest())


async def get(js: JetStreamContext, ref: BlobRef) -> bytes:
    """The object ``ref`` names, once its size and sha256 are the reference's; else ``BlobMismatch``.

    The meta record is only used to find the chunks: nothing read from the bucket is
    trusted until the bytes match the reference, and no more than ``ref.size`` is read.
    """
    stream = blob_stream(ref.bucket)
    try:
        meta = await js.get_last_msg(stream, _meta_subject(ref.bucket, ref.name), direct=True)
        info = json.loads(meta.data)
        if info.get("deleted"):
            raise BlobMismatch(f"blob {ref.bucket}/{ref.name} was deleted")
        chunks = f"$O.{ref.bucket}.C.{info['nuid']}"
    except nats.js.errors.NotFoundError:
        raise BlobMismatch(f"blob {ref.bucket}/{ref.name} not found") from None
    except (ValueError, TypeError, KeyError):
        raise BlobMismatch(f"blob {ref.bucket}/{ref.name} has a malformed meta record") from None
    data, seq = bytearray(), 0
    while len(data) < ref.size:
        try:
            chunk = await js.get_msg(stream, seq=seq, subject=chunks, direct=True, next=True)
        except nats.js.errors.NotFoundError:
            break  # fewer bytes stored than the reference says
        data += chunk.data or b""
        seq = chunk.seq + 1
    if len(data) != ref.size or hashlib.sha256(data).hexdigest() != ref.sha256:
        raise BlobMismatch(f"blob {ref.bucket}/{ref.name} does not match its reference (size or sha256)")
    return bytes(data)


async def take(js: JetStreamContext, ref: BlobRef) -> bytes:
    """The object ``ref`` names, read once: the reader that gets it deletes it, and every other
    reader, concurrent or later, gets ``BlobMismatch``.

    The delete is the object store's (a meta record saying ``deleted``), published only if the
    meta record is still the one this reader found (``Nats-Expected-Last-Subject-Sequence``), so
    of two readers racing exactly one wins. The chunks lapse with the bucket's TTL: writers hold
    no purge right.
    """
    subject = _meta_subject(ref.bucket, ref.name)
    try:
        found = await js.get_last_msg(blob_stream(ref.bucket), subject, direct=True)
    except nats.js.errors.NotFoundError:
        raise BlobMismatch(f"blob {ref.bucket}/{ref.name} not found") from None
    data = await get(js, ref)
    tombstone = {"name": ref.name, "bucket": ref.bucket, "deleted": True, "size": 0, "chunks": 0,
                 "mtime": datetime.now(timezone.utc).isoformat()}
    headers = {"Nats-Rollup": "sub", "Nats-Expected-Last-Subject-Sequence": str(found.seq)}
    try:
        await js.publish(subject, json.dumps(tombstone).encode(), headers=headers)
    except nats.js.errors.BadRequestError as exc:
        if exc.err_code != _WRONG_LAST_SEQUENCE:
            raise
        raise BlobMismatch(f"blob {ref.bucket}/{ref.name} was taken by another reader") from None
    return data


async def outline(js: JetStreamContext, envelope: Envelope, threshold: int) -> Envelope:
    """``envelope`` as it is to be sealed: its body moved to ``tg_blobs`` if it encodes larger than ``threshold``."""
    data = encode(envelope.body)
    if len(data) <= threshold:
        return envelope
    ref = await put(js, REQUEST_BLOBS_BUCKET, envelope.id, data)
    return msgspec.structs.replace(envelope, body=None, blob=ref)


async def inline(js: JetStreamContext, envelope: Envelope) -> Envelope:
    """A verified ``envelope`` with its body: fetched and checked if it came as a blob.

    Raises ``BadEnvelope`` (terminated unrun, unbilled) if the blob is missing, differs from
    the signed reference, or does not decode as a request body.
    """
    if (envelope.body is None) == (envelope.blob is None):
        raise BadEnvelope("an envelope carries either a body or a blob reference, and only one")
    if envelope.blob is None:
        return envelope
    if envelope.blob.bucket != REQUEST_BLOBS_BUCKET:
        raise BadEnvelope(f"request bodies are not kept in bucket {envelope.blob.bucket!r}")
    try:
        body = _body_decoder.decode(await get(js, envelope.blob))
    except BlobMismatch as exc:
        raise BadEnvelope(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise BadEnvelope(f"malformed body blob: {exc}") from None
    return msgspec.structs.replace(envelope, body=body)


async def store_result(js: JetStreamContext, request_id: str, data: bytes) -> BlobRef:
    """Store a result too large for the final frame (worker side); send the reference as ``Final.blob``."""
    return await put(js, RESULT_BLOBS_BUCKET, request_id, data)


async def read_result(js: JetStreamContext, final: Final) -> bytes | None:
    """The result ``final`` refers to (publisher side), checked against its reference; None if it has none."""
    if final.blob is None:
        return None
    if final.blob.bucket != RESULT_BLOBS_BUCKET:
        raise WorkerFailed(f"The worker's result names bucket {final.blob.bucket!r}, which holds no results.")
    try:
        return await get(js, final.blob)
    except BlobMismatch:
        raise WorkerFailed("The worker's result was lost or altered on its way.") from None
