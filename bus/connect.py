"""Connecting to NATS as this process's role."""

from __future__ import annotations

from nats.aio.client import Client
import nats

from bus.settings import NatsSettings


async def connect(settings: NatsSettings, name: str, *, service: bool = True) -> Client:
    """A connection with this role's credentials and inbox prefix.

    A long-running ``service`` reconnects for ever; a one-shot command fails fast.
    """
    auth = {"user": settings.user, "password": settings.password} if settings.user else {}
    return await nats.connect(
        settings.url, name=name, inbox_prefix=settings.inbox_prefix.encode(),
        max_reconnect_attempts=-1 if service else 0, allow_reconnect=service, **auth,
    )
