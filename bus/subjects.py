"""Subject, stream, consumer and bucket names: the addressing scheme of the bus."""

import re

# Highest priority first: workers drain lanes in this order.
LANES: tuple[str, ...] = ("critical", "high", "normal", "batch")

REQUESTS_STREAM = "REQUESTS"
USAGE_STREAM = "USAGE"
WORKERS_BUCKET = "tg_workers"
# Live publishers (edge processes, SDK services) by the id their replies go to.
PUBLISHERS_BUCKET = "tg_publishers"
ISSUERS_BUCKET = "tg_issuers"
CANCELLED_BUCKET = "tg_cancelled"
TENANTS_BUCKET = "tg_tenants"
KEYS_BUCKET = "tg_keys"
INFLIGHT_BUCKET = "tg_inflight"
RATELIMIT_STREAM = "RATELIMIT"
# Prepaid balances: one JetStream counter per tenant (what is left after holds).
CREDITS_STREAM = "CREDITS"
# Credit ledger entries and budget alerts, for billing, webhooks and any subscriber.
EVENTS_STREAM = "EVENTS"
HOLDS_STREAM = "HOLDS"
# Ledger entry ids operators have used, per tenant: the first change sent under an id is kept for good.
CREDIT_IDS_BUCKET = "tg_credit_ids"
# What billing must not or cannot store (``billing.dead_letters``), kept for an operator.
DEAD_LETTER_STREAM = "DEADLETTER"
BUDGETS_BUCKET = "tg_budgets"
BUDGET_STATE_BUCKET = "tg_budget_state"
# Object stores (streams OBJ_<bucket>): request bodies over the blob threshold, written by
# publishers and read by workers; large results, written by workers and read by publishers.
REQUEST_BLOBS_BUCKET = "tg_blobs"
RESULT_BLOBS_BUCKET = "tg_results"
# Answers kept by the exact response cache (edge/response_cache.py), shared by every edge.
RESPONSE_CACHE_BUCKET = "tg_response_cache"
METER_CONSUMER = "meter"
LEDGER_CONSUMER = "ledger"
HOLDS_CONSUMER = "holds"
WEBHOOKS_CONSUMER = "webhooks"
# Billing answers usage queries here (request-reply): it owns the ClickHouse engine.
USAGE_QUERY_SUBJECT = "tg.billing.usage"

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def token(name: str) -> str:
    """Turn a model or tenant name into one subject token (no dots or wildcards)."""
    return _UNSAFE.sub("_", name)


def request_subject(lane: str, model: str) -> str:
    return f"tg.req.{lane}.{token(model)}"


def bell_subject(lane: str, model: str) -> str:
    """Rung by a publisher once its work is stored (acked), never before: a worker that pulls on
    hearing it finds the message. (A subscription to the work subject itself could hear a publish
    before JetStream had stored it, pull too early, and sleep until its next rescan.)"""
    return f"tg.bell.{lane}.{token(model)}"


def bell_wildcard(model: str) -> str:
    """Every lane's doorbell for one model."""
    return f"tg.bell.*.{token(model)}"


def work_consumer(model: str, lane: str) -> str:
    """The durable consumer that all workers of ``model`` share for ``lane``."""
    return f"work_{token(model)}_{lane}"


def reply_subject(edge_id: str, request_id: str) -> str:
    return f"tg.reply.{edge_id}.{request_id}"


def reply_wildcard(edge_id: str) -> str:
    return f"tg.reply.{edge_id}.*"


def tokenize_subject(model: str) -> str:
    """Where ``model``'s workers answer tokenize and detokenize asks (core request-reply, one queue group)."""
    return f"tg.tokenize.{token(model)}"


def cancel_subject(request_id: str) -> str:
    return f"tg.cancel.{request_id}"


CANCEL_WILDCARD = "tg.cancel.*"


def usage_subject(tenant: str) -> str:
    return f"tg.usage.{token(tenant)}"


def cache_hit_usage_subject(tenant: str) -> str:
    """Where an edge publishes the usage of an answer it served from its cache: in USAGE, apart
    from workers' usage, so an edge may publish this and nothing else there."""
    return f"tg.usage.hit.{token(tenant)}"


def credit_counter(tenant: str) -> str:
    return f"tg.credit.{token(tenant)}"


def credit_event_subject(tenant: str) -> str:
    return f"tg.event.credit.{token(tenant)}"


def budget_event_subject(tenant: str) -> str:
    return f"tg.event.budget.{token(tenant)}"


def dead_letter_subject(source: str) -> str:
    return f"tg.dead.{token(source)}"


def hold_subject(tenant: str) -> str:
    return f"tg.hold.{token(tenant)}"


def rate_counter(metric: str, scope: str, window: int) -> str:
    """The shared counter of ``metric`` (requests or tokens) for ``scope`` in one minute window.

    A scope is already made of subject-safe tokens joined by dots (``bus.account.tenants.policy``).
    """
    return f"tg.rl.{metric}.{scope}.{window}"


def liveness_key(model: str, worker_id: str) -> str:
    return f"{token(model)}.{worker_id}"
