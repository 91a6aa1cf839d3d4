"""Sealing (encode + sign) and opening (verify + decode) the signed messages of the bus.

Work envelopes are signed by their issuer (an edge or a service); usage reports by
the worker that ran the request, carrying the ticket its issuer signed. Whoever
opens one checks every claim in it before anything is trusted.
"""

from __future__ import annotations

from typing import Callable, Mapping

import msgspec

from bus.errors import BadEnvelope, BadUsage
from bus.protocol import (
    SCHEMA_VERSION, Envelope, IssuerGrant, Ticket, UsageEvent, UsageReport, decode_envelope, decode_report, encode,
)
from bus.signing import ISSUER_HEADER, SIGNATURE_HEADER, Identity, signature_valid
from bus.subjects import request_subject

MSG_ID_HEADER = "Nats-Msg-Id"
TTL_HEADER = "Nats-TTL"
# The issuer's signature of the request's ticket (``Envelope.ticket``), which its usage carries.
TICKET_HEADER = "Tg-Ticket-Sig"
# Clocks of different machines disagree a little; a request created further ahead is refused.
CLOCK_SKEW_S = 60.0

IssuerLookup = Callable[[str], IssuerGrant | None]


def seal(envelope: Envelope, identity: Identity, ttl_s: float) -> tuple[bytes, dict[str, str]]:
    """Encode and sign ``envelope``; return the payload and the headers to publish it with.

    The message id makes JetStream drop a replay; the TTL drops it from the
    queue once its deadline has passed.
    """
    data = encode(envelope)
    headers = identity.headers(data)
    headers[TICKET_HEADER] = identity.sign(encode(envelope.ticket()))
    headers[MSG_ID_HEADER] = envelope.id
    headers[TTL_HEADER] = f"{max(1, int(ttl_s + 0.999))}s"
    return data, headers


def _signed_by(data: bytes, headers: Mapping[str, str], issuer_grant: IssuerLookup, error: type[BadEnvelope]):
    """The signer's key and grant, once its signature over ``data`` checks out."""
    signer = headers.get(ISSUER_HEADER)
    signature = headers.get(SIGNATURE_HEADER)
    if not signer or not signature:
        raise error("unsigned")
    grant = issuer_grant(signer)
    if grant is None:
        raise error(f"unknown signer {signer}")
    if not signature_valid(signer, data, signature):
        raise error(f"bad signature from {signer}")
    return signer, grant


def _check_ticket(ticket: Ticket, signature: str | None, grant: IssuerGrant | None, max_deadline_s: float,
                  error: type[BadEnvelope]) -> None:
    """The checks every admitted request passes, at the worker and again at the meter."""
    if grant is None or grant.role == "worker":
        raise error(f"{ticket.issuer} may not publish work")
    if not grant.may_bill(ticket.tenant):
        raise error(f"issuer {grant.name} may not bill tenant {ticket.tenant}")
    if ticket.hold_micros and grant.role != "edge":
        raise error(f"issuer {grant.name} may not hold credits")
    if not 0 < ticket.deadline - ticket.created <= max_deadline_s:
        # The dedupe window is max_deadline_s: a longer life would let a replay run again.
        raise error(f"deadline must be within {max_deadline_s:g}s of creation")
    if not signature or not signature_valid(ticket.issuer, encode(ticket), signature):
        raise error("bad ticket signature")


def open_envelope(
    data: bytes,
    headers: Mapping[str, str] | None,
    subject: str,
    issuer_grant: IssuerLookup,
    now: float,
    max_deadline_s: float,
) -> Envelope:
    """Verify and decode a work message, or raise ``BadEnvelope`` saying why it must not run.

    The signature is checked over the bytes as received, before decoding, and
    the decoded issuer must match the header: nothing unverified is trusted. The
    lane and model must be the subject's (lanes are priced differently), the reply
    subject the issuer's own, and the deadline within the dedupe window of creation.
    """
    headers = headers or {}
    issuer, grant = _signed_by(data, headers, issuer_grant, BadEnvelope)
    try:
        envelope = decode_envelope(data)
    except msgspec.DecodeError as exc:
        raise BadEnvelope(f"malformed envelope: {exc}") from None
    if envelope.v != SCHEMA_VERSION:
        raise BadEnvelope(f"unsupported schema version {envelope.v}")
    if envelope.issuer != issuer:
        raise BadEnvelope("issuer header does not match the envelope")
    if headers.get(MSG_ID_HEADER) != envelope.id:
        raise BadEnvelope("message id does not match the request id")
    if subject != request_subject(envelope.lane, envelope.model):
        raise BadEnvelope(f"lane {envelope.lane!r} and model {envelope.model!r} do not match subject {subject}")
    reply = envelope.reply.split(".")
    if len(reply) != 4 or reply[:2] != ["tg", "reply"] or reply[3] != envelope.id or not grant.owns_reply(reply[2]):
        raise BadEnvelope(f"reply subject {envelope.reply!r} is not the issuer's")
    if envelope.created > now + CLOCK_SKEW_S:
        raise BadEnvelope("created in the future")
    _check_ticket(envelope.ticket(), headers.get(TICKET_HEADER), grant, max_deadline_s, BadEnvelope)
    if envelope.deadline <= now:
        raise BadEnvelope(f"deadline passed {now - envelope.deadline:.3f}s ago")
    return envelope


def seal_usage(event: UsageEvent, ticket: Ticket, ticket_sig: str, worker: Identity) -> tuple[bytes, dict[str, str]]:
    """Encode a worker's usage report and sign it with the worker's key; the message id is the request's."""
    data = encode(UsageReport(event, ticket, ticket_sig))
    headers = worker.headers(data)
    headers[MSG_ID_HEADER] = event.request_id
    return data, headers


def open_usage(data: bytes, headers: Mapping[str, str] | None, issuer_grant: IssuerLookup,
               max_deadline_s: float) -> UsageEvent:
    """Verify a usage report and return its event, or raise ``BadUsage`` saying why it must not be billed.

    Signed by a registered worker — or, for an answer an edge served from its response cache
    (``cache_hit``), by that edge, the issuer of the request's own ticket; bound to a request a
    trusted issuer admitted (its ticket's signature), for that request's tenant, principal, model,
    lane and hold; its numbers in range (on decode) and its cost within the hold it settles.
    """
    headers = headers or {}
    signer, grant = _signed_by(data, headers, issuer_grant, BadUsage)
    if grant.role not in ("worker", "edge"):
        raise BadUsage(f"{grant.name} is not a worker")
    try:
        report = decode_report(data)
    except msgspec.DecodeError as exc:
        raise BadUsage(f"malformed usage report: {exc}") from None
    event, ticket = report.event, report.ticket
    if grant.role == "edge" and not (event.cache_hit and ticket.issuer == signer):
        # An edge vouches only for what it answered itself, from its cache, for a request it admitted.
        raise BadUsage(f"{grant.name} is not a worker, and this is not a cache hit it served")
    _check_ticket(ticket, report.ticket_sig, issuer_grant(ticket.issuer), max_deadline_s, BadUsage)
    claimed = (event.request_id, event.tenant, event.principal, event.kind, event.model, event.lane,
               event.queued_at, event.hold_micros)
    admitted = (ticket.id, ticket.tenant, ticket.principal, ticket.kind, ticket.model, ticket.lane,
                ticket.created, ticket.hold_micros)
    if claimed != admitted:
        raise BadUsage("the usage does not match the request its issuer admitted")
    if headers.get(MSG_ID_HEADER) != event.request_id:
        raise BadUsage("message id does not match the request id")
    if event.hold_micros and event.cost_micros > event.hold_micros:
        raise BadUsage(f"cost {event.cost_micros} exceeds the hold {event.hold_micros}")
    return event
