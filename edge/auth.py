"""API key authentication: who is calling, on whose tenant's account."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from aiohttp import web

from bus.errors import AuthenticationFailed


@dataclass(frozen=True)
class Principal:
    tenant: str
    key_id: str


class KeyAuth:
    """Checks the bearer key against the configured one in constant time."""

    def __init__(self, api_key: str, tenant: str):
        if not api_key:
            raise ValueError("edge.api_key is empty: set one (tollgate up creates one for you)")
        self._key = api_key.encode()
        self._principal = Principal(tenant, "key_" + hashlib.sha256(self._key).hexdigest()[:12])

    def authenticate(self, request: web.Request) -> Principal:
        header = request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise AuthenticationFailed(
                "You didn't provide an API key. Provide it in the Authorization header as 'Bearer YOUR_KEY'.",
                code="missing_api_key",
            )
        if not hmac.compare_digest(key.strip().encode(), self._key):
            raise AuthenticationFailed("Incorrect API key provided.")
        return self._principal
