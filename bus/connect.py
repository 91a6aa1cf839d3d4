"""Connecting to NATS as this process's role."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from nats.aio.client import Client
import nats

from bus.settings import NatsSettings

if TYPE_CHECKING:
    from faststream.nats import NatsBroker

# Between two tries of one server. A node that is lost is left for the next in the list at
# once; this only paces the retries when every node is down.
_RECONNECT_WAIT_S = 0.5


async def connect(settings: NatsSettings, name: str, *, service: bool = True) -> Client:
    """A connection with this role's credentials and inbox prefix.

    A long-running ``service`` reconnects for ever; a one-shot command fails fast. Either
    is given every server of the cluster, so it connects, and a service reconnects, to
    whichever node is up.
    """
    auth = {"user": settings.user, "password": settings.password} if settings.user else {}
    return await nats.connect(
        settings.servers, name=name, inbox_prefix=settings.inbox_prefix.encode(),
        max_reconnect_attempts=-1 if service else 0, allow_reconnect=service,
        reconnect_time_wait=_RECONNECT_WAIT_S, **auth,
    )


def broker(settings: NatsSettings, name: str) -> NatsBroker:
    """A FastStream broker connecting as ``connect`` connects a service: for consumers off the hot path.

    Its handlers get the payload's bytes as sent (``apply_types=False``: payloads are msgspec types,
    decoded by the handler, not pydantic models) and what a handler returns answers a request.
    """
    from faststream.nats import NatsBroker  # only the processes that run such consumers load FastStream
    from faststream.security import SASLPlaintext

    security = SASLPlaintext(username=settings.user, password=settings.password) if settings.user else None
    return NatsBroker(settings.servers, name=name, inbox_prefix=settings.inbox_prefix, security=security,
                      max_reconnect_attempts=-1, reconnect_time_wait=_RECONNECT_WAIT_S, apply_types=False,
                      log_level=logging.DEBUG)  # a line per message is too many at INFO

