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


# The most images one chat message may carry on the bus; the edge's own limit (``edge.images``) is lower.
MAX_CHAT_IMAGES = 64


class ChatMessage(msgspec.Struct, frozen=True, omit_defaults=True):
    role: str
    content: str
    # For vision models: the message's images (PNG, JPEG, WebP or GIF, as sent; the edge checked they
    # decode), read before its text. Left out when empty, so text-only messages encode as they always did.
    images: Annotated[list[ImageBytes], Meta(max_length=MAX_CHAT_IMAGES)] = []


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


class TranscriptionBody(msgspec.Struct, tag="transcription", frozen=True):
    """Speech to text: an uploaded audio file, transcribed in its own language or translated to English."""

    # The file as uploaded (wav, mp3, flac, ogg, m4a, webm; the edge decoded it once to check it). The
    # bound is far above any edge's body limit: it caps what a peer can make a worker hold.
    audio: Annotated[bytes, Meta(min_length=1, max_length=256 * 1024 * 1024)]
    task: Literal["transcribe", "translate"] = "transcribe"
    language: Annotated[str, Meta(pattern="^[a-z]{2,3}$")] | None = None  # ISO-639-1; None: detected
    prompt: Annotated[str, Meta(max_length=65_536)] | None = None
    # None or 0: whisper's own schedule, from 0 upwards while a window's text looks wrong.
    temperature: Annotated[float, Meta(ge=0, le=1)] | None = None
    words: bool = False  # word timestamps too


# OpenAI's limit on the text of one speech request.
MAX_SPEECH_CHARACTERS = 4096
SpeechFormat = Literal["mp3", "opus", "aac", "flac", "wav", "pcm"]


class SpeechBody(msgspec.Struct, tag="speech", frozen=True):
    """Text to speech: ``input`` read aloud in one voice, encoded as ``response_format`` and streamed as it is made."""

    input: Annotated[str, Meta(min_length=1, max_length=MAX_SPEECH_CHARACTERS)]
    # The voice in the model's weights (``<voice>.onnx`` for Piper); "": the weights' only voice.
    voice: Annotated[str, Meta(max_length=256)] = ""
    response_format: SpeechFormat = "mp3"
    speed: Annotated[float, Meta(ge=0.25, le=4.0)] = 1.0


# The longest image prompt (OpenAI's for dall-e-3); CLIP text encoders read the first 77 tokens.
MAX_IMAGE_PROMPT_CHARACTERS = 4000
MAX_IMAGES = 10  # images in one request, as OpenAI allows
ImageSide = Annotated[int, Meta(ge=8, le=4096)]
# An uploaded image or mask: bounded far above any edge's body limit, to cap what a peer can make a worker hold.
ImageBytes = Annotated[bytes, Meta(min_length=1, max_length=256 * 1024 * 1024)]


class ImagesBody(msgspec.Struct, tag="images", frozen=True):
    """Images from a prompt: drawn from noise (no ``image``), image-to-image from ``image``, or
    ``image`` repainted where ``mask`` says (inpainting). The edge checked the files decode."""

    prompt: Annotated[str, Meta(max_length=MAX_IMAGE_PROMPT_CHARACTERS)]
    width: ImageSide
    height: ImageSide
    n: Annotated[int, Meta(ge=1, le=MAX_IMAGES)] = 1
    steps: Annotated[int, Meta(ge=1, le=1000)] = 25  # denoising steps, from the request's quality
    image: ImageBytes | None = None  # PNG, JPEG or WebP as uploaded
    mask: ImageBytes | None = None  # same size as ``image``; transparent (or, without alpha, white) = repaint
    seed: Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)] | None = None  # None: drawn fresh; else reproducible

    @property
    def size(self) -> str:
        """The images' size as price tables name it ("512x512")."""
        return f"{self.width}x{self.height}"


RequestBody = Union[ChatBody, EmbeddingsBody, CompletionBody, TranscriptionBody, SpeechBody, ImagesBody]


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
    # Sent on by a route (edge/routing.py): the model name the client asked for, and the request id
    # the client was given (a fallback attempt has an id of its own).
    route: str = ""
    route_request: str = ""

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
    stop: str | None = None  # the stop sequence that ended the text, when one did (finish_reason "stop")


class EmbeddingsResult(msgspec.Struct, frozen=True):
    """An embeddings request's ``Final.result``: one vector per input, in order, each as
    little-endian float32 bytes (compact on the bus, and what OpenAI's base64 format carries)."""

    vectors: list[bytes]


class ImagesResult(msgspec.Struct, frozen=True):
    """An images request's ``Final.result``: the PNGs made, in order."""

    images: Annotated[list[bytes], Meta(min_length=1, max_length=MAX_IMAGES)]


Probability = Annotated[float, Meta(ge=0, le=1)]


class TranscribedWord(msgspec.Struct, frozen=True):
    word: str
    start: Seconds
    end: Seconds
    probability: Probability


class TranscribedSegment(msgspec.Struct, frozen=True):
    """One stretch of speech as whisper decoded it (OpenAI's verbose_json segment)."""

    id: Count
    seek: Count  # the 10 ms frame its 30 s window started at
    start: Seconds
    end: Seconds
    text: str
    tokens: list[TokenId]
    temperature: Probability  # the one its text was sampled at
    avg_logprob: Annotated[float, Meta(ge=-1e6, le=0)]
    compression_ratio: Annotated[float, Meta(ge=0, le=1e6)]
    no_speech_prob: Probability


class TranscriptionResult(msgspec.Struct, frozen=True):
    """A transcription's ``Final.result``: the text, its timings and the audio's length in seconds."""

    text: str
    language: Annotated[str, Meta(max_length=16)]
    duration: Seconds
    segments: list[TranscribedSegment]
    words: list[TranscribedWord] = []  # with ``TranscriptionBody.words``


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
    cached_input_units: Count = 0  # of input_units, those an upstream provider's prompt cache served
    route: str = ""  # copied from the envelope: the route the client named (``model`` is the target that ran)
    route_request_id: str = ""  # the request id the client was given, shared by a route's attempts
    input_images: Count = 0  # images a vision chat model read, priced per image beside its tokens
    # The request's W3C trace id (bus/tracing.py), "" when its envelope carried none.
    trace_id: Annotated[str, Meta(pattern="^([0-9a-f]{32})?$")] = ""


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
