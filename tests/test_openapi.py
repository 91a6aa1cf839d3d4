"""The OpenAPI document: OpenAPI 3.1, every route of the edge in it, served with a docs page, and the
live edge fuzzed against it by schemathesis (no 5xx; answers as the document says)."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, strategies as st
from schemathesis import GenerationMode
from schemathesis.core.failures import FailureGroup
from schemathesis.checks import (content_type_conformance, not_a_server_error, response_schema_conformance,
                                 status_code_conformance)

from edge.app import create_app
from edge.openapi import routes_of
from tests.conftest import ADMIN_TOKEN, CHAT_MODEL, EMBED_MODEL

EXAMPLES = 15  # per operation and generation mode: ~1,000 requests in all, under a minute on 2 cores
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# Admin writes that would leave random tenants and budgets in the session's stack for later tests:
# fuzzed with a tenant's key instead (refused), so only their authorization path runs.
ADMIN_WRITES_KEPT_OUT = {("POST", "/admin/tenants"), ("POST", "/admin/budgets")}
# Routes whose generated bodies are, half the time, sent to a model the session's stack serves.
SERVED_MODELS = {path: CHAT_MODEL for path in ("/v1/chat/completions", "/v1/completions", "/v1/messages",
                                                "/v1/messages/count_tokens", "/v1/tokenize", "/v1/detokenize")}
SERVED_MODELS["/v1/embeddings"] = EMBED_MODEL
GENERATING = ("/v1/chat/completions", "/v1/completions", "/v1/messages")


@pytest.fixture(scope="module")
async def document(stack) -> dict:
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.base_url + "/openapi.json") as resp:
            assert resp.status == 200 and resp.content_type == "application/json"
            return await resp.json()


def _refs(node):
    """Every $ref in ``node``, depth first."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_document_is_openapi_3_1(document):
    assert document["openapi"] == "3.1.0"
    assert document["info"]["title"] and document["info"]["version"]
    schemes = document["components"]["securitySchemes"]
    operation_ids = []
    for path, item in document["paths"].items():
        assert path.startswith("/")
        for method, op in item.items():
            assert method in ("get", "put", "post", "delete", "patch")
            assert op["responses"] and op["summary"]
            operation_ids.append(op["operationId"])
            declared = {p["name"] for p in op["parameters"] if p["in"] == "path"}
            assert declared == set(re.findall(r"\{(\w+)\}", path))
            assert all(name in schemes for requirement in op["security"] for name in requirement)
    assert len(operation_ids) == len(set(operation_ids))
    for ref in _refs(document):  # every reference resolves inside the document
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in document["components"]["schemas"]
    # generated from the msgspec types: a field's bounds come through
    chat = document["components"]["schemas"]["ChatCompletionRequest"]
    assert "model" in chat["required"] and chat["additionalProperties"] is False


def test_document_lists_every_route_the_edge_serves(stack, document):
    served = {(method, re.sub(r"\{(\w+)(?::[^}]*)?\}", r"{\1}", path))
              for method, path in routes_of(create_app(stack.settings))}
    documented = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
    assert served == documented
    undocumented = [(m, p) for p, item in document["paths"].items() for m, op in item.items()
                    if op.get("x-undocumented")]
    assert not undocumented, f"routes with no entry in edge.openapi.OPERATIONS: {undocumented}"


async def test_docs_page_is_served_whole_from_the_edge(stack):
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.base_url + "/docs") as resp:
            assert resp.status == 200 and resp.content_type == "text/html"
            page = await resp.text()
    assert "/openapi.json" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing from outside the edge


def _served_model(case, path: str) -> None:
    """Point a generated body at a model the stack serves, answering in a few tokens, so the run
    reaches the workers and not only the 404 of a model nobody configured."""
    model = SERVED_MODELS.get(path)
    if model is None or not isinstance(case.body, dict) or "model" not in case.body:
        return
    case.body["model"] = model
    if path in GENERATING:
        case.body.pop("max_completion_tokens", None)
        case.body["max_tokens"] = 2  # the small CPU model answers in a second or so


def _fuzz(schema, method: str, path: str, mode: GenerationMode, base_url: str, token: str) -> str | None:
    """Run one operation's examples; the first failure's report, or None."""
    operation = schema[path][method]

    @hypothesis.settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                         phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode), served=st.booleans())
    def run(case, served):
        if served and mode is GenerationMode.POSITIVE:
            _served_model(case, path)
        case.call_and_validate(base_url=base_url, headers={"Authorization": f"Bearer {token}"}, checks=CHECKS,
                               timeout=60)

    try:
        run()
    except hypothesis.errors.Unsatisfiable:
        return None  # nothing to make invalid: an operation with no body and free-form parameters
    except (Exception, FailureGroup) as exc:  # schemathesis's failures are a BaseExceptionGroup
        return f"{method} {path} ({mode.value}): {exc}"
    return None


async def test_schemathesis_finds_no_server_error_and_no_answer_off_the_document(stack, meter, document):
    schema = schemathesis.openapi.from_dict(document)
    failures = []
    for path, item in document["paths"].items():
        for method in item:
            admin = path.startswith("/admin") and (method.upper(), path) not in ADMIN_WRITES_KEPT_OUT
            token = ADMIN_TOKEN if admin else stack.api_key
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                # In a thread: billing runs on this event loop, and usage queries need it to answer.
                failure = await asyncio.to_thread(_fuzz, schema, method.upper(), path, mode, stack.base_url, token)
                if failure:
                    failures.append(failure)
    assert not failures, "\n\n".join(failures)


async def test_a_form_part_whose_headers_do_not_parse_is_a_400_not_a_500(stack):
    """Found by the schemathesis run: aiohttp's InvalidHeader from a malformed part escaped as a 500."""
    body = (b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nx\r\n'
            b"--b\r\nnot a header line\r\n\r\nv\r\n--b--\r\n")
    async with aiohttp.ClientSession() as http:
        async with http.post(stack.base_url + "/v1/images/edits", data=body,
                             headers={"Authorization": f"Bearer {stack.api_key}",
                                      "Content-Type": "multipart/form-data; boundary=b"}) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["type"] == "invalid_request_error"
