"""Who is calling: tenant API keys from a watched local mirror of KV, and the admin token."""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass

from aiohttp import web

from bus.errors import AuthenticationFailed, PermissionDenied
from bus.account.tenants import ApiKey, Policy, Tenant, Tier, endpoint_allowed, hash_key, key_id_of, policy
from bus.watched import WatchedBucket


@dataclass(frozen=True)
class Principal:
    tenant: Tenant
    key: ApiKey
    tier: Tier

    def policy(self, model: str) -> Policy:
        return policy(self.tenant, self.key, self.tier, model)


def bearer(request: web.Request) -> str:
    """The key a request presents: ``Authorization: Bearer KEY``, or ``x-api-key: KEY`` as Anthropic's clients send it."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if key := request.headers.get("x-api-key", "").strip():
        return key
    raise AuthenticationFailed(
        "You didn't provide an API key. Provide it in the Authorization header as 'Bearer YOUR_KEY' "
        "(or in the x-api-key header).",
        code="missing_api_key",
    )


class Authenticator:
    """Checks keys against local mirrors of the key and tenant buckets: no network on the hot path."""

    def __init__(self, tenants: WatchedBucket[Tenant], keys: WatchedBucket[ApiKey], tiers: dict[str, Tier],
                 admin_token: str):
        self._tenants, self._keys, self._tiers = tenants, keys, tiers
        self._admin = admin_token.encode()

    def _principal(self, secret: str) -> Principal | None:
        key_id = key_id_of(secret)
        key = self._keys.get(key_id) if key_id else None
        if key is None or not hmac.compare_digest(hash_key(secret), key.hash) or not key.usable(time.time()):
            return None
        tenant = self._tenants.get(key.tenant)
        if tenant is None or tenant.disabled or tenant.tier not in self._tiers:
            return None
        return Principal(tenant, key, self._tiers[tenant.tier])

    def authenticate(self, request: web.Request, endpoint: str) -> Principal:
        """The caller's tenant and key, if the key is valid and scoped for ``endpoint``."""
        principal = self._principal(bearer(request))
        if principal is None:
            raise AuthenticationFailed("Incorrect API key provided, or the key was revoked or has expired.")
        if not endpoint_allowed(principal.key, endpoint):
            raise PermissionDenied(f"This API key is not allowed to use {endpoint}.", code="insufficient_scope")
        return principal

    def require_admin(self, request: web.Request) -> None:
        """Admin routes take the admin token only; a tenant key is refused, whoever's it is."""
        secret = bearer(request)
        if self._admin and hmac.compare_digest(secret.encode(), self._admin):
            return
        if self._principal(secret) is not None:
            raise PermissionDenied("Tenant API keys cannot use the admin API.", code="admin_only")
        raise AuthenticationFailed("Incorrect admin token provided.")
