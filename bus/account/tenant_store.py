"""Tenants and API keys in NATS KV: the one place that creates, changes and revokes them.

The admin API and the CLI both go through here. Edges never read the buckets
on the hot path: they follow them with a watcher (``bus.watched``), so a
revocation reaches every edge as fast as the watch delivers it.
"""

from __future__ import annotations

import time

import msgspec
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from bus.buckets import bucket_values
from bus.errors import Conflict, InvalidRequest, NotFound
from bus.openai.decoding import invalid
from bus.subjects import KEYS_BUCKET, LANES, TENANTS_BUCKET
from bus.account.tenants import ENDPOINT_SCOPES, LATEST_EXPIRY, ApiKey, Tenant, new_key, valid_id

_tenant = msgspec.msgpack.Decoder(Tenant)
_key = msgspec.msgpack.Decoder(ApiKey)
_encode = msgspec.msgpack.encode

# Fields a PATCH may change; ids, hashes and creation times never change.
TENANT_FIELDS = {"tier", "name", "default_lane", "allowed_lanes", "limits", "model_limits", "models", "disabled", "prepaid",
                 "response_cache_ttl_s"}
KEY_FIELDS = {"name", "expires", "models", "endpoints", "limits", "model_limits"}


def decode_tenant(data: bytes) -> Tenant:
    return _tenant.decode(data)


def decode_key(data: bytes) -> ApiKey:
    return _key.decode(data)


def _check_lanes(tenant: Tenant) -> None:
    for param, lanes in (("default_lane", [tenant.default_lane]), ("allowed_lanes", tenant.allowed_lanes or [])):
        for lane in lanes:
            if lane is not None and lane not in LANES:
                raise InvalidRequest(f"unknown lane {lane!r}; lanes are {', '.join(LANES)}", param=param)
    if tenant.default_lane and tenant.allowed_lanes is not None and tenant.default_lane not in tenant.allowed_lanes:
        raise InvalidRequest(f"the default lane {tenant.default_lane!r} is not among the allowed lanes",
                             param="default_lane")


def _patched(record, patch: dict, allowed: set[str], kind: type):
    unknown = set(patch) - allowed
    if unknown:
        raise InvalidRequest(f"cannot change {', '.join(sorted(unknown))}", param=sorted(unknown)[0])
    merged = {**msgspec.to_builtins(record), **patch}
    try:
        return msgspec.convert(merged, kind)
    except msgspec.ValidationError as exc:
        raise invalid(str(exc)) from None


def _check_scope(key: ApiKey) -> None:
    """A key may only be scoped to endpoints that exist: a typo would silently lock it out."""
    unknown = sorted(set(key.endpoints or ()) - ENDPOINT_SCOPES)
    if unknown:
        raise InvalidRequest(f"unknown endpoint {unknown[0]!r}: one of {', '.join(sorted(ENDPOINT_SCOPES))}",
                             param="endpoints")


class TenancyStore:
    def __init__(self, js: JetStreamContext, tenants: KeyValue, keys: KeyValue, tiers: set[str]):
        self._js, self._tenants, self._keys, self._tiers = js, tenants, keys, tiers

    @classmethod
    async def open(cls, js: JetStreamContext, tiers: set[str]) -> "TenancyStore":
        return cls(js, await js.key_value(TENANTS_BUCKET), await js.key_value(KEYS_BUCKET), tiers)

    def _check_tier(self, tier: str) -> None:
        if tier not in self._tiers:
            raise InvalidRequest(f"unknown tier {tier!r}; tiers are {', '.join(sorted(self._tiers))}", param="tier")

    async def create_tenant(self, tenant: Tenant) -> Tenant:
        if not valid_id(tenant.id):
            raise InvalidRequest("tenant id must be 1-64 letters, digits, '-' or '_'", param="id")
        self._check_tier(tenant.tier)
        _check_lanes(tenant)
        tenant = msgspec.structs.replace(tenant, created=time.time())
        try:
            await self._tenants.create(tenant.id, _encode(tenant))
        except nats.js.errors.KeyWrongLastSequenceError:
            raise Conflict(f"tenant {tenant.id!r} already exists", param="id") from None
        return tenant

    async def get_tenant(self, tenant_id: str) -> Tenant:
        return (await self._read(self._tenants, tenant_id, "tenant", decode_tenant))[0]

    async def list_tenants(self) -> list[Tenant]:
        return [decode_tenant(value) for value in await bucket_values(self._js, self._tenants, TENANTS_BUCKET)]

    async def update_tenant(self, tenant_id: str, patch: dict) -> Tenant:
        current, revision = await self._read(self._tenants, tenant_id, "tenant", decode_tenant)
        tenant = _patched(current, patch, TENANT_FIELDS, Tenant)
        self._check_tier(tenant.tier)
        _check_lanes(tenant)
        await self._write(self._tenants, tenant_id, tenant, revision)
        return tenant

    async def create_key(self, tenant_id: str, **fields) -> tuple[ApiKey, str]:
        """Mint a key; the secret is returned here and never stored."""
        await self.get_tenant(tenant_id)
        unknown = set(fields) - KEY_FIELDS
        if unknown:
            raise InvalidRequest(f"unknown key field {sorted(unknown)[0]}", param=sorted(unknown)[0])
        try:
            key, secret = new_key(tenant_id, **fields)
            key = msgspec.convert(msgspec.to_builtins(key), ApiKey)  # validate the given fields
        except TypeError as exc:
            raise InvalidRequest(str(exc)) from None
        except msgspec.ValidationError as exc:
            raise invalid(str(exc)) from None
        _check_scope(key)
        await self._keys.create(key.id, _encode(key))
        return key, secret

    async def get_key(self, key_id: str) -> ApiKey:
        return (await self._read(self._keys, key_id, "API key", decode_key))[0]

    async def list_keys(self, tenant_id: str | None = None) -> list[ApiKey]:
        keys = [decode_key(value) for value in await bucket_values(self._js, self._keys, KEYS_BUCKET)]
        return [k for k in keys if tenant_id is None or k.tenant == tenant_id]


    async def update_key(self, key_id: str, patch: dict) -> ApiKey:
        current, revision = await self._read(self._keys, key_id, "API key", decode_key)
        if current.revoked:
            raise Conflict(f"API key {key_id!r} is revoked", code="key_revoked")
        key = _patched(current, patch, KEY_FIELDS, ApiKey)
        _check_scope(key)
        if "expires" in patch and key.expires is not None and not time.time() < key.expires <= LATEST_EXPIRY:
            raise InvalidRequest("expires must be a future time, in unix seconds (revoke a key to end it now)",
                                 param="expires")
        await self._write(self._keys, key_id, key, revision)
        return key

    async def revoke_key(self, key_id: str) -> ApiKey:
        """Revoke for good; the record stays, marked, for audit."""
        current, revision = await self._read(self._keys, key_id, "API key", decode_key)
        key = msgspec.structs.replace(current, revoked=True)
        await self._write(self._keys, key_id, key, revision)
        return key

    @staticmethod
    async def _read(kv: KeyValue, key: str, what: str, decode):
        try:
            entry = await kv.get(key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError, nats.js.errors.InvalidKeyError):
            raise NotFound(f"no {what} {key!r}") from None
        return decode(entry.value), entry.revision

    @staticmethod
    async def _write(kv: KeyValue, key: str, record, revision: int) -> None:
        """Write only if nobody changed the record since it was read: a revoke is never undone."""
        try:
            await kv.update(key, _encode(record), last=revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            raise Conflict(f"{key!r} was changed at the same time; read it again and retry") from None

