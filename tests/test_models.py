"""GET /v1/models and /v1/models/{id} through the official SDK: what each model serves and costs."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import CHAT_INPUT_PRICE, CHAT_MODEL, CHAT_OUTPUT_PRICE


async def test_a_model_says_what_it_serves_its_context_and_its_prices(client):
    model = await client.models.retrieve(CHAT_MODEL)
    assert model.id == CHAT_MODEL and model.object == "model"
    extra = model.model_extra
    assert extra["endpoints"] == ["/v1/chat/completions", "/v1/completions", "/v1/messages"]
    assert extra["context_length"] == 8192
    assert extra["prices"]["input_token"] == CHAT_INPUT_PRICE and extra["prices"]["output_token"] == CHAT_OUTPUT_PRICE
    listed = {m.id: m for m in (await client.models.list()).data}
    assert listed[CHAT_MODEL].model_extra == extra


async def test_an_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        await client.models.retrieve("no-such-model")
    assert err.value.code == "model_not_found"
