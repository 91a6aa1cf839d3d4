"""POST /v1/completions (legacy) on the bus: the OpenAI wire types, request -> body, frames -> results.

One choice per request (``n`` = 1): ``prompt`` may be a string or a list holding one
string; a longer list is a 400, since serving it would need several choices.
``max_tokens`` defaults to 16, as OpenAI's does for this endpoint.
"""

from __future__ import annotations

from typing import Annotated, Union

import msgspec
from msgspec import Meta

from bus.account.prices import Charge, Units
from bus.errors import InvalidRequest
from bus.openai.chat import CompletionUsage, StreamOptions, usage_of
from bus.protocol import CompletionBody, Envelope, Final
from bus.openai.unsupported import UnsupportedCompletionOptions, refuse_unsupported
from bus.settings import ModelSpec

# OpenAI's default for this endpoint: the legacy API completes a few words unless asked for more.
DEFAULT_MAX_TOKENS = 16
# Special tokens a tokenizer may add around a raw prompt (BOS, EOS).
_SPECIAL_TOKENS = 8


class CompletionRequest(UnsupportedCompletionOptions, forbid_unknown_fields=True):
    model: str
    prompt: Union[str, Annotated[list[str], Meta(min_length=1)]]
    max_tokens: Annotated[int, Meta(ge=1, le=2**31 - 1)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(gt=0, le=1)] | None = None
    stop: Union[str, Annotated[list[str], Meta(max_length=4)], None] = None
    seed: Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)] | None = None
    echo: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Meta(ge=1, le=1)] | None = None
    user: str | None = None


# -- responses ----------------------------------------------------------------


class CompletionChoice(msgspec.Struct):
    text: str
    finish_reason: str | None = None  # null until a stream's last chunk
    index: int = 0
    logprobs: None = None


class TextCompletion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage
    object: str = "text_completion"
    system_fingerprint: None = None


class TextCompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    object: str = "text_completion"
    system_fingerprint: None = None


class TextCompletionChunkWithUsage(TextCompletionChunk):
    """A chunk when ``stream_options.include_usage`` is set: ``usage`` is null until the last."""

    usage: CompletionUsage | None = None


def to_body(req: CompletionRequest, spec: ModelSpec) -> CompletionBody:
    """The bus form of a validated completions request, with the model's sampling defaults filled in."""
    if spec.kind != "chat":  # only text-generating models complete; its workers would refuse it unrun
        raise InvalidRequest(f"The model '{req.model}' does not complete text; it serves {spec.kind}.",
                             param="model", code="model_not_supported")
    if spec.vision:  # vision models serve chat alone
        raise InvalidRequest(f"The model '{req.model}' reads images: use chat completions.",
                             param="model", code="model_not_supported")
    refuse_unsupported(req)
    if isinstance(req.prompt, list) and len(req.prompt) > 1:
        raise InvalidRequest("One prompt per request: this gateway returns a single choice (n = 1).",
                             param="prompt")
    prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
    if not prompt:
        raise InvalidRequest("prompt must not be empty.", param="prompt")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(not s for s in stop):
        raise InvalidRequest("Stop sequences must not be empty.", param="stop")
    if req.stream_options is not None and not req.stream:
        raise InvalidRequest("stream_options is only allowed when stream is true.", param="stream_options")
    max_tokens = req.max_tokens or DEFAULT_MAX_TOKENS
    if max_tokens > spec.context_tokens:
        # Refused before admission: a cap the model can never reach would only reserve quota.
        raise InvalidRequest(f"max_tokens is {max_tokens}, more than this model's context of "
                             f"{spec.context_tokens} tokens.", param="max_tokens", code="context_length_exceeded")
    return CompletionBody(
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=spec.temperature if req.temperature is None else req.temperature,
        top_p=spec.top_p if req.top_p is None else req.top_p,
        stop=stop,
        seed=req.seed,
        echo=req.echo,
        stream=req.stream,
    )


def charge(body: CompletionBody) -> Charge:
    """The token estimate (~4 characters a token, plus the cap) and the most ``body`` can use: every
    prompt byte a token (byte-level tokenizers spend at least a byte a token) and its whole cap."""
    return Charge(tokens=len(body.prompt) // 4 + body.max_tokens,
                  max_units=Units(input_tokens=len(body.prompt.encode()) + _SPECIAL_TOKENS,
                                  output_tokens=body.max_tokens))


class CompletionResults:
    """Builds the OpenAI objects for one request: a whole text completion, or its stream of chunks."""

    def __init__(self, envelope: Envelope, model: str, include_usage: bool = False):
        self.id = "cmpl-" + envelope.id
        self.created = int(envelope.created)
        self.model = model
        self._chunk = TextCompletionChunkWithUsage if include_usage else TextCompletionChunk

    def completion(self, text: str, final: Final) -> TextCompletion:
        choice = CompletionChoice(text, final.finish_reason)
        return TextCompletion(self.id, self.created, self.model, [choice], usage_of(final))

    def opening(self) -> list[TextCompletionChunk]:
        return []  # text completions stream no role chunk: the first chunk carries text

    def delta(self, text: str) -> TextCompletionChunk:
        return self._chunk(self.id, self.created, self.model, [CompletionChoice(text)])

    def closing(self, final: Final) -> list[TextCompletionChunk]:
        """The finish chunk, then the usage chunk when ``include_usage`` was asked for."""
        chunks = [self._chunk(self.id, self.created, self.model, [CompletionChoice("", final.finish_reason)])]
        if self._chunk is TextCompletionChunkWithUsage:
            chunks.append(self._chunk(self.id, self.created, self.model, [], usage=usage_of(final)))
        return chunks
