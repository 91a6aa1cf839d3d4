"""GET /asyncapi.json: the AsyncAPI 3.0 document of the bus — every subject, the msgspec type of
what travels on it, its headers, and which parts of the system send and receive it.

Addresses are made by ``bus.subjects``' own functions, called with placeholders, and payload
schemas by ``msgspec.json.schema_components`` from the types the code encodes, so the document
says what the code does; ``CHANNELS`` says, per subject, what travels there and who is on either
end. tests/test_asyncapi.py fails when a subject of ``bus.subjects`` has no channel here, or when a
role named as sending or receiving lacks the NATS permission to (``infra/nats/roles.py``).
``tollgate docs asyncapi`` writes the same document to ``docs/asyncapi.json``.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
from dataclasses import dataclass
from typing import Any, Callable

import msgspec
from aiohttp import web

from bus import tracing
from bus.account.budgets import Budget, BudgetState
from bus.account.tenants import ApiKey, Tenant
from bus.dead_letters import REASON_HEADER, SUBJECT_HEADER
from bus.envelopes import MSG_ID_HEADER, TICKET_HEADER, TTL_HEADER
from bus.protocol import (SCHEMA_VERSION, BudgetAlert, CreditEntry, Envelope, Frame, HoldNotice, IssuerGrant,
                          TokenizeAnswer, TokenizerAsk, UsageAnswer, UsageQuery, UsageReport, WorkerAnnouncement)
from bus.signing import ISSUER_HEADER, SIGNATURE_HEADER
from bus.subjects import (BUDGET_STATE_BUCKET, BUDGETS_BUCKET, CANCEL_WILDCARD, CANCELLED_BUCKET, CREDIT_IDS_BUCKET,
                          CREDITS_STREAM, DEAD_LETTER_STREAM, EVENTS_STREAM, HOLDS_CONSUMER, HOLDS_STREAM,
                          INFLIGHT_BUCKET, ISSUERS_BUCKET, KEYS_BUCKET, LANES, LEDGER_CONSUMER, METER_CONSUMER,
                          PUBLISHERS_BUCKET, RATELIMIT_STREAM, REQUEST_BLOBS_BUCKET, REQUESTS_STREAM,
                          RESPONSE_CACHE_BUCKET, RESULT_BLOBS_BUCKET, TENANTS_BUCKET, USAGE_QUERY_SUBJECT,
                          USAGE_STREAM, WEBHOOKS_CONSUMER, WORKERS_BUCKET, bell_subject, bell_wildcard,
                          budget_event_subject, cache_hit_usage_subject, cancel_subject, credit_counter,
                          credit_event_subject, dead_letter_subject, hold_subject, liveness_key, rate_counter,
                          reply_subject, reply_wildcard, request_subject, tokenize_subject, usage_subject,
                          work_consumer)
from edge.response_cache import CachedAnswer

MSGPACK = "application/msgpack"
_BYTES = "application/octet-stream"
INCR_HEADER = "Nats-Incr"  # JetStream counters (bus/counters.py): the signed amount to add

# Who is on either end of a subject.
ROLES: dict[str, str] = {
    "edge": "The HTTP edge (edge/): admits requests, publishes work, relays replies (NATS user edge)",
    "worker": "A model worker (consumers/): runs one model's work (NATS user worker:<model>)",
    "billing": "Billing (billing/): meter, ledger, holds, budgets, alert webhooks, usage queries (NATS user billing)",
    "sdk": "An internal service publishing work with bus/sdk.py (NATS user svc:<name>)",
    "operator": "An operator's tools: the tollgate CLI, the NATS admin user",
}

HEADERS: dict[str, str] = {
    MSG_ID_HEADER: "JetStream's dedupe id: the same id published again inside the stream's window is dropped",
    TTL_HEADER: "How long JetStream keeps the work queued (its deadline, whole seconds: \"30s\")",
    ISSUER_HEADER: "The signer's nkeys public key; trusted only if the tg_issuers bucket grants it",
    SIGNATURE_HEADER: "The signer's Ed25519 signature of the payload bytes exactly (URL-safe base64)",
    TICKET_HEADER: "The issuer's signature of the request's ticket (Envelope.ticket()), which its usage carries",
    REASON_HEADER: "Why the message was dead-lettered",
    SUBJECT_HEADER: "The subject the message was first published on",
    INCR_HEADER: "The signed amount a JetStream counter adds (\"+5\", \"-2\")",
    tracing.HEADER: "The request's W3C traceparent, when its envelope carried one: billing's spans join its trace",
}
_OPTIONAL = {tracing.HEADER}  # headers a message may go without

PARAMETERS: dict[str, dict] = {
    "lane": {"enum": list(LANES), "description": "The priority lane; workers drain them in this order"},
    "model": {"description": "A model name as one subject token: anything but letters, digits, _ and - becomes _"},
    "tenant": {"description": "A tenant id as one subject token"},
    "edge_id": {"description": "The publisher's id its replies come to: an edge process (edge-…) or a service's name"},
    "request_id": {"description": "The request's id (also its Nats-Msg-Id)"},
    "source": {"enum": ["work", "usage"], "description": "What the dead letter was: work nobody would answer, or usage "
               "billing must not or cannot store"},
    "metric": {"enum": ["requests", "tokens"], "description": "What a rate limit counts"},
    "scope": {"description": "Whose limit: subject tokens joined by dots (tenant, key, model)"},
    "window": {"description": "The minute counted: unix seconds // 60"},
    "worker_id": {"description": "The worker process's id"},
    "key": {"description": "The entry's key in its bucket"},
    "nuid": {"description": "A new id per object put"},
}


@dataclass(frozen=True)
class Channel:
    """One subject (or family of subjects) and what travels on it."""

    address: Callable[..., str] | str  # a bus.subjects function (called with placeholders) or a fixed subject
    description: str
    payload: Any = None  # the body's type (MessagePack unless ``content_type``); None: an empty body
    headers: tuple[str, ...] = ()
    send: tuple[str, ...] = ()
    receive: tuple[str, ...] = ()
    stream: str | None = None  # the JetStream stream that stores it; None: core NATS, heard only by who listens
    durable: Callable[..., str] | str | None = None  # the durable consumer its receivers pull from
    listen: Callable[..., str] | str | None = None  # the wildcard its receivers subscribe to, when not the address
    queue: str | None = None  # the queue group its receivers share (one of them gets each message)
    reply: Any = None  # request-reply: the answer's type, sent to the asker's inbox
    content_type: str = MSGPACK


def _kv(bucket: str) -> Callable[[str], str]:
    def address(key: str) -> str:
        return f"$KV.{bucket}.{key}"
    return address


def _object_chunks(bucket: str) -> Callable[[str], str]:
    def address(nuid: str) -> str:
        return f"$O.{bucket}.C.{nuid}"
    return address


_SIGNED = (ISSUER_HEADER, SIGNATURE_HEADER, MSG_ID_HEADER)
_EMPTY_SCHEMA = {"type": "string", "maxLength": 0, "description": "An empty body: the subject is the message"}

CHANNELS: dict[str, Channel] = {
    "work": Channel(
        request_subject, "A unit of work for one model in one lane, signed by its issuer; it expires from the queue "
        "at its deadline. Bodies and results too large for one message travel as blobs (tg_blobs, tg_results). "
        "The client's W3C traceparent rides in the envelope's trace field.",
        Envelope, (*_SIGNED, TICKET_HEADER, TTL_HEADER), send=("edge", "sdk"), receive=("worker",),
        stream=REQUESTS_STREAM, durable=work_consumer),
    "doorbell": Channel(
        bell_subject, "Rung once a work message is stored, so an idle worker of the model pulls at once",
        send=("edge", "sdk"), receive=("worker",), listen=bell_wildcard),
    "reply": Channel(
        reply_subject, "The frames of one request's answer, in order (seq): started, heartbeats, deltas or chunks, "
        "then final or error", Frame, send=("worker",), receive=("edge", "sdk"), listen=reply_wildcard),
    "cancel": Channel(
        cancel_subject, "The client left: the worker running the request stops it (also noted in tg_cancelled, for a "
        "worker that has not started it yet)", send=("edge", "sdk"), receive=("worker",), listen=CANCEL_WILDCARD),
    "tokenize": Channel(
        tokenize_subject, "Token ids of a prompt or chat messages, or the text of token ids, answered by one of the "
        "model's workers", TokenizerAsk, send=("edge",), receive=("worker",), queue="tokenize", reply=TokenizeAnswer),
    "usage": Channel(
        usage_subject, "What one request a worker accepted used and cost, with the ticket its issuer signed: the basis "
        "of all billing. Its trace_id is the request's W3C trace.", UsageReport, (*_SIGNED, tracing.HEADER),
        send=("worker",), receive=("billing",), stream=USAGE_STREAM, durable=METER_CONSUMER),
    "cache_hit_usage": Channel(
        cache_hit_usage_subject, "The usage of an answer an edge served from its response cache, signed by that edge",
        UsageReport, _SIGNED, send=("edge",), receive=("billing",), stream=USAGE_STREAM, durable=METER_CONSUMER),
    "usage_query": Channel(
        USAGE_QUERY_SUBJECT, "Usage totals between two times, grouped as asked, answered by billing from ClickHouse",
        UsageQuery, send=("edge",), receive=("billing",), queue="billing", reply=UsageAnswer),
    "credit_counter": Channel(
        credit_counter, "A tenant's prepaid balance after holds, in micro-credits: a JetStream counter each publish "
        "adds to (holds, settlements, ledger entries), each add once under its message id",
        headers=(INCR_HEADER, MSG_ID_HEADER), send=("edge", "billing"), stream=CREDITS_STREAM),
    "credit_event": Channel(
        credit_event_subject, "One immutable change to a tenant's credits (grant, top-up, refund, expiry)",
        CreditEntry, (MSG_ID_HEADER,), send=("edge", "billing"), receive=("billing",), stream=EVENTS_STREAM,
        durable=LEDGER_CONSUMER),
    "budget_alert": Channel(
        budget_event_subject, "A budget crossed one of its thresholds in one period; sent on as a signed webhook",
        BudgetAlert, (MSG_ID_HEADER,), send=("billing",), receive=("billing",), stream=EVENTS_STREAM,
        durable=WEBHOOKS_CONSUMER),
    "hold": Channel(
        hold_subject, "Credits an edge holds for a request it admitted; billing releases them if no usage comes",
        HoldNotice, (MSG_ID_HEADER,), send=("edge",), receive=("billing",), stream=HOLDS_STREAM,
        durable=HOLDS_CONSUMER),
    "dead_letter": Channel(
        dead_letter_subject, "A message its consumer must not or cannot handle, moved aside with the reason and the "
        "original's headers and bytes, for an operator to read, fix and replay", _BYTES,
        (REASON_HEADER, SUBJECT_HEADER, MSG_ID_HEADER), send=("worker", "billing"), receive=("operator",),
        stream=DEAD_LETTER_STREAM, content_type=_BYTES),
    "rate_counter": Channel(
        rate_counter, "Requests or tokens counted for one scope in one minute, shared by every edge",
        headers=(INCR_HEADER,), send=("edge",), stream=RATELIMIT_STREAM),
    "workers": Channel(
        lambda model, worker_id: f"$KV.{WORKERS_BUCKET}.{liveness_key(model, worker_id)}",
        "A live worker, renewed while it runs (bucket TTL): an edge answers 503 at once for a model with none",
        WorkerAnnouncement, send=("worker",), receive=("edge",), stream=f"KV_{WORKERS_BUCKET}"),
    "publishers": Channel(
        _kv(PUBLISHERS_BUCKET), "A live publisher, by the id its replies go to: a worker drops work whose publisher is "
        "gone (dead-lettered as work)", send=("edge", "sdk"), receive=("worker",), stream=f"KV_{PUBLISHERS_BUCKET}"),
    "issuers": Channel(
        _kv(ISSUERS_BUCKET), "A trusted signing key (by its public key): what it may sign, for which tenants",
        IssuerGrant, send=("operator",), receive=("edge", "worker", "billing"), stream=f"KV_{ISSUERS_BUCKET}"),
    "cancelled": Channel(
        _kv(CANCELLED_BUCKET), "Requests cancelled (by id): a worker skips one it has not started",
        send=("edge", "sdk"), receive=("worker",), stream=f"KV_{CANCELLED_BUCKET}"),
    "tenants": Channel(_kv(TENANTS_BUCKET), "A tenant (by id)", Tenant, send=("edge", "operator"), receive=("edge",),
                       stream=f"KV_{TENANTS_BUCKET}"),
    "keys": Channel(_kv(KEYS_BUCKET), "An API key (by id; its secret only as a hash)", ApiKey,
                    send=("edge", "operator"), receive=("edge",), stream=f"KV_{KEYS_BUCKET}"),
    "inflight": Channel(
        _kv(INFLIGHT_BUCKET), "Requests in flight for one limit's scope, per edge: [count, unix time of the count]",
        dict[str, tuple[int, float]], send=("edge",), receive=("edge",), stream=f"KV_{INFLIGHT_BUCKET}"),
    "budgets": Channel(_kv(BUDGETS_BUCKET), "A budget (by id)", Budget, send=("edge",), receive=("edge", "billing"),
                       stream=f"KV_{BUDGETS_BUCKET}"),
    "budget_state": Channel(
        _kv(BUDGET_STATE_BUCKET), "What a budget's period has spent so far, kept by billing, read by edges to refuse "
        "work over a hard budget", BudgetState, send=("billing",), receive=("edge",),
        stream=f"KV_{BUDGET_STATE_BUCKET}"),
    "credit_ids": Channel(
        _kv(CREDIT_IDS_BUCKET), "Ledger entry ids used, per tenant: the first change sent under an id is kept for good",
        CreditEntry, send=("edge",), receive=("edge",), stream=f"KV_{CREDIT_IDS_BUCKET}"),
    "response_cache": Channel(
        _kv(RESPONSE_CACHE_BUCKET), "A kept answer (by a hash of tenant, model, kind and body), each with its own TTL",
        CachedAnswer, send=("edge",), receive=("edge",), stream=f"KV_{RESPONSE_CACHE_BUCKET}"),
    "request_blobs": Channel(
        _object_chunks(REQUEST_BLOBS_BUCKET), "Chunks of a request body too large for one message (object store; the "
        "envelope's BlobRef signs its sha256)", _BYTES, send=("edge", "sdk"), receive=("worker",),
        stream=f"OBJ_{REQUEST_BLOBS_BUCKET}", content_type=_BYTES),
    "result_blobs": Channel(
        _object_chunks(RESULT_BLOBS_BUCKET), "Chunks of a result too large for one frame, and images behind signed "
        "url links (object store)", _BYTES, send=("worker", "edge"), receive=("edge", "sdk"),
        stream=f"OBJ_{RESULT_BLOBS_BUCKET}", content_type=_BYTES),
}

_PLACEHOLDER = re.compile(r"-([a-z_]+)-")  # what subjects.token() leaves alone, and no real argument looks like


def pattern(address: Callable[..., str] | str) -> str:
    """A subject function's address with ``{parameter}`` for each argument ("tg.req.{lane}.{model}")."""
    if isinstance(address, str):
        return address
    names = inspect.signature(address).parameters
    return _PLACEHOLDER.sub(r"{\1}", address(*(f"-{name}-" for name in names)))


def _message(name: str, summary: str, payload: dict, headers: tuple[str, ...], content_type: str) -> dict:
    message = {"name": name, "title": name, "summary": summary, "contentType": content_type, "payload": payload}
    if headers:
        message["headers"] = {"type": "object", "required": [h for h in headers if h not in _OPTIONAL],
                              "properties": {h: {"type": "string", "description": HEADERS[h]} for h in headers}}
    return message


def _payload(t: Any, schema_of: dict[str, dict]) -> dict:
    if t is None:
        return _EMPTY_SCHEMA
    if t == _BYTES:
        return {"type": "string", "contentMediaType": _BYTES, "description": "Raw bytes"}
    return schema_of[repr(t)]


def _name_discriminators(schema: Any) -> None:
    """AsyncAPI's schema object names a tagged union's tag property, where msgspec gives OpenAPI's
    ``{"propertyName": …, "mapping": …}`` (the ``anyOf`` of tagged types says the rest)."""
    if isinstance(schema, dict):
        if isinstance(schema.get("discriminator"), dict):
            schema["discriminator"] = schema["discriminator"]["propertyName"]
        schema = list(schema.values())
    if isinstance(schema, (list, tuple)):
        for item in schema:
            _name_discriminators(item)


def document() -> dict:
    """The AsyncAPI 3.0 document of every channel, payload schemas from their msgspec types."""
    types = [t for ch in CHANNELS.values() for t in (ch.payload, ch.reply) if t not in (None, _BYTES)]
    schemas, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    schema_of = dict(zip(map(repr, types), schemas))
    _name_discriminators([schemas, components])
    channels, operations, messages = {}, {}, {}
    for key, ch in CHANNELS.items():
        address = pattern(ch.address)
        messages[key] = _message(key, ch.description, _payload(ch.payload, schema_of), ch.headers, ch.content_type)
        channel = {"address": address, "description": ch.description,
                   "messages": {key: {"$ref": f"#/components/messages/{key}"}}}
        params = re.findall(r"\{(\w+)\}", address)
        if params:
            channel["parameters"] = {name: PARAMETERS[name] for name in params}
        if ch.stream:
            channel["x-jetstream-stream"] = ch.stream
        channels[key] = channel
        reply = None
        if ch.reply is not None:
            messages[f"{key}_reply"] = _message(f"{key}_reply", f"The answer to {key}", _payload(ch.reply, schema_of),
                                                (), ch.content_type)
            # The asker's inbox (_INBOX_<user>.…): no fixed address.
            channels[f"{key}_reply"] = {"address": None, "description": f"The asker's inbox, for the answer to {key}",
                                        "messages": {f"{key}_reply": {"$ref": f"#/components/messages/{key}_reply"}}}
            reply = {"channel": {"$ref": f"#/channels/{key}_reply"},
                     "messages": [{"$ref": f"#/channels/{key}_reply/messages/{key}_reply"}]}
        for action, roles in (("send", ch.send), ("receive", ch.receive)):
            for role in roles:
                op = {"action": action, "channel": {"$ref": f"#/channels/{key}"}, "summary": ROLES[role],
                      "messages": [{"$ref": f"#/channels/{key}/messages/{key}"}], "tags": [{"name": role}]}
                if reply is not None:
                    op["reply"] = reply
                if action == "receive":
                    if ch.queue:
                        op["bindings"] = {"nats": {"queue": ch.queue, "bindingVersion": "0.1.0"}}
                    if ch.durable:
                        op["x-durable-consumer"] = pattern(ch.durable)
                    if ch.listen:
                        op["x-subscribe"] = pattern(ch.listen)
                operations[f"{role}.{action}.{key}"] = op
    return {
        "asyncapi": "3.0.0",
        "info": {"title": "Tollgate bus", "version": str(SCHEMA_VERSION), "description":
                 "The NATS subjects, JetStream streams and KV buckets of a Tollgate gateway: signed work envelopes "
                 "from edges and services to model workers, reply frames back, usage events to billing, credits, "
                 "budgets and their alerts. Payloads are MessagePack unless said otherwise; byte fields are "
                 "MessagePack bin (their JSON schema says base64, MessagePack carries them raw).",
                 "tags": [{"name": role, "description": text} for role, text in ROLES.items()]},
        "defaultContentType": MSGPACK,
        "servers": {"nats": {"host": "localhost:4222", "protocol": "nats",
                             "description": "A node of the NATS cluster (setting nats.servers); every role connects "
                                            "with its own user (infra/nats/roles.py)"}},
        "channels": channels,
        "operations": operations,
        "components": {"schemas": components, "messages": messages},
    }


@functools.cache
def rendered() -> str:
    """The document as ``docs/asyncapi.json`` holds it: indented, keys in the document's order."""
    return json.dumps(document(), indent=2) + "\n"


routes = web.RouteTableDef()


@routes.get("/asyncapi.json")
async def asyncapi_json(request: web.Request) -> web.Response:
    """The AsyncAPI 3.0 document of the bus."""
    return web.Response(text=rendered(), content_type="application/json")
