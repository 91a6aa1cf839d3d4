"""The one way a bus is made ready for a stack: ``tollgate up``, the test fixtures and the benchmarks call it.

Ready means: streams and buckets provisioned; the edge's and the worker's signing
keys trusted (roles ``edge`` and ``worker``: without them no ticket or usage report
is believed); a tenant with a working API key.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

from nats.js import JetStreamContext

from bus.account.tenant_store import TenancyStore
from bus.account.tenants import Tenant, hash_key, key_id_of
from bus.errors import Conflict, NotFound
from bus.issuers import register_issuer
from bus.protocol import IssuerGrant
from bus.provision import provision
from bus.settings import Settings
from bus.signing import Identity, write_private
from consumers.serve import worker_identity_path
from edge.app import edge_identity_path

DEFAULT_TENANT = "default"
DEMO_TENANT = Tenant(id=DEFAULT_TENANT, tier="pro", name="Default tenant")


@dataclass(frozen=True)
class Bootstrapped:
    """What a bootstrap made: the tenant's API key, and the identities the edge and the worker will sign with."""

    api_key: str
    edge: Identity
    worker: Identity


async def trust(js: JetStreamContext, path: Path, name: str, role: str) -> Identity:
    """Load (or create) the signing identity kept at ``path`` and register it as issuer ``name`` with ``role``."""
    identity = Identity.load_or_create(path)
    await register_issuer(js, identity.public_key, IssuerGrant(name, ["*"], role=role))
    return identity


async def bootstrap(js: JetStreamContext, settings: Settings, *, tenant: Tenant = DEMO_TENANT, key_name: str = "",
                    key_file: Path | None = None) -> Bootstrapped:
    """Provision, trust the edge's and the worker's identities under ``settings.state_dir``, make ``tenant``
    (kept if it exists) and an API key for it.

    With ``key_file`` the key's secret is kept there (mode 0600) and reused while it
    still works for ``tenant``, so a second ``tollgate up`` prints the same key.
    """
    await provision(js, settings)
    # The edge vouches for every tenant it authenticates; workers sign the usage they report.
    edge = await trust(js, edge_identity_path(settings), "edge", "edge")
    worker = await trust(js, worker_identity_path(settings), "worker", "worker")
    store = await TenancyStore.open(js, set(settings.tiers))
    with contextlib.suppress(Conflict):
        await store.create_tenant(tenant)
    return Bootstrapped(await _api_key(store, tenant.id, key_name, key_file), edge, worker)


async def _api_key(store: TenancyStore, tenant: str, name: str, key_file: Path | None) -> str:
    """The secret in ``key_file`` if it is still a usable key of ``tenant``; else a new key (saved there)."""
    if key_file is not None and key_file.exists():
        secret = key_file.read_text().strip()
        with contextlib.suppress(NotFound):
            key = await store.get_key(key_id_of(secret) or "-")
            if key.tenant == tenant and key.usable(time.time()) and key.hash == hash_key(secret):
                return secret
    _, secret = await store.create_key(tenant, name=name)
    if key_file is not None:
        write_private(key_file, secret.encode())
    return secret
