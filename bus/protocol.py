"""Everything that crosses a process boundary on the bus, as msgspec Structs.

Envelopes and frames are MessagePack; the request body and frames are tagged
unions so new kinds extend them without breaking old peers' decoding of the
kinds they know.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

import msgspec
from msgspec import Meta

from bus.errors import ErrorInfo
from bus.subjects import token as _token

SCHEMA_VERSION = 1

# Every number that crosses the bus is checked where it is decoded: finite and in range.
# Times are unix seconds up to 2200; amounts fit ClickHouse's Int64 with room to add them up.
Seconds = Annotated[float, Meta(ge=0, le=7_258_118_400.0)]
Micros = Annotated[int, Meta(ge=0, le=2**62)]
Count = Annotated[int, Meta(ge=0, le=2**40)]


# -- request bodies ---------------------------------------------------------


class ChatMessage(msgspec.Struct, frozen=True):
    role: str
    content: str


class ChatBody(msgspec.Struct, tag="chat", frozen=True):
    """A chat completion request, already validated by its publisher."""

    messages: list[ChatMessage]
    max_tokens: Annotated[int, Meta(ge=1, le=2**31 - 1)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(gt=0, le=1)] | None = None
    stop: list[str] = []
    seed: Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)] | None = None
    # False: the worker sends heartbeats and one final frame holding the whole text.
    stream: bool = True


class CompletionBody(msgspec.Struct, tag="completions", frozen=True):
    """A legacy text completion: the raw prompt is continued, no chat template applied."""

    prompt: str
    max_tokens: Annotated[int, Meta(ge=1, le=2**31 - 1)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(gt=0, le=1)] | None = None
    stop: list[str] = []
    seed: Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)] | None = None
    echo: bool = False  # the prompt comes back ahead of the completion
    stream: bool = True


TokenId = Annotated[int, Meta(ge=0, le=2**31 - 1)]


class EmbeddingsBody(msgspec.Struct, tag="embeddings", frozen=True):
    """An embeddings request: one vector per input, in order. An input is a text or a list of
    token ids in the model's own vocabulary."""

    inputs: Annotated[list[Union[str, list[TokenId]]], Meta(min_length=1, max_length=2048)]
    # Shorter vectors than the model's own, where the model allows it; None: its own size.
    dimensions: Annotated[int, Meta(ge=1, le=65_536)] | None = None


RequestBody = Union[ChatBody, EmbeddingsBody, CompletionBody]


class BlobRef(msgspec.Struct, frozen=True):
    """Where a body or result too large for one message lies: an object in a JetStream object store.

    Inside a signed envelope the digest is signed too, so whoever may write the bucket
    still cannot change what a worker runs.
    """

    bucket: str
    name: str
    size: Count
    sha256: Annotated[str, Meta(pattern="^[0-9a-f]{64}$")]  # hex


class Envelope(msgspec.Struct, frozen=True):
    """One unit of work, signed by its issuer over its exact MessagePack bytes."""

    id: str
    tenant: str
    principal: str
    issuer: str
    kind: str
    model: str
    lane: str
    created: Seconds
    deadline: Seconds  # past it the work is dropped unrun
    reply: str
    body: RequestBody | None  # None while it travels as ``blob`` (bus/blobs.py)
    trace: dict[str, str] = {}
    v: int = SCHEMA_VERSION
    # Micro-credits held for this request at admission (prepaid tenants); settled from its usage.
    hold_micros: Micros = 0
    # The encoded body, stored apart when larger than the publisher's blob threshold.
    blob: BlobRef | None = None

    def ticket(self) -> "Ticket":
        """What the issuer vouches it admitted, without the body: the meter checks usage against it."""
        return Ticket(self.id, self.tenant, self.principal, self.issuer, self.kind, self.model, self.lane,
                      self.created, self.deadline, self.hold_micros)


class Ticket(msgspec.Struct, frozen=True, array_like=True):
    """An admitted request as its issuer signed it (header ``Tg-Ticket-Sig``), carried into its usage.

    A usage event is billed only if it matches a ticket signed by a trusted issuer: no one
    can bill a request that was never admitted, or settle a hold that was never taken.
    """

    id: str
    tenant: str
    principal: str
    issuer: str
    kind: str
    model: str
    lane: str
    created: Seconds
    deadline: Seconds
    hold_micros: Micros


# -- reply frames (core NATS, tg.reply.<edge>.<request>) ---------------------


class Usage(msgspec.Struct, frozen=True):
    prompt_tokens: Count
    completion_tokens: Count


class Started(msgspec.Struct, tag="started", frozen=True):
    seq: int
    worker: str


class Heartbeat(msgspec.Struct, tag="hb", frozen=True):
    seq: int


class Delta(msgspec.Struct, tag="delta", frozen=True):
    seq: int
    text: str


class Chunk(msgspec.Struct, tag="chunk", frozen=True):
    """Binary output streamed as it is produced (encoded audio, say): the bytes in order."""

    seq: int
    data: bytes


class Final(msgspec.Struct, tag="final", frozen=True):
    seq: int
    finish_reason: str
    usage: Usage
    text: str = ""  # text not yet sent as deltas
    blob: BlobRef | None = None  # a result too large for one message (bus/blobs.py)
    result: bytes = b""  # a kind's own encoded result (``consumers.kinds.Outcome.result``)


class EmbeddingsResult(msgspec.Struct, frozen=True):
    """An embeddings request's ``Final.result``: one vector per input, in order, each as
    little-endian float32 bytes (compact on the bus, and what OpenAI's base64 format carries)."""

    vectors: list[bytes]


class Failed(msgspec.Struct, tag="error", frozen=True):
    seq: int
    error: ErrorInfo


Frame = Union[Started, Heartbeat, Delta, Chunk, Final, Failed]


# -- usage events (JetStream USAGE, tg.usage.<tenant>) -----------------------


class UsageEvent(msgspec.Struct, frozen=True):
    """Exactly one per request that a worker accepted; the basis of all billing."""

    request_id: str
    tenant: str
    principal: str
    model: str
    kind: str
    lane: str
    queued_at: Seconds
    started_at: Seconds
    first_token_at: Seconds | None
    finished_at: Seconds
    input_units: Count
    output_units: Count
    unit: str
    cost_micros: Micros
    status: Literal["ok", "error", "cancelled"]
    cache_hit: bool
    worker_id: str
    error_code: str | None = None
    hold_micros: Micros = 0  # copied from the envelope: what the meter settles against cost_micros


class UsageReport(msgspec.Struct, frozen=True):
    """A usage event as a worker publishes it: with the ticket (and its issuer's signature) of the
    request it ran. The worker signs the report's bytes with its own registered key."""

    event: UsageEvent
    ticket: Ticket
    ticket_sig: str


# -- credits (JetStream EVENTS tg.event.credit.<tenant>, HOLDS tg.hold.<tenant>) --

class CreditEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One immutable change to a tenant's credits; debits come from usage events instead."""

    id: str  # its Nats-Msg-Id and ledger key: retrying a change with the same id applies it once
    tenant: str
    kind: Literal["grant", "topup", "refund", "expire"]
    amount_micros: Annotated[int, Meta(ge=-(2**62), le=2**62)]  # signed: expiries are negative
    at: Seconds
    expires_at: Seconds | None = None  # grants that lapse; spent before grants that do not
    grant_id: str | None = None  # expire: the grant whose unspent rest lapsed
    request_id: str | None = None  # refund: the request refunded
    note: str = ""


class HoldNotice(msgspec.Struct, frozen=True):
    """An edge's word that it holds credits for a request; billing releases them if no usage ever comes."""

    request_id: str
    tenant: str
    hold_micros: Micros
    deadline: Seconds


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


# -- tokenizing (core NATS request-reply to a model's workers, tg.tokenize.<model>) --


class TokenizeAsk(msgspec.Struct, tag="tokenize", frozen=True):
    """Token ids of a raw ``prompt`` (as completions reads it) or of ``messages`` through the chat
    template (as chat reads them); exactly one of the two is set."""

    prompt: str | None = None
    messages: list[ChatMessage] | None = None


class DetokenizeAsk(msgspec.Struct, tag="detokenize", frozen=True):
    """The text of token ids in the model's vocabulary."""

    tokens: list[TokenId]


TokenizerAsk = Union[TokenizeAsk, DetokenizeAsk]


class TokenizeAnswer(msgspec.Struct, frozen=True):
    """A worker's answer: ``tokens`` for a tokenize ask, ``text`` for a detokenize one, or the error."""

    tokens: list[int] = []
    text: str = ""
    error: ErrorInfo | None = None


# -- worker liveness (KV tg_workers) ------------------------------------------


class WorkerAnnouncement(msgspec.Struct, frozen=True):
    worker_id: str
    model: str
    started: float


# -- issuer registry (KV tg_issuers) ------------------------------------------


class IssuerGrant(msgspec.Struct, frozen=True):
    """A trusted signing key: who it is, what it may sign, and for which tenants (``"*"`` for any).

    ``edge``: publishes work and may hold credits for it; ``service``: publishes work (SDK),
    never with a hold; ``worker``: signs the usage of the work it ran, and publishes no work.
    """

    name: str
    tenants: list[str]
    role: Literal["edge", "service", "worker"] = "service"

    def may_bill(self, tenant: str) -> bool:
        return "*" in self.tenants or tenant in self.tenants

    def owns_reply(self, publisher: str) -> bool:
        """Whether replies may go to ``tg.reply.<publisher>.*`` for this issuer's work.

        Edges reply to their own process ids (``edge-…``); a service to its own name,
        the one subject its NATS user may read.
        """
        if self.role == "edge":
            return publisher.startswith("edge-")
        return self.role == "service" and publisher == _token(self.name)


_envelope_encoder = msgspec.msgpack.Encoder()
_report_decoder = msgspec.msgpack.Decoder(UsageReport)
_envelope_decoder = msgspec.msgpack.Decoder(Envelope)
_frame_decoder = msgspec.msgpack.Decoder(Frame)
_credit_decoder = msgspec.msgpack.Decoder(CreditEntry)
_hold_decoder = msgspec.msgpack.Decoder(HoldNotice)
_alert_decoder = msgspec.msgpack.Decoder(BudgetAlert)

encode = _envelope_encoder.encode


def decode_envelope(data: bytes) -> Envelope:
    return _envelope_decoder.decode(data)


def decode_frame(data: bytes) -> Frame:
    return _frame_decoder.decode(data)


def decode_report(data: bytes) -> UsageReport:
    return _report_decoder.decode(data)


def decode_credit(data: bytes) -> CreditEntry:
    return _credit_decoder.decode(data)


def decode_hold(data: bytes) -> HoldNotice:
    return _hold_decoder.decode(data)


def decode_alert(data: bytes) -> BudgetAlert:
    return _alert_decoder.decode(data)
