"""POST /v1/embeddings on the bus: the OpenAI wire types, request -> body, final frame -> response.

Shared by the edge and the SDK. Vectors travel as little-endian float32 bytes
(``bus.protocol.EmbeddingsResult``); ``base64`` is those bytes base64-encoded, which is
what the openai SDK (which asks for base64 by default) decodes, and ``float`` the same
float32 values as JSON numbers, so both formats give the very same vectors.
"""

from __future__ import annotations

import base64
import struct
from typing import Annotated, Literal, Union

import msgspec
from msgspec import Meta

from bus.account.prices import Charge, Units
from bus.errors import InvalidRequest
from bus.protocol import EmbeddingsBody, EmbeddingsResult, Final, TokenId
from bus.settings import ModelSpec

# OpenAI's limit on inputs in one request.
MAX_INPUTS = 2048
# Special tokens a tokenizer may add around one input ([CLS] … [SEP], BOS … EOS).
_SPECIAL_TOKENS = 8


class EmbeddingsRequest(msgspec.Struct, forbid_unknown_fields=True):
    model: str
    # A string, a list of strings, a list of token ids, or a list of token-id lists; one kind per request.
    input: Union[str, Annotated[list[Union[str, TokenId, list[TokenId]]], Meta(min_length=1, max_length=MAX_INPUTS)]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Meta(ge=1)] | None = None
    user: str | None = None


class Embedding(msgspec.Struct):
    index: int
    embedding: Union[list[float], str]
    object: str = "embedding"


class EmbeddingsUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(msgspec.Struct):
    data: list[Embedding]
    model: str
    usage: EmbeddingsUsage
    object: str = "list"


def _inputs(value: str | list) -> list[str | list[int]]:
    """The request's inputs as a list of texts or of token-id lists; a mix, or an empty one, is a 400."""
    if isinstance(value, str):
        value = [value]
    elif all(isinstance(item, int) for item in value):
        value = [value]  # one input given as token ids
    kinds = {type(item) for item in value}
    if kinds not in ({str}, {list}):
        raise InvalidRequest("input must be a string, a list of strings, a list of token ids or a list of "
                             "token-id lists, not a mix.", param="input")
    for i, item in enumerate(value):
        if not item:
            raise InvalidRequest(f"input[{i}] is empty: every input needs at least one character or token.",
                                 param="input")
    return value


def to_body(req: EmbeddingsRequest, spec: ModelSpec) -> EmbeddingsBody:
    """The bus form of a validated embeddings request for an embeddings model ``spec``; 400s name the field."""
    if spec.kind != "embeddings":
        raise InvalidRequest(f"The model '{req.model}' does not make embeddings; it serves {spec.kind}.",
                             param="model", code="model_not_supported")
    dimensions = req.dimensions
    if dimensions == spec.dimensions:
        dimensions = None  # the model's own size: nothing to cut
    elif dimensions is not None and not spec.matryoshka:
        raise InvalidRequest(f"This model does not support specifying dimensions: its vectors have "
                             f"{spec.dimensions}.", param="dimensions")
    elif dimensions is not None and dimensions > spec.dimensions:
        raise InvalidRequest(f"dimensions is {dimensions}; this model's vectors have at most {spec.dimensions}.",
                             param="dimensions")
    return EmbeddingsBody(inputs=_inputs(req.input), dimensions=dimensions)


def charge(body: EmbeddingsBody) -> Charge:
    """The token estimate (~4 characters a token) and the most ``body`` can use: every UTF-8 byte of a text
    a token (no tokenizer spends less than a byte a token), every given token id, and the special tokens."""
    estimate = sum(len(x) // 4 if isinstance(x, str) else len(x) for x in body.inputs) + 2 * len(body.inputs)
    bound = sum(len(x.encode()) if isinstance(x, str) else len(x) for x in body.inputs) + _SPECIAL_TOKENS * len(body.inputs)
    return Charge(tokens=estimate, max_units=Units(input_tokens=bound))


_result_decoder = msgspec.msgpack.Decoder(EmbeddingsResult)


def response(final: Final, result: bytes, model: str, encoding_format: str) -> EmbeddingsResponse:
    """The OpenAI response for a final frame whose encoded ``EmbeddingsResult`` is ``result``."""
    vectors = _result_decoder.decode(result).vectors
    if encoding_format == "base64":
        data = [Embedding(i, base64.b64encode(v).decode()) for i, v in enumerate(vectors)]
    else:
        data = [Embedding(i, list(struct.unpack(f"<{len(v) // 4}f", v))) for i, v in enumerate(vectors)]
    tokens = final.usage.prompt_tokens
    return EmbeddingsResponse(data, model, EmbeddingsUsage(tokens, tokens))
