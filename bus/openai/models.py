"""GET /v1/models and /v1/models/{id}: model objects that also say what each model serves and costs."""

from __future__ import annotations

import msgspec

from bus.account.prices import Prices
from bus.settings import ModelSpec

# The generating routes each kind of model answers (a vision model chats, but completes no bare prompt).
ENDPOINTS_BY_KIND = {"chat": ["/v1/chat/completions", "/v1/completions", "/v1/messages"],
                     "embeddings": ["/v1/embeddings"],
                     "transcription": ["/v1/audio/transcriptions", "/v1/audio/translations"],
                     "speech": ["/v1/audio/speech"], "images": ["/v1/images/generations", "/v1/images/edits"]}
_VISION_ENDPOINTS = ["/v1/chat/completions", "/v1/messages"]


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
    endpoints = _VISION_ENDPOINTS if spec.vision else ENDPOINTS_BY_KIND[spec.kind]
    return ModelCard(name, endpoints=endpoints, context_length=spec.context_tokens,
                     prices=spec.prices)
