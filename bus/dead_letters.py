"""The dead-letter stream: where a consumer moves what it must not or cannot handle, with the reason.

Usage that fails its checks or that ClickHouse keeps refusing would otherwise be
redelivered for ever and hold up everything behind it; work whose publisher is
gone would be run for nobody. Such a message is
republished on ``tg.dead.<source>`` (stream ``DEADLETTER``) with its original
headers, its subject and the reason, logged as an error, and only then taken
off its own stream: an operator can read it, fix what is wrong and replay it.
"""

from __future__ import annotations

import logging

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from bus.envelopes import MSG_ID_HEADER
from bus.subjects import dead_letter_subject

log = logging.getLogger(__name__)

REASON_HEADER = "Tg-Reason"
SUBJECT_HEADER = "Tg-Subject"
_MAX_REASON = 1000


async def dead_letter(js: JetStreamContext, msg: Msg, source: str, reason: str) -> None:
    """Move ``msg`` to the dead-letter stream with ``reason``, then terminate it where it came from."""
    seq = msg.metadata.sequence.stream
    headers = {k: v for k, v in (msg.headers or {}).items() if not k.startswith("Nats-")}
    headers.update({REASON_HEADER: reason[:_MAX_REASON], SUBJECT_HEADER: msg.subject,
                    MSG_ID_HEADER: f"dead-{source}-{seq}"})  # moved once, however often it is retried
    await js.publish(dead_letter_subject(source), msg.data, headers=headers)
    log.error("dead-lettered a %s message from %s (stream seq %d): %s", source, msg.subject, seq, reason)
    await msg.term()
