"""The Python SDK for internal services that publish straight to NATS.

It signs with the service's own identity (which an operator grants tenants
in the issuer registry) and returns the same typed results as the edge::

    nats_settings = NatsSettings(url="nats://127.0.0.1:4222", user="svc_reports", password=...,
                                 inbox_prefix="_INBOX_svc_reports")
    client = await TollgateClient.connect(nats_settings, seed_path, service="reports", tenant="acme")
    reply = await client.chat("smollm2-135m", [{"role": "user", "content": "Hi"}])
    async for chunk in client.chat_stream("smollm2-135m", messages, include_usage=True):
        ...
"""

from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator

import msgspec

from bus.openai.chat import ChatResults, to_body
from bus.openai.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest
from bus.errors import InvalidRequest
from bus.publisher import Publisher
from bus.openai.service_tier import tier_of
from bus.connect import connect
from bus.settings import MAX_DEADLINE_S, ModelSpec, NatsSettings
from bus.signing import Identity
from bus.subjects import LANES, token
from bus.openai.decoding import decode_json


class TollgateClient:
    def __init__(self, publisher: Publisher, *, tenant: str, principal: str, lane: str,
                 models: dict[str, ModelSpec] | None = None):
        if lane not in LANES:
            raise ValueError(f"unknown lane {lane!r}")
        self._publisher = publisher
        self.tenant, self.principal, self.lane = tenant, principal, lane
        self._models = models or {}

    @classmethod
    async def connect(cls, nats_settings: NatsSettings, seed_path: Path, *, service: str, tenant: str,
                      lane: str = "normal", deadline_s: float = 120.0, silence_s: float = 5.0,
                      models: dict[str, ModelSpec] | None = None,
                      max_deadline_s: float = MAX_DEADLINE_S) -> "TollgateClient":
        """Connect as ``service`` (its replies come on ``tg.reply.<service>.*``), billing ``tenant``.

        ``nats_settings`` carries the service's own NATS user (``svc_<service>``) and inbox prefix.
        """
        if not 0 < deadline_s <= max_deadline_s:
            # The JetStream dedupe window is max_deadline_s: a longer deadline could let a replay run twice.
            raise ValueError(f"deadline_s must be in (0, {max_deadline_s}]")
        nc = await connect(nats_settings, f"tollgate-sdk-{service}")
        publisher = Publisher(nc, Identity.load_or_create(Path(seed_path)), token(service),
                              deadline_s=deadline_s, silence_s=silence_s)
        await publisher.start()
        return cls(publisher, tenant=tenant, principal=f"svc:{service}", lane=lane, models=models)

    async def close(self) -> None:
        await self._publisher.stop()
        await self._publisher.nc.drain()

    def _request(self, model: str, messages: list, stream: bool, params: dict) -> ChatCompletionRequest:
        data = msgspec.json.encode({"model": model, "messages": messages, "stream": stream, **params})
        return decode_json(data, ChatCompletionRequest)

    def _submit(self, req: ChatCompletionRequest, lane: str):
        if lane not in LANES:
            raise InvalidRequest(f"unknown lane {lane!r}; lanes are {', '.join(LANES)}", param="lane")
        return self._publisher.submit(
            tenant=self.tenant, principal=self.principal, model=req.model, lane=lane, kind="chat",
            body=to_body(req, self._models.get(req.model)),
        )

    async def chat(self, model: str, messages: list, *, lane: str | None = None, **params) -> ChatCompletion:
        """One chat completion; raises the same typed errors the edge maps to HTTP."""
        req = self._request(model, messages, False, params)
        lane = lane or self.lane
        async with self._submit(req, lane) as call:
            text = [frame.text async for frame in call.frames()]
            return ChatResults(call.envelope, model, tier_of(lane, self.lane)).completion("".join(text), call.final)

    async def chat_stream(self, model: str, messages: list, *, lane: str | None = None, include_usage: bool = False,
                          **params) -> AsyncIterator[ChatCompletionChunk]:
        """Chunks as the worker produces them; leaving the loop early cancels the request."""
        if include_usage:
            params["stream_options"] = {"include_usage": True}
        req = self._request(model, messages, True, params)
        lane = lane or self.lane
        async with self._submit(req, lane) as call:
            results = ChatResults(call.envelope, model, tier_of(lane, self.lane), include_usage)
            for chunk in results.opening():
                yield chunk
            async for frame in call.frames():
                if frame.text:
                    yield results.delta(frame.text)
            for chunk in results.closing(call.final):
                yield chunk
