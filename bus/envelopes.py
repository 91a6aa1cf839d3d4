"""Sealing (encode + sign) and opening (verify + decode) work envelopes."""

from __future__ import annotations

from typing import Callable, Mapping

import msgspec

from bus.errors import BadEnvelope
from bus.protocol import SCHEMA_VERSION, Envelope, IssuerGrant, decode_envelope, encode
from bus.signing import ISSUER_HEADER, SIGNATURE_HEADER, Identity, signature_valid

MSG_ID_HEADER = "Nats-Msg-Id"
TTL_HEADER = "Nats-TTL"


def seal(envelope: Envelope, identity: Identity, ttl_s: float) -> tuple[bytes, dict[str, str]]:
    """Encode and sign ``envelope``; return the payload and the headers to publish it with.

    The message id makes JetStream drop a replay; the TTL drops it from the
    queue once its deadline has passed.
    """
    data = encode(envelope)
    headers = identity.headers(data)
    headers[MSG_ID_HEADER] = envelope.id
    headers[TTL_HEADER] = f"{max(1, int(ttl_s + 0.999))}s"
    return data, headers


def open_envelope(
    data: bytes,
    headers: Mapping[str, str] | None,
    issuer_grant: Callable[[str], IssuerGrant | None],
    now: float,
) -> Envelope:
    """Verify and decode a work message, or raise ``BadEnvelope`` saying why it must not run.

    The signature is checked over the bytes as received, before decoding, and
    the decoded issuer must match the header: nothing unverified is trusted.
    """
    headers = headers or {}
    issuer = headers.get(ISSUER_HEADER)
    signature = headers.get(SIGNATURE_HEADER)
    if not issuer or not signature:
        raise BadEnvelope("unsigned")
    grant = issuer_grant(issuer)
    if grant is None:
        raise BadEnvelope(f"unknown issuer {issuer}")
    if not signature_valid(issuer, data, signature):
        raise BadEnvelope(f"bad signature from {issuer}")
    try:
        envelope = decode_envelope(data)
    except msgspec.DecodeError as exc:
        raise BadEnvelope(f"malformed envelope: {exc}") from None
    if envelope.v != SCHEMA_VERSION:
        raise BadEnvelope(f"unsupported schema version {envelope.v}")
    if envelope.issuer != issuer:
        raise BadEnvelope("issuer header does not match the envelope")
    if not grant.may_bill(envelope.tenant):
        raise BadEnvelope(f"issuer {grant.name} may not bill tenant {envelope.tenant}")
    if headers.get(MSG_ID_HEADER) != envelope.id:
        raise BadEnvelope("message id does not match the request id")
    if envelope.deadline <= now:
        raise BadEnvelope(f"deadline passed {now - envelope.deadline:.3f}s ago")
    return envelope
