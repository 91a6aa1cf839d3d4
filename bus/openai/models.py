"""GET /v1/models and /v1/models/{id}: model objects that also say what each model serves and costs."""

from __future__ import annotations

import msgspec

from bus.account.prices import Prices
from bus.settings import ModelSpec

# The OpenAI routes each kind of model answers.
ENDPOINTS_BY_KIND = {"chat": ["/v1/chat/completions", "/v1/completions"], "embeddings": ["/v1/embeddings"],
                     "transcription": ["/v1/audio/transcriptions", "/v1/audio/translations"]}


class ModelCard(msgspec.Struct):
    id: str
    created: int = 0
    owned_by: str = "tollgate"
    object: str = "model"
    # Beyond OpenAI's four fields (its SDK keeps extra fields): what a client needs to choose a model.
    endpoints: list[str] = []
    context_length: int | None = None
    prices: Prices | None = None  # micro-credits per unit, before the lane's multiplier


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"


def model_card(name: str, spec: ModelSpec) -> ModelCard:
    """The model object for ``name``."""
    return ModelCard(name, endpoints=ENDPOINTS_BY_KIND.get(spec.kind, []), context_length=spec.context_tokens,
                     prices=spec.prices)
