"""`url` image results: stored in the object store, handed out behind expiring signed links.

A link names the stored PNG (its ``BlobRef``: bucket, name, size and sha256), when it
expires, and the edge that made it, signed with that edge's Ed25519 key. Any edge of the
deployment serves it: the signer must be in the issuer registry as an edge. A link works
once: the download that gets the image deletes it (``bus.blobs.take``), so a link that
leaked after use gives nothing. It needs no API key, as OpenAI's do not.

Refusals: a link that is not one of ours or was altered is a 403, one past its expiry or
already used is a 404.
"""

from __future__ import annotations

import base64
import binascii
import time

import msgspec
import nats.js.errors
from aiohttp import web

from bus import blobs
from bus.errors import JS_STREAM_FULL, NotFound, PermissionDenied, QueueFull
from bus.protocol import BlobRef, IssuerGrant, Seconds
from bus.publisher import Publisher
from bus.signing import signature_valid
from bus.subjects import ISSUERS_BUCKET, RESULT_BLOBS_BUCKET
from edge.state import PUBLISHER, SETTINGS

routes = web.RouteTableDef()
_MAX_TOKEN = 2048  # a link's token is a few hundred characters: anything longer is not one


class ImageLink(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """What a link's signature covers."""

    ref: BlobRef
    expires: Seconds
    issuer: str  # the signing edge's public key


_decode_link = msgspec.msgpack.Decoder(ImageLink).decode
_decode_grant = msgspec.msgpack.Decoder(IssuerGrant).decode


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_link(publisher: Publisher, ref: BlobRef, expires: float) -> str:
    """The token of a link to ``ref`` that works until ``expires`` (unix seconds)."""
    claim = msgspec.msgpack.encode(ImageLink(ref, expires, publisher.identity.public_key))
    return f"{_b64(claim)}.{publisher.identity.sign(claim).rstrip('=')}"


async def store(request: web.Request, request_id: str, pngs: list[bytes]) -> list[str]:
    """Store a request's images and return a signed link to each, for this request's host (or
    ``edge.public_url``)."""
    publisher: Publisher = request.config_dict[PUBLISHER]
    settings = request.config_dict[SETTINGS]
    # A link outliving the stored object would only ever give a 404.
    expires = time.time() + min(settings.edge.image_link_ttl_s, settings.max_deadline_s)
    base = (settings.edge.public_url or str(request.url.origin())).rstrip("/")
    urls = []
    for i, data in enumerate(pngs):
        try:
            ref = await blobs.put(publisher.js, RESULT_BLOBS_BUCKET, f"{request_id}.image-{i}", data)
        except nats.js.errors.APIError as exc:
            if exc.err_code == JS_STREAM_FULL:
                raise QueueFull("The gateway's store for image links is full right now; ask for b64_json, "
                                "or try again shortly.") from None
            raise
        urls.append(f"{base}/v1/images/files/{sign_link(publisher, ref, expires)}.png")
    return urls


async def _link(publisher: Publisher, token: str) -> ImageLink:
    """The link ``token`` stands for, if an edge of this deployment signed it; else a 403."""
    refused = PermissionDenied("This image link is not valid.", code="invalid_link")
    claim_text, _, signature = token.partition(".")
    try:
        claim = _unb64(claim_text)
        link = _decode_link(claim)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise refused from None
    if not signature_valid(link.issuer, claim, signature + "=" * (-len(signature) % 4)):
        raise refused
    try:
        grant = _decode_grant((await (await publisher.js.key_value(ISSUERS_BUCKET)).get(link.issuer)).value)
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError, msgspec.DecodeError):
        raise refused from None
    if grant.role != "edge" or link.ref.bucket != RESULT_BLOBS_BUCKET:
        raise refused
    return link


@routes.get("/v1/images/files/{token}.png")
async def download(request: web.Request) -> web.Response:
    """The image behind a signed link, once, until the link expires."""
    publisher: Publisher = request.config_dict[PUBLISHER]
    token = request.match_info["token"]
    if len(token) > _MAX_TOKEN:
        raise PermissionDenied("This image link is not valid.", code="invalid_link")
    link = await _link(publisher, token)
    if time.time() > link.expires:
        raise NotFound("This image link has expired.", code="link_expired")
    try:
        data = await blobs.take(publisher.js, link.ref)
    except blobs.BlobMismatch:
        raise NotFound("This image was downloaded already, or is gone: a link works once.", code="link_used") from None
    return web.Response(body=data, content_type="image/png", headers={"Cache-Control": "no-store"})
