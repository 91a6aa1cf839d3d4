"""Everything that crosses a process boundary on the bus, as msgspec Structs.

Envelopes and frames are MessagePack; the request body and frames are tagged
unions so new kinds extend them without breaking old peers' decoding of the
kinds they know.
"""

from __future__ import annotations

from typing import Literal, Union

import msgspec

from bus.errors import ErrorInfo

SCHEMA_VERSION = 1


# -- request bodies ---------------------------------------------------------


class ChatMessage(msgspec.Struct, frozen=True):
    role: str
    content: str


class ChatBody(msgspec.Struct, tag="chat", frozen=True):
    """A chat completion request, already validated by its publisher."""

    messages: list[ChatMessage]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = []
    seed: int | None = None
    # False: the worker sends heartbeats and one final frame holding the whole text.
    stream: bool = True


RequestBody = Union[ChatBody]


class Envelope(msgspec.Struct, frozen=True):
    """One unit of work, signed by its issuer over its exact MessagePack bytes."""

    id: str
    tenant: str
    principal: str
    issuer: str
    kind: str
    model: str
    lane: str
    created: float  # unix seconds
    deadline: float  # unix seconds; past it the work is dropped unrun
    reply: str
    body: RequestBody
    trace: dict[str, str] = {}
    v: int = SCHEMA_VERSION
    # Micro-credits held for this request at admission (prepaid tenants); settled from its usage.
    hold_micros: int = 0


# -- reply frames (core NATS, tg.reply.<edge>.<request>) ---------------------


class Usage(msgspec.Struct, frozen=True):
    prompt_tokens: int
    completion_tokens: int


class Started(msgspec.Struct, tag="started", frozen=True):
    seq: int
    worker: str


class Heartbeat(msgspec.Struct, tag="hb", frozen=True):
    seq: int


class Delta(msgspec.Struct, tag="delta", frozen=True):
    seq: int
    text: str


class Final(msgspec.Struct, tag="final", frozen=True):
    seq: int
    finish_reason: str
    usage: Usage
    text: str = ""  # text not yet sent as deltas


class Failed(msgspec.Struct, tag="error", frozen=True):
    seq: int
    error: ErrorInfo


Frame = Union[Started, Heartbeat, Delta, Final, Failed]


# -- usage events (JetStream USAGE, tg.usage.<tenant>) -----------------------


class UsageEvent(msgspec.Struct, frozen=True):
    """Exactly one per request that a worker accepted; the basis of all billing."""

    request_id: str
    tenant: str
    principal: str
    model: str
    kind: str
    lane: str
    queued_at: float
    started_at: float
    first_token_at: float | None
    finished_at: float
    input_units: int
    output_units: int
    unit: str
    cost_micros: int
    status: str  # ok | error | cancelled
    cache_hit: bool
    worker_id: str
    error_code: str | None = None
    hold_micros: int = 0  # copied from the envelope: what the meter settles against cost_micros


# -- credits (JetStream EVENTS tg.event.credit.<tenant>, HOLDS tg.hold.<tenant>) --

class CreditEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One immutable change to a tenant's credits; debits come from usage events instead."""

    id: str  # its Nats-Msg-Id and ledger key: retrying a change with the same id applies it once
    tenant: str
    kind: Literal["grant", "topup", "refund", "expire"]
    amount_micros: int  # signed: expiries are negative
    at: float
    expires_at: float | None = None  # grants that lapse; spent before grants that do not
    grant_id: str | None = None  # expire: the grant whose unspent rest lapsed
    request_id: str | None = None  # refund: the request refunded
    note: str = ""


class HoldNotice(msgspec.Struct, frozen=True):
    """An edge's word that it holds credits for a request; billing releases them if no usage ever comes."""

    request_id: str
    tenant: str
    hold_micros: int
    deadline: float


class BudgetAlert(msgspec.Struct, frozen=True):
    """A budget crossed one threshold in one period (``tg.event.budget.<tenant>``)."""

    id: str  # budget, period and threshold: the one alert there may be for them
    budget_id: str
    tenant: str
    key: str | None
    threshold: int  # percent
    period: str
    spent_micros: int
    amount_micros: int
    mode: str
    at: float


# -- usage queries (request-reply to billing, tg.billing.usage) --------------

USAGE_GROUPS = ("tenant", "principal", "model", "lane", "status", "hour", "day")


class UsageQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Sums of usage between ``start`` and ``end`` (unix seconds), grouped as asked."""

    tenant: str | None = None  # None: every tenant (admin only)
    start: float | None = None
    end: float | None = None
    group_by: list[str] = []
    limit: int = 1000


class UsageTotals(msgspec.Struct, frozen=True):
    group: dict[str, str]
    requests: int
    input_units: int
    output_units: int
    cost_micros: int


class UsageAnswer(msgspec.Struct, frozen=True):
    data: list[UsageTotals] = []
    error: ErrorInfo | None = None


# -- worker liveness (KV tg_workers) ------------------------------------------


class WorkerAnnouncement(msgspec.Struct, frozen=True):
    worker_id: str
    model: str
    started: float


# -- issuer registry (KV tg_issuers) ------------------------------------------


class IssuerGrant(msgspec.Struct, frozen=True):
    """Who may publish work, and for which tenants (``"*"`` for any)."""

    name: str
    tenants: list[str]

    def may_bill(self, tenant: str) -> bool:
        return "*" in self.tenants or tenant in self.tenants


_envelope_encoder = msgspec.msgpack.Encoder()
_envelope_decoder = msgspec.msgpack.Decoder(Envelope)
_frame_decoder = msgspec.msgpack.Decoder(Frame)
_usage_decoder = msgspec.msgpack.Decoder(UsageEvent)
_credit_decoder = msgspec.msgpack.Decoder(CreditEntry)
_hold_decoder = msgspec.msgpack.Decoder(HoldNotice)
_alert_decoder = msgspec.msgpack.Decoder(BudgetAlert)

encode = _envelope_encoder.encode


def decode_envelope(data: bytes) -> Envelope:
    return _envelope_decoder.decode(data)


def decode_frame(data: bytes) -> Frame:
    return _frame_decoder.decode(data)


def decode_usage(data: bytes) -> UsageEvent:
    return _usage_decoder.decode(data)


def decode_credit(data: bytes) -> CreditEntry:
    return _credit_decoder.decode(data)


def decode_hold(data: bytes) -> HoldNotice:
    return _hold_decoder.decode(data)


def decode_alert(data: bytes) -> BudgetAlert:
    return _alert_decoder.decode(data)
