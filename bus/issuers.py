"""The issuer registry: which signing keys may publish work, and for which tenants."""

from __future__ import annotations

import msgspec
from nats.js import JetStreamContext

from bus.protocol import IssuerGrant
from bus.subjects import ISSUERS_BUCKET
from bus.watched import WatchedBucket

_decode = msgspec.msgpack.Decoder(IssuerGrant).decode


async def register_issuer(js: JetStreamContext, public_key: str, grant: IssuerGrant) -> None:
    """Trust ``public_key`` to publish work for ``grant.tenants``."""
    kv = await js.key_value(ISSUERS_BUCKET)
    await kv.put(public_key, msgspec.msgpack.encode(grant))


async def watch_issuers(js: JetStreamContext) -> WatchedBucket[IssuerGrant]:
    """A started local mirror of the issuer registry."""
    issuers = WatchedBucket(await js.key_value(ISSUERS_BUCKET), _decode)
    await issuers.start()
    return issuers
