"""GET /openapi.json and /docs: an OpenAPI 3.1 document of every edge route, generated from the
msgspec types each route reads and answers with (``msgspec.json.schema_components``).

The document walks the application's router, so it lists exactly the routes the edge serves;
``OPERATIONS`` says, per route, which types those are. A route missing from it is listed bare
(``x-undocumented``), and tests/test_openapi.py fails until it is described.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import msgspec
from aiohttp import web

from bus.account.budgets import Budget
from bus.account.credits import CreditChange
from bus.account.tenants import Tenant
from bus.anthropic import messages as anthropic
from bus.anthropic.errors import ErrorResponse as AnthropicError
from bus.openai import chat, completions, embeddings, images, models, tokenize
from bus.openai.audio import (SPEECH_CONTENT_TYPES, SpeechRequest, Transcript, TranscriptionRequest, TranslationRequest,
                              VerboseTranscript)
from bus.openai.errors import ErrorResponse
from bus.protocol import CreditEntry, UsageTotals, WorkerAnnouncement
from edge.admin import KeyCreate
from edge.console_routes import DeadLetters, LaneQueue

T = TypeVar("T")
Object = dict[str, Any]  # a JSON object the route builds as a dict (views that leave out secrets)
_DOCS_PAGE = Path(__file__).with_name("static") / "docs.html"
_BINARY = {"type": "string", "contentMediaType": "application/octet-stream"}


class ListOf(msgspec.Struct, Generic[T]):
    """The ``{"object": "list", "data": [...]}`` envelope the list routes answer with."""

    object: Literal["list"]
    data: list[T]


@dataclass(frozen=True)
class Op:
    """What one route reads and answers with, for the document."""

    summary: str
    # Types, or tuples of types a body may be any one of (untagged structs, which a Union cannot hold).
    body: Any = None  # the JSON request body's type
    form: Any = None  # a multipart body's fields' type, beside its ``files``
    files: tuple[str, ...] = ()
    ok: Any = Object  # the success body's type (JSON)
    status: int = 200
    media: tuple[str, ...] = ()  # the success body's media types when it is not JSON (bytes, text)
    events: Any = None  # with ``"stream": true``: the server-sent events' type
    query: tuple[tuple[str, Any], ...] = ()
    auth: Literal["key", "admin", "none"] = "key"
    errors: Any = ErrorResponse
    also: dict[int, str] = field(default_factory=dict)  # other statuses the route answers on success paths


_USAGE_QUERY = (("start", float), ("end", float), ("limit", int), ("group_by", str))
_TEXT = ("text/plain",)

OPERATIONS: dict[tuple[str, str], Op] = {
    ("POST", "/v1/chat/completions"): Op(
        "Create a chat completion", chat.ChatCompletionRequest, ok=chat.ChatCompletion,
        events=(chat.ChatCompletionChunk, chat.ChatCompletionChunkWithUsage)),
    ("POST", "/v1/completions"): Op(
        "Create a (legacy) text completion", completions.CompletionRequest, ok=completions.TextCompletion,
        events=(completions.TextCompletionChunk, completions.TextCompletionChunkWithUsage)),
    ("POST", "/v1/embeddings"): Op("Create embeddings", embeddings.EmbeddingsRequest,
                                   ok=embeddings.EmbeddingsResponse),
    ("POST", "/v1/messages"): Op(
        "Create a message (Anthropic Messages API)", anthropic.MessagesRequest, ok=anthropic.AssistantMessage,
        events=(anthropic.MessageStart, anthropic.ContentBlockStart, anthropic.Ping, anthropic.ContentBlockDelta,
                anthropic.ContentBlockStop, anthropic.MessageDelta, anthropic.MessageStop),
        errors=AnthropicError),
    ("POST", "/v1/messages/count_tokens"): Op("Count a message's input tokens (Anthropic Messages API)",
                                              anthropic.CountTokensRequest, ok=anthropic.TokenCount,
                                              errors=AnthropicError),
    ("POST", "/v1/tokenize"): Op("Token ids of a prompt or of chat messages", tokenize.TokenizeRequest,
                                 ok=tokenize.TokenizeResponse),
    ("POST", "/v1/detokenize"): Op("Text of token ids", tokenize.DetokenizeRequest, ok=tokenize.DetokenizeResponse),
    ("POST", "/v1/audio/transcriptions"): Op("Transcribe audio", form=TranscriptionRequest, files=("file",),
                                             ok=(VerboseTranscript, Transcript), media=_TEXT),
    ("POST", "/v1/audio/translations"): Op("Translate audio into English text", form=TranslationRequest,
                                           files=("file",), ok=(VerboseTranscript, Transcript), media=_TEXT),
    ("POST", "/v1/audio/speech"): Op("Read text aloud", SpeechRequest, ok=None,
                                     media=tuple(sorted({t.split(";")[0] for t in SPEECH_CONTENT_TYPES.values()}))),
    ("POST", "/v1/images/generations"): Op("Create images from a prompt", images.ImageRequest,
                                           ok=images.ImagesResponse),
    ("POST", "/v1/images/edits"): Op("Edit an image (with a mask: inpaint)", form=images.ImageRequest,
                                     files=("image", "image[]", "mask"), ok=images.ImagesResponse),
    ("GET", "/v1/images/files/{token}.png"): Op("Download an image behind a signed `url` result, once",
                                                ok=None, media=("image/png",), auth="none"),
    ("GET", "/v1/models"): Op("List the models this key may use", ok=models.ModelList),
    ("GET", "/v1/models/{model}"): Op("Describe one model", ok=models.ModelCard),
    ("GET", "/v1/usage"): Op("This tenant's usage, totalled", ok=ListOf[UsageTotals], query=_USAGE_QUERY),
    ("GET", "/v1/credits"): Op("This tenant's prepaid credits available"),
    ("GET", "/healthz"): Op("Whether the edge reaches the bus, and which models are served", auth="none",
                            also={503: "degraded: the bus is unreachable"}),
    ("GET", "/openapi.json"): Op("This document", auth="none"),
    ("GET", "/asyncapi.json"): Op("The AsyncAPI 3.0 document of the bus (edge/asyncapi.py)", auth="none"),
    ("GET", "/docs"): Op("A page listing this document's operations", ok=None, media=("text/html",), auth="none"),
    ("POST", "/admin/tenants"): Op("Create a tenant", Tenant, ok=Tenant, status=201, auth="admin"),
    ("GET", "/admin/tenants"): Op("List tenants", ok=ListOf[Tenant], auth="admin"),
    ("GET", "/admin/tenants/{tenant}"): Op("Describe a tenant", ok=Tenant, auth="admin"),
    ("PATCH", "/admin/tenants/{tenant}"): Op("Change a tenant's fields", Object, ok=Tenant, auth="admin"),
    ("POST", "/admin/tenants/{tenant}/keys"): Op("Create an API key (its secret is shown once)", KeyCreate,
                                                 status=201, auth="admin"),
    ("GET", "/admin/keys"): Op("List API keys (never their secrets)", ok=ListOf[Object], query=(("tenant", str),),
                               auth="admin"),
    ("GET", "/admin/keys/{key}"): Op("Describe an API key", auth="admin"),
    ("PATCH", "/admin/keys/{key}"): Op("Change an API key's fields", Object, auth="admin"),
    ("DELETE", "/admin/keys/{key}"): Op("Revoke an API key", auth="admin"),
    ("GET", "/admin/usage"): Op("Usage of every tenant or one, totalled", ok=ListOf[UsageTotals],
                                query=(("tenant", str), *_USAGE_QUERY), auth="admin"),
    ("GET", "/admin/tenants/{tenant}/credits"): Op("A tenant's prepaid credits available", auth="admin"),
    ("POST", "/admin/tenants/{tenant}/credits"): Op("Grant, adjust or refund a tenant's credits", CreditChange,
                                                    ok=CreditEntry, status=202, auth="admin"),
    ("POST", "/admin/budgets"): Op("Create or replace a budget", Budget, status=201, auth="admin"),
    ("GET", "/admin/budgets"): Op("List budgets", ok=ListOf[Object], query=(("tenant", str),), auth="admin"),
    ("DELETE", "/admin/budgets/{budget}"): Op("Delete a budget", auth="admin"),
    ("GET", "/admin/queues"): Op("Requests queued and running per model and lane", ok=ListOf[LaneQueue],
                                 auth="admin", also={503: "the bus did not answer in time"}),
    ("GET", "/admin/workers"): Op("The workers live now", ok=ListOf[WorkerAnnouncement], auth="admin"),
    ("GET", "/admin/dead-letters"): Op("The latest messages moved to the dead letters, with their reasons",
                                       ok=DeadLetters, auth="admin", also={503: "the bus did not answer in time"}),
    ("GET", "/console"): Op("The operator's console page (it signs in with the admin token)", ok=None,
                            media=("text/html",), auth="none"),
    ("GET", "/console/{file}"): Op("The console page's files: its script and style sheet (and the page)", ok=None,
                                   media=("text/html", "text/javascript", "text/css"), auth="none"),
}

_PARAM = re.compile(r"\{(\w+)(?::[^}]*)?\}")
_SECURITY = {"key": [{"apiKey": []}, {"anthropicKey": []}], "admin": [{"adminToken": []}], "none": []}


def routes_of(app: web.Application) -> list[tuple[str, str]]:
    """Every (method, path) the application serves, sub-applications included; HEAD left out (GET's twin)."""
    found = []
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        if "app" in info:
            found += routes_of(info["app"])
        elif route.method not in ("HEAD", "*"):
            found.append((route.method, route.resource.canonical))
    return found


def document(app: web.Application) -> dict:
    """The OpenAPI 3.1 document of ``app``'s routes, schemas from their msgspec types."""
    ops = [(method, path, OPERATIONS.get((method, path))) for method, path in routes_of(app)]
    types: list[Any] = []
    for _, _, op in ops:
        if op is not None:
            for t in (op.body, op.form, op.ok, op.events, op.errors, *(t for _, t in op.query)):
                types += t if isinstance(t, tuple) else [] if t is None else [t]
    schemas, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    schema_of = dict(zip(map(repr, types), schemas))  # types (generic aliases included) told apart by their repr
    paths: dict[str, dict] = {}
    for method, path, op in ops:
        params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                  for name in _PARAM.findall(path)]
        item = paths.setdefault(_PARAM.sub(r"{\1}", path), {})
        if op is None:
            item[method.lower()] = {"summary": "(undocumented)", "x-undocumented": True, "parameters": params,
                                    "responses": {"default": {"description": "undocumented"}}}
            continue
        item[method.lower()] = _operation(method, path, op, params, schema_of, components)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Tollgate", "version": "1", "description": "A multi-tenant AI gateway speaking the OpenAI "
                 "API (and Anthropic's Messages API), with an admin API for tenants, keys, credits and budgets."},
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": {
            "apiKey": {"type": "http", "scheme": "bearer", "description": "A tenant's API key"},
            "anthropicKey": {"type": "apiKey", "in": "header", "name": "x-api-key",
                             "description": "A tenant's API key, as Anthropic's clients send it"},
            "adminToken": {"type": "http", "scheme": "bearer", "description": "The operator's admin token"},
        }},
    }


def _schema(t: Any, schema_of: dict[str, dict]) -> dict:
    """The schema of a type, or of any one of a tuple of types."""
    if isinstance(t, tuple):
        return {"anyOf": [schema_of[repr(one)] for one in t]}
    return schema_of[repr(t)]


def _operation(method: str, path: str, op: Op, params: list[dict], schema_of: dict[str, dict],
               components: dict[str, dict]) -> dict:
    params += [{"name": name, "in": "query", "required": False, "schema": _schema(t, schema_of)} for name, t in op.query]
    content: dict[str, dict] = {}
    if op.ok is not None:
        content["application/json"] = {"schema": _schema(op.ok, schema_of)}
    if op.events is not None:  # the schema of one event: its `data` is JSON of the events' types, or [DONE]
        data = {"type": "string", "contentMediaType": "application/json", "contentSchema": _schema(op.events, schema_of)}
        content["text/event-stream"] = {"schema": {"type": "object", "required": ["data"], "properties": {
            "event": {"type": "string"}, "data": {"anyOf": [{"const": "[DONE]"}, data]}}}}
    for media in op.media:
        content[media] = {"schema": {"type": "string"} if media.startswith("text/") else _BINARY}
    responses = {str(op.status): {"description": "Success", "content": content}}
    for status, description in op.also.items():
        responses[str(status)] = {"description": description, "content": {"application/json": {"schema": {}}}}
    responses["default"] = {"description": "An error", "content": {"application/json": {"schema": _schema(op.errors, schema_of)}}}
    operation = {"operationId": f"{method.lower()}{re.sub(r'[^A-Za-z0-9]+', '_', path)}".rstrip("_"),
                 "summary": op.summary, "tags": [path.split("/")[1]], "parameters": params,
                 "security": _SECURITY[op.auth], "responses": responses}
    if op.body is not None:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": _schema(op.body, schema_of)}}}
    elif op.form is not None:  # the fields' schema with the files beside them (it allows no other property)
        fields = components[_schema(op.form, schema_of)["$ref"].rsplit("/", 1)[1]]
        form = {**fields, "properties": {**fields["properties"], **{name: _BINARY for name in op.files}},
                "required": [*fields.get("required", ()), op.files[0]]}
        operation["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": form}}}
    return operation


routes = web.RouteTableDef()


# Each application's document, made on first ask (tens of milliseconds) and kept: the router is fixed by then.
_documents: weakref.WeakKeyDictionary[web.Application, bytes] = weakref.WeakKeyDictionary()


@routes.get("/openapi.json")
async def openapi_json(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 document of this edge."""
    body = _documents.get(request.app)
    if body is None:
        body = _documents[request.app] = msgspec.json.encode(document(request.app))
    return web.Response(body=body, content_type="application/json")


@routes.get("/docs")
async def docs(request: web.Request) -> web.Response:
    """A self-contained page (no CDN: nothing outside the edge) listing the document's operations."""
    return web.Response(body=_DOCS_PAGE.read_bytes(), content_type="text/html")
