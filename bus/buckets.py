"""Listing a NATS KV bucket's keys exactly."""

from __future__ import annotations

from nats.js import JetStreamContext


async def bucket_keys(js: JetStreamContext, bucket: str) -> list[str]:
    """Every key written to KV ``bucket`` and not purged, in order (a deleted key's marker keeps it
    listed: reading it says it is gone).

    Read from the bucket stream's subjects, one request, rather than nats-py's ``KeyValue.keys()``:
    that watch ends once the server reports nothing pending, which a client still behind on its
    reads hears before it has the entries, so under load it listed too few (a key just created missing)."""
    prefix = f"$KV.{bucket}."
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"{prefix}>")
    return sorted(subject.removeprefix(prefix) for subject in info.state.subjects or {})
