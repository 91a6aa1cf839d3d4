"""GET /v1/models and GET /v1/models/{id}: the models a key may use, with what they serve and cost."""

from __future__ import annotations

import msgspec
from aiohttp import web

from bus.errors import ModelNotFound
from bus.openai.models import ModelList, model_card
from edge.state import AUTH, SETTINGS

routes = web.RouteTableDef()


def _json(value) -> web.Response:
    return web.Response(body=msgspec.json.encode(value), content_type="application/json")


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    principal = request.config_dict[AUTH].authenticate(request, "models")
    settings = request.config_dict[SETTINGS]
    names = [*settings.models, *settings.routes]  # a route is listed as the model it stands for
    return _json(ModelList([model_card(name, settings.model(name)) for name in names
                            if principal.policy(name).model_allowed]))


@routes.get("/v1/models/{model}")
async def retrieve_model(request: web.Request) -> web.Response:
    principal = request.config_dict[AUTH].authenticate(request, "models")
    name = request.match_info["model"]
    spec = request.config_dict[SETTINGS].model(name)
    if spec is None or not principal.policy(name).model_allowed:
        raise ModelNotFound(f"The model '{name}' does not exist or you do not have access to it.", param="model")
    return _json(model_card(name, spec))
