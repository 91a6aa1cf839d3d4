"""The AsyncAPI document of the bus: valid AsyncAPI 3.0 (checked against the specification's own JSON
schema), every subject and name of bus/subjects.py in it, every role it names as sending or receiving
allowed to by its NATS permissions, served by the edge and written to docs/ as generated, and its
payload schemas true of real messages caught on the live stack during one chat request."""

from __future__ import annotations

import asyncio
import gzip
import inspect
import itertools
import json
import re
from pathlib import Path

import aiohttp
import jsonschema_rs
import msgspec
import pytest

from bus import subjects
from edge.asyncapi import pattern, rendered
from infra.nats.roles import permissions
from tests.conftest import CHAT_MODEL
from tests.test_openapi import _refs

ROOT = Path(__file__).resolve().parent.parent
# The AsyncAPI 3.0.0 JSON schema, from npm @asyncapi/specs 6.11.1 (schemas/3.0.0-without-$id.json, Apache-2.0).
SPEC_SCHEMA = Path(__file__).with_name("data") / "asyncapi-3.0.0-schema.json.gz"
# A sample NATS user per role of the document, and sample values for subject parameters.
NATS_USER = {"edge": "edge", "billing": "billing", "worker": "worker:m", "sdk": "svc:s", "operator": "admin"}
SAMPLE = {"model": "m", "edge_id": "s"}


@pytest.fixture(scope="module")
def document() -> dict:
    return json.loads(rendered())


def _strings(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)
    elif isinstance(node, str):
        yield node


def _resolve(document: dict, ref: str):
    assert ref.startswith("#/"), ref
    node = document
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def test_document_is_valid_asyncapi_3(document):
    spec = jsonschema_rs.Draft7Validator(json.loads(gzip.decompress(SPEC_SCHEMA.read_bytes())))
    errors = [f"{'/'.join(map(str, e.instance_path))}: {e.message[:200]}" for e in spec.iter_errors(document)]
    assert not errors, errors[:5]
    assert document["asyncapi"] == "3.0.0"
    for ref in _refs(document):  # every reference resolves inside the document
        _resolve(document, ref)
    for key, channel in document["channels"].items():
        assert channel["messages"], key
        for message in channel["messages"].values():
            payload = _resolve(document, message["$ref"])["payload"]
            if "$ref" in payload:
                assert _resolve(document, payload["$ref"])["type"] in ("object", "array")
        assert set(channel.get("parameters", {})) == set(re.findall(r"\{(\w+)\}", channel["address"] or ""))
    for key, op in document["operations"].items():
        channel = op["channel"]["$ref"]
        # an operation's messages are its channel's
        assert all(m["$ref"].startswith(channel + "/messages/") for m in op["messages"]), key
    # generated from the msgspec types: a field's bounds come through
    usage = document["components"]["schemas"]["UsageEvent"]
    assert usage["properties"]["cost_micros"]["minimum"] == 0 and "request_id" in usage["required"]


def test_every_subject_and_name_of_bus_subjects_is_in_the_document(document):
    """A subject added to bus/subjects.py without a channel in edge/asyncapi.py fails here."""
    strings = set(_strings(document))
    tokens = {part for s in strings for part in s.split(".")}
    functions = [f for name, f in inspect.getmembers(subjects, inspect.isfunction)
                 if f.__module__ == subjects.__name__ and name != "token"]  # token makes names, not subjects
    assert len(functions) >= 15
    missing = [f.__name__ for f in functions if not any(pattern(f) in s for s in strings)]
    assert not missing, f"bus.subjects functions with no channel in the AsyncAPI document: {missing}"
    constants = {name: value for name, value in vars(subjects).items() if name.isupper() and not name.startswith("_")}
    names = [(name, v) for name, value in constants.items() for v in (value if isinstance(value, tuple) else [value])]
    missing = [name for name, value in names if value not in strings and value not in tokens]
    assert not missing, f"bus.subjects names missing from the AsyncAPI document: {missing}"


def _matches(allowed: str, subject: str) -> bool:
    """Whether the NATS subject pattern ``allowed`` covers ``subject``."""
    want, got = allowed.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(got) > i
        if i >= len(got) or (token != "*" and token != got[i]):
            return False
    return len(want) == len(got)


def _subjects(address: str, parameters: dict) -> list[str]:
    """Concrete subjects of an address: every value of enumerated parameters, a sample for the others."""
    names = re.findall(r"\{(\w+)\}", address)
    choices = [parameters[n].get("enum") or [SAMPLE.get(n, "x")] for n in names]
    return [re.sub(r"\{(\w+)\}", lambda m, it=iter(values): next(it), address) for values in itertools.product(*choices)]


def test_roles_may_send_and_receive_what_the_document_says(document):
    """Who publishes and who consumes is checked against the NATS permissions each role runs with."""
    refused = []
    for key, op in document["operations"].items():
        role = op["tags"][0]["name"]
        allowed = permissions(NATS_USER[role])
        channel = _resolve(document, op["channel"]["$ref"])
        stream = channel.get("x-jetstream-stream")
        candidates = []
        for subject in _subjects(channel["address"], channel.get("parameters", {})):
            if op["action"] == "send":
                candidates.append(("publish", subject))
            elif "x-durable-consumer" in op:  # pulls from a durable consumer
                durable = _subjects(op["x-durable-consumer"], channel.get("parameters", {}))[0]
                candidates.append(("publish", f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"))
            elif stream:  # reads a bucket's entries, or an object's chunks
                candidates.append(("publish", f"$JS.API.DIRECT.GET.{stream}.{subject}"))
            else:  # a core subscription
                candidates.append(("subscribe", subject))
        if not any(_matches(p, s) for direction, s in candidates for p in allowed[direction]):
            refused.append(key)
        if op["action"] == "receive" and "reply" in op and role != "operator":
            assert allowed.get("allow_responses"), f"{key}: answers, but may not publish responses"
    assert not refused, f"operations the role's NATS permissions refuse: {refused}"


def test_docs_asyncapi_json_is_up_to_date():
    """docs/asyncapi.json is what `tollgate docs asyncapi` writes now."""
    assert (ROOT / "docs" / "asyncapi.json").read_text() == rendered(), "run: tollgate docs asyncapi"


def _validator(document: dict, message: str) -> jsonschema_rs.Draft202012Validator:
    payload = document["components"]["messages"][message]["payload"]
    return jsonschema_rs.Draft202012Validator({**payload, "components": document["components"]})


async def test_real_messages_of_one_chat_request_match_the_served_document(stack, client, nc):
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.base_url + "/asyncapi.json") as resp:  # no credentials needed
            assert resp.status == 200 and resp.content_type == "application/json"
            document = await resp.json()
    assert document == json.loads(rendered())
    caught: dict[str, list] = {"work": [], "reply": [], "usage": []}

    def catcher(key: str):
        async def catch(msg):
            caught[key].append(msg)
        return catch

    subs = [await nc.subscribe(wildcard, cb=catcher(key))
            for key, wildcard in (("work", "tg.req.>"), ("reply", "tg.reply.>"), ("usage", "tg.usage.>"))]
    try:
        completion = await client.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "Say hi"}], max_tokens=4)
        request_id = completion.id.removeprefix("chatcmpl-")
        for _ in range(200):  # the worker publishes the usage just after the final frame
            if any(msgspec.msgpack.decode(m.data)["event"]["request_id"] == request_id for m in caught["usage"]):
                break
            await asyncio.sleep(0.05)
    finally:
        for sub in subs:
            await sub.unsubscribe()
    ours = {
        "work": [m for m in caught["work"] if msgspec.msgpack.decode(m.data)["id"] == request_id],
        "reply": [m for m in caught["reply"] if m.subject.endswith("." + request_id)],
        "usage": [m for m in caught["usage"] if msgspec.msgpack.decode(m.data)["event"]["request_id"] == request_id],
    }
    assert len(ours["work"]) == 1 and len(ours["usage"]) == 1 and len(ours["reply"]) >= 2
    for key, msgs in ours.items():
        validator = _validator(document, key)
        required = document["components"]["messages"][key].get("headers", {}).get("required", [])
        for msg in msgs:
            decoded = msgspec.to_builtins(msgspec.msgpack.decode(msg.data))  # bin as base64, as the schema says
            errors = [e.message for e in validator.iter_errors(decoded)]
            assert not errors, (key, errors[:3])
            assert set(required) <= set(msg.headers or {}), (key, required, msg.headers)
            # and no header the document does not name
            assert set(msg.headers or {}) <= set(document["components"]["messages"][key].get("headers", {})
                                                 .get("properties", {})), (key, msg.headers)
    # The schemas have teeth: a cost below zero, or a frame of no known type, is not a valid message.
    usage = msgspec.msgpack.decode(ours["usage"][0].data)
    usage["event"]["cost_micros"] = -1
    assert not _validator(document, "usage").is_valid(usage)
    assert not _validator(document, "reply").is_valid({"type": "surprise", "seq": 0})
