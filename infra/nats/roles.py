"""The NATS users Tollgate runs as, and what each may publish and subscribe to.

Each role has its own inbox prefix, so the answers to its JetStream API calls
(which can carry tenant records) are readable by it alone. Rendered into a
nats-server ``authorization`` block by ``render``; ``tollgate up`` and the
tests run with it, and a production cluster takes the same block.

Workers get a user per model (``worker:<model>``): a worker holding one
model's credentials can pull, be rung for and announce only that model's work.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from bus.signing import write_private
from bus.subjects import (
    BUDGET_STATE_BUCKET,
    BUDGETS_BUCKET,
    CANCELLED_BUCKET,
    CREDIT_IDS_BUCKET,
    CREDITS_STREAM,
    DEAD_LETTER_STREAM,
    EVENTS_STREAM,
    HOLDS_STREAM,
    INFLIGHT_BUCKET,
    ISSUERS_BUCKET,
    LANES,
    KEYS_BUCKET,
    METER_CONSUMER,
    REQUESTS_STREAM,
    TENANTS_BUCKET,
    USAGE_QUERY_SUBJECT,
    USAGE_STREAM,
    PUBLISHERS_BUCKET,
    REQUEST_BLOBS_BUCKET,
    RESPONSE_CACHE_BUCKET,
    RESULT_BLOBS_BUCKET,
    WORKERS_BUCKET,
    request_subject,
    bell_wildcard,
    token,
    tokenize_subject,
    work_consumer,
)

# Roles every deployment has; workers add ``worker:<model>`` per model, services ``svc:<name>``.
ROLES = ("admin", "edge", "billing")


def worker_role(model: str) -> str:
    """The NATS role of workers serving ``model``."""
    return f"worker:{model}"


def inbox(role: str) -> str:
    return f"_INBOX_{role}"


def _kv_read(bucket: str) -> list[str]:
    stream = f"KV_{bucket}"
    return [
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.>",
        f"$JS.API.CONSUMER.DELETE.{stream}.>",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        # A watcher's flow-control answers: refused, the server stalls the watch once enough is in
        # flight, and the watcher silently stops seeing changes (an edge then never saw new workers).
        f"$JS.FC.{stream}.>",
    ]


def _kv_write(bucket: str) -> list[str]:
    return [*_kv_read(bucket), f"$KV.{bucket}.>"]


def _consume(stream: str) -> list[str]:
    """Pull from, ack on and (re)create durable consumers of ``stream``."""
    return [
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.>",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.>",
        f"$JS.ACK.{stream}.>",
    ]


def _consume_own_work(model: str) -> list[str]:
    """Pull from and ack on ``model``'s lane consumers, and (re)create them, nothing else in REQUESTS.

    Consumers are created only in the form that names their filter in the subject (the
    server checks that the body's filter is the same), so a worker cannot point one of
    its consumers at another model's subjects; the forms without it are not allowed.
    """
    api = f"$JS.API.CONSUMER.%s.{REQUESTS_STREAM}"
    rights = []
    for lane in LANES:
        consumer = work_consumer(model, lane)
        rights += [f"{api % 'CREATE'}.{consumer}.{request_subject(lane, model)}", f"{api % 'INFO'}.{consumer}",
                   f"{api % 'MSG.NEXT'}.{consumer}", f"$JS.ACK.{REQUESTS_STREAM}.{consumer}.>"]
    return rights


def _blob_write(bucket: str) -> list[str]:
    """Put objects in ``bucket`` (bus/blobs.py): its chunk and meta subjects, nothing else."""
    return [f"$O.{bucket}.C.>", f"$O.{bucket}.M.>"]


def _blob_read(bucket: str) -> list[str]:
    """Read objects of ``bucket`` (bus/blobs.py): direct gets of its meta (by subject) and chunks (by payload)."""
    stream = f"OBJ_{bucket}"
    return [f"$JS.API.DIRECT.GET.{stream}", f"$JS.API.DIRECT.GET.{stream}.>"]


def _read_counters(stream: str) -> list[str]:
    return [f"$JS.API.STREAM.MSG.GET.{stream}", f"$JS.API.DIRECT.GET.{stream}.>"]


def permissions(role: str) -> dict:
    """The publish/subscribe allow lists of one role (``svc:<name>`` for an internal service)."""
    common_pub = ["$JS.API.INFO"]
    if role == "admin":
        return {"publish": [">"], "subscribe": [">"]}
    if role == "edge":
        pub = ["tg.req.>", "tg.bell.>", "tg.cancel.>", "tg.rl.>", USAGE_QUERY_SUBJECT, "tg.tokenize.*", *_kv_write(CANCELLED_BUCKET), *_kv_write(INFLIGHT_BUCKET),
               *_kv_write(TENANTS_BUCKET), *_kv_write(KEYS_BUCKET), *_kv_read(WORKERS_BUCKET), *_kv_read(ISSUERS_BUCKET),
               *_kv_write(PUBLISHERS_BUCKET),  # announces itself: workers drop a dead edge's work
               # credit holds and their ends, ledger entries from the admin API under ids claimed per
               # tenant; budgets and their state. Never budget alerts, nor usage but that of the answers
               # it served from the response cache (which the meter takes from the edge that admitted them).
               *_kv_write(RESPONSE_CACHE_BUCKET), "tg.usage.hit.>",
               "tg.credit.>", "tg.event.credit.>", "tg.hold.>", *_read_counters(CREDITS_STREAM),
               *_kv_write(CREDIT_IDS_BUCKET),
               *_kv_write(BUDGETS_BUCKET), *_kv_read(BUDGET_STATE_BUCKET),
               *_blob_write(REQUEST_BLOBS_BUCKET), *_blob_read(RESULT_BLOBS_BUCKET),  # large bodies and results
               *_blob_write(RESULT_BLOBS_BUCKET),  # images behind `url` links (edge/image_links.py)
               # The console's read-only views (edge/console_routes.py): lane counts, the latest dead letters.
               f"$JS.API.CONSUMER.INFO.{REQUESTS_STREAM}.>", f"$JS.API.STREAM.INFO.{DEAD_LETTER_STREAM}",
               f"$JS.API.STREAM.MSG.GET.{DEAD_LETTER_STREAM}"]
        # Edges own the HTTP connections of every tenant, so they may read any edge's replies.
        sub = ["tg.reply.>"]
    elif role.startswith("worker:"):
        model = role.removeprefix("worker:")
        # Replies and usage are per request and tenant, not per model: any worker may send them,
        # and what they claim is checked by their reader (signed usage, reply prefixes).
        pub = ["tg.reply.>", "tg.usage.>", *_consume_own_work(model),
               f"$JS.API.STREAM.INFO.KV_{WORKERS_BUCKET}", f"$KV.{WORKERS_BUCKET}.{token(model)}.>",  # its liveness
               *_kv_read(PUBLISHERS_BUCKET), "tg.dead.work",  # work whose publisher is gone is dead-lettered
               *_kv_read(ISSUERS_BUCKET), *_kv_read(CANCELLED_BUCKET),
               # large bodies it reads (their digests are signed in the envelope), large results it writes
               *_blob_read(REQUEST_BLOBS_BUCKET), *_blob_write(RESULT_BLOBS_BUCKET)]
        # Its model's doorbell, its model's tokenize asks (answered: allow_responses) and every cancel;
        # never publish work.
        sub = [bell_wildcard(model), tokenize_subject(model), "tg.cancel.*"]
    elif role == "billing":
        # Deleting its consumer is only for moving an older meter's consumer to explicit acks.
        pub = [*_consume(USAGE_STREAM), f"$JS.API.CONSUMER.DELETE.{USAGE_STREAM}.{METER_CONSUMER}",
               f"$JS.API.CONSUMER.DELETE.{USAGE_STREAM}.meter_upgrade_guard",
               *_kv_read(ISSUERS_BUCKET), "tg.dead.>",  # checks who signed usage; moves what it cannot store
               *_consume(EVENTS_STREAM), *_consume(HOLDS_STREAM),
               f"$JS.API.STREAM.MSG.GET.{HOLDS_STREAM}",  # a tenant's oldest open hold: when a grant may lapse
               "tg.credit.>", "tg.event.>", *_read_counters(CREDITS_STREAM),
               *_kv_read(BUDGETS_BUCKET), *_kv_write(BUDGET_STATE_BUCKET)]
        sub = [USAGE_QUERY_SUBJECT]  # it answers usage queries (allow_responses, below)
    elif role.startswith("svc:"):
        name = role.removeprefix("svc:")
        pub = ["tg.req.>", "tg.bell.>", "tg.cancel.>", *_kv_write(CANCELLED_BUCKET), *_kv_read(WORKERS_BUCKET),
               *_kv_write(PUBLISHERS_BUCKET), *_blob_write(REQUEST_BLOBS_BUCKET), *_blob_read(RESULT_BLOBS_BUCKET)]
        sub = [f"tg.reply.{name}.>"]  # its own replies, nobody else's
    else:
        raise ValueError(f"unknown role {role!r}")
    allowed = {"publish": common_pub + pub, "subscribe": sub + [f"{inbox(_user(role))}.>"]}
    if role == "billing" or role.startswith("worker:"):
        allowed["allow_responses"] = True
    return allowed


def _user(role: str) -> str:
    if role.startswith("worker:"):  # a model name may hold dots, which NATS user inboxes cannot
        return "worker_" + token(role.removeprefix("worker:"))
    return role.replace(":", "_")


def render(passwords: dict[str, str]) -> str:
    """The ``authorization`` block for these users (role -> password)."""
    users = [
        {"user": _user(role), "password": password, "permissions": permissions(role)}
        for role, password in passwords.items()
    ]
    # JSON is valid nats-server configuration syntax.
    return "authorization " + json.dumps({"users": users}, indent=2) + "\n"


def credentials(role: str, password: str) -> dict[str, str]:
    """The settings environment that makes a process connect as ``role``."""
    user = _user(role)
    return {"TOLLGATE_NATS_USER": user, "TOLLGATE_NATS_PASSWORD": password, "TOLLGATE_NATS_INBOX_PREFIX": inbox(user)}


def as_role(settings, role: str, password: str):
    """``settings`` with NATS credentials for ``role``."""
    import msgspec

    creds = credentials(role, password)
    nats = msgspec.structs.replace(settings.nats, user=creds["TOLLGATE_NATS_USER"],
                                   password=password, inbox_prefix=creds["TOLLGATE_NATS_INBOX_PREFIX"])
    return msgspec.structs.replace(settings, nats=nats)


def auth_file(state_dir: str) -> Path:
    """Where ``tollgate up`` keeps every role's password: ``<state_dir>/nats-auth.json`` (mode 0600)."""
    return Path(state_dir, "nats-auth.json")


def role_credentials(settings, role: str):
    """``settings`` connecting as ``role``: credentials already set (``TOLLGATE_NATS_USER`` …) win,
    else the role's password from the state directory's ``nats-auth.json``, which a local stack writes."""
    path = auth_file(settings.state_dir)
    if settings.nats.user or not path.exists():
        return settings
    password = json.loads(path.read_text()).get(role)
    return as_role(settings, role, password) if password else settings


def load_or_create(path: Path, services: tuple[str, ...] = (), models: tuple[str, ...] = ()) -> dict[str, str]:
    """Passwords for every role (``svc:<name>`` per service, ``worker:<model>`` per model), kept in
    ``path`` (mode 0600). Roles no longer wanted (a removed model) are dropped."""
    existing = json.loads(path.read_text()) if path.exists() else {}
    wanted = [*ROLES, *(f"svc:{s}" for s in services), *(worker_role(m) for m in models)]
    passwords = {role: existing.get(role) or secrets.token_urlsafe(18) for role in wanted}
    if passwords != existing:
        write_private(path, json.dumps(passwords).encode())
    return passwords
