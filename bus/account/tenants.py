"""Tenants, tiers and API keys: the records kept in NATS KV and the policy they add up to."""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from typing import Annotated

import msgspec
from msgspec import Meta

from bus.subjects import LANES, token

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
KEY_PREFIX = "sk-tg-"
_KEY_ID_LEN = 12


class Limits(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True, frozen=True):
    """Per-minute requests and tokens, and requests in flight; None means no limit."""

    rpm: Annotated[int, Meta(ge=0, le=2**62)] | None = None
    tpm: Annotated[int, Meta(ge=0, le=2**62)] | None = None
    concurrency: Annotated[int, Meta(ge=0, le=2**31)] | None = None

    def over(self, base: "Limits") -> "Limits":
        """These limits where set, ``base``'s elsewhere."""
        return Limits(*(
            mine if mine is not None else theirs
            for mine, theirs in zip(msgspec.structs.astuple(self), msgspec.structs.astuple(base))
        ))


NO_LIMITS = Limits()


class Tier(msgspec.Struct, forbid_unknown_fields=True):
    """Defaults every tenant of a tier gets unless the tenant overrides them."""

    default_lane: str = "normal"
    allowed_lanes: list[str] = msgspec.field(default_factory=lambda: ["normal", "batch"])
    limits: Limits = NO_LIMITS
    model_limits: dict[str, Limits] = {}
    models: list[str] = msgspec.field(default_factory=lambda: ["*"])


DEFAULT_TIERS: dict[str, Tier] = {
    "free": Tier(limits=Limits(rpm=60, tpm=100_000, concurrency=4)),
    "pro": Tier(allowed_lanes=["high", "normal", "batch"], limits=Limits(rpm=1_000, tpm=2_000_000, concurrency=64)),
    "enterprise": Tier(default_lane="high", allowed_lanes=list(LANES)),
}


class Tenant(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    tier: str = "free"
    name: str = ""
    default_lane: str | None = None
    allowed_lanes: list[str] | None = None
    limits: Limits = NO_LIMITS
    model_limits: dict[str, Limits] = {}
    models: list[str] | None = None
    disabled: bool = False
    # Prepaid tenants run only what their credits cover: admission holds each request's maximum cost.
    prepaid: bool = False
    created: float = 0.0
    # The response cache for this tenant's requests: None keeps each model's TTL, a number shortens
    # it to at most that many seconds, 0 opts out (nothing of theirs is looked up or stored).
    response_cache_ttl_s: Annotated[float, Meta(ge=0, le=2**31)] | None = None


class ApiKey(msgspec.Struct, forbid_unknown_fields=True):
    """A stored key: never the secret, only its hash and a public id for lookup."""

    id: str
    tenant: str
    hash: str
    created: float
    name: str = ""
    expires: float | None = None
    revoked: bool = False
    models: list[str] | None = None  # scope: None means every model the tenant may use
    endpoints: list[str] | None = None  # scope: e.g. ["chat.completions", "models"]
    limits: Limits = NO_LIMITS
    model_limits: dict[str, Limits] = {}

    def usable(self, now: float) -> bool:
        return not self.revoked and (self.expires is None or now < self.expires)


def valid_id(value: str) -> bool:
    return bool(_ID.match(value))


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key(tenant: str, **fields) -> tuple[ApiKey, str]:
    """Mint a key for ``tenant``: the stored record and the secret, which is shown once."""
    key_id = secrets.token_hex(_KEY_ID_LEN // 2)
    secret = f"{KEY_PREFIX}{key_id}-{secrets.token_urlsafe(32)}"
    return ApiKey(id=key_id, tenant=tenant, hash=hash_key(secret), created=time.time(), **fields), secret


def key_id_of(secret: str) -> str | None:
    """The public id inside a presented key, or None if it is not one of ours."""
    if not secret.startswith(KEY_PREFIX) or len(secret) < len(KEY_PREFIX) + _KEY_ID_LEN + 2:
        return None
    return secret[len(KEY_PREFIX):len(KEY_PREFIX) + _KEY_ID_LEN]


# The latest a key may expire: the last second a date can name (year 9999).
LATEST_EXPIRY = 253_402_300_799.0

# What a key's ``endpoints`` scope may name: each route authenticates as one of these ("*": all).
ENDPOINT_SCOPES = frozenset({
    "*", "chat.completions", "completions", "embeddings", "messages", "tokenize", "models", "images",
    "audio.speech", "audio.transcriptions", "audio.translations", "usage", "credits",
})


def _allows(allowed: list[str] | None, name: str) -> bool:
    return allowed is None or "*" in allowed or name in allowed


class Policy(msgspec.Struct, frozen=True):
    """What one key of one tenant may do with one model, all defaults and overrides applied."""

    default_lane: str
    allowed_lanes: list[str]
    model_allowed: bool
    # Every limit that applies, each with the scope whose shared counters enforce it:
    # ``t.<tenant>`` and ``k.<key>``, plus ``….m.<model>`` where a per-model limit is set.
    # A per-model limit is a further limit for that model, inside the general one.
    limits: list[tuple[str, Limits]]
    prepaid: bool = False


def policy(tenant: Tenant, key: ApiKey, tier: Tier, model: str) -> Policy:
    # Scopes keep their parts as separate subject tokens, so no tenant's scope can
    # spell another's (tenant ids and key ids hold no dots; model names are tokenised).
    m = token(model)
    candidates = [
        (f"t.{tenant.id}", tenant.limits.over(tier.limits)),
        (f"t.{tenant.id}.m.{m}", tenant.model_limits.get(model, NO_LIMITS).over(tier.model_limits.get(model, NO_LIMITS))),
        (f"k.{key.id}", key.limits),
        (f"k.{key.id}.m.{m}", key.model_limits.get(model, NO_LIMITS)),
    ]
    return Policy(
        default_lane=tenant.default_lane or tier.default_lane,
        allowed_lanes=tenant.allowed_lanes if tenant.allowed_lanes is not None else tier.allowed_lanes,
        model_allowed=_allows(tenant.models if tenant.models is not None else tier.models, model)
        and _allows(key.models, model),
        limits=[(scope, limits) for scope, limits in candidates if limits != NO_LIMITS],
        prepaid=tenant.prepaid,
    )


def endpoint_allowed(key: ApiKey, endpoint: str) -> bool:
    return _allows(key.endpoints, endpoint)
