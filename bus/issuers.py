"""The issuer registry: which signing keys may publish work, and for which tenants."""

from __future__ import annotations

import msgspec
import nats.js.errors
from nats.js import JetStreamContext

from bus.protocol import IssuerGrant
from bus.subjects import ISSUERS_BUCKET
from bus.watched import WatchedBucket

_decode = msgspec.msgpack.Decoder(IssuerGrant).decode


async def register_issuer(js: JetStreamContext, public_key: str, grant: IssuerGrant) -> None:
    """Trust ``public_key`` to publish work for ``grant.tenants``."""
    kv = await js.key_value(ISSUERS_BUCKET)
    await kv.put(public_key, msgspec.msgpack.encode(grant))


async def issuer_registered(js: JetStreamContext, public_key: str) -> bool:
    kv = await js.key_value(ISSUERS_BUCKET)
    try:
        await kv.get(public_key)
        return True
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
        return False


async def watch_issuers(js: JetStreamContext) -> WatchedBucket[IssuerGrant]:
    """A started local mirror of the issuer registry."""
    issuers = WatchedBucket(await js.key_value(ISSUERS_BUCKET), _decode)
    await issuers.start()
    return issuers
