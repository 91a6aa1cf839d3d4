"""GET /v1/models: the model objects."""

from __future__ import annotations

import msgspec


class ModelCard(msgspec.Struct):
    id: str
    created: int = 0
    owned_by: str = "tollgate"
    object: str = "model"


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"
