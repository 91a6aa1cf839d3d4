"""Shared JetStream counters (``Nats-Incr``): atomic adds that every process sees."""

from __future__ import annotations

import msgspec
import nats.js.errors
from nats.js import JetStreamContext

from bus.envelopes import MSG_ID_HEADER


class _Total(msgspec.Struct):
    val: str


async def add(js: JetStreamContext, subject: str, n: int, msg_id: str | None = None) -> int | None:
    """Add ``n`` to a counter and return its new total.

    With ``msg_id`` the add happens once however often it is retried inside the
    stream's dedupe window; a repeat returns None (the total is not reported).
    """
    headers = {"Nats-Incr": f"{n:+d}"}
    if msg_id is not None:
        headers[MSG_ID_HEADER] = msg_id
    ack = await js.publish(subject, b"", headers=headers)
    return None if ack.duplicate else int(ack.val)


async def read(js: JetStreamContext, stream: str, subject: str) -> int:
    """A counter's current total (0 if it was never added to)."""
    try:
        msg = await js.get_last_msg(stream, subject)
    except nats.js.errors.NotFoundError:
        return 0
    return int(msgspec.json.decode(msg.data, type=_Total).val)
