"""Listing a NATS KV bucket's keys exactly."""

from __future__ import annotations

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue


async def bucket_keys(js: JetStreamContext, bucket: str) -> list[str]:
    """Every key written to KV ``bucket`` and not purged, in order (a deleted key's marker keeps it
    listed: reading it says it is gone).

    Read from the bucket stream's subjects, one request, rather than nats-py's ``KeyValue.keys()``:
    that watch ends once the server reports nothing pending, which a client still behind on its
    reads hears before it has the entries, so under load it listed too few (a key just created missing)."""
    prefix = f"$KV.{bucket}."
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"{prefix}>")
    return sorted(subject.removeprefix(prefix) for subject in info.state.subjects or {})


async def bucket_values(js: JetStreamContext, kv: KeyValue, bucket: str) -> list[bytes]:
    """The value of every key in ``kv`` (the KV ``bucket``), in key order; keys deleted since listed are left out."""
    values = []
    for key in await bucket_keys(js, bucket):
        try:
            values.append((await kv.get(key)).value)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            continue  # deleted: its marker keeps the key listed
    return values
