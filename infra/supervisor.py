"""``tollgate up``: the whole stack on embedded defaults, in child processes, until Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import msgspec

from bus.connect import connect
from bus.errors import Conflict, NotFound
from bus.issuers import register_issuer
from bus.protocol import IssuerGrant
from bus.signing import Identity, write_private
from bus.provision import provision
from bus.settings import Settings
from bus.tenancy import Tenant, hash_key, key_id_of
from bus.tenancy_store import TenancyStore
from consumers.models import resolve
from edge.app import edge_identity_path
from infra.nats import roles
from infra.nats_launcher import NatsServer


def _secret_file(path: Path, make) -> str:
    if not path.exists():
        write_private(path, make().encode())
    return path.read_text().strip()


async def _bootstrap(settings: Settings) -> tuple[str, str]:
    """Provision the bus; make sure a default tenant and a working key for it exist.

    The key's secret is kept in the state dir (mode 0600) so that a second
    ``tollgate up`` prints the same key; it is re-minted if it no longer works.
    """
    state = Path(settings.state_dir)
    admin = settings.edge.admin_token or _secret_file(state / "admin_token", lambda: "tga-" + secrets.token_urlsafe(24))
    nc = await connect(settings.nats, "tollgate-up", service=False)
    try:
        js = nc.jetstream()
        await provision(js, settings)
        # The edge vouches for every tenant it authenticates.
        edge = Identity.load_or_create(edge_identity_path(settings))
        await register_issuer(js, edge.public_key, IssuerGrant("edge", ["*"]))
        store = await TenancyStore.open(js, set(settings.tiers))
        with contextlib.suppress(Conflict):
            await store.create_tenant(Tenant(id=DEFAULT_TENANT, tier="pro", name="Default tenant"))
        key_file = state / "api_key"
        if key_file.exists():
            secret = key_file.read_text().strip()
            with contextlib.suppress(NotFound):
                key = await store.get_key(key_id_of(secret) or "-")
                if key.tenant == DEFAULT_TENANT and key.usable(time.time()) and key.hash == hash_key(secret):
                    return secret, admin
        _, secret = await store.create_key(DEFAULT_TENANT, name="tollgate up")
        write_private(key_file, secret.encode())
        return secret, admin
    finally:
        await nc.close()


DEFAULT_TENANT = "default"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _wait_healthy(url: str, models: list[str], children: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in children:
            if child.poll() is not None:
                raise RuntimeError(f"{' '.join(child.args[3:])} exited with {child.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                live = json.load(resp)["models"]
            if all(live.get(m) for m in models):
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError("the stack did not become healthy in time")


def up(settings: Settings) -> int:
    """Start nats-server, provision, pull models, start edge, workers and billing; serve until Ctrl-C."""
    state = Path(settings.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    for name, spec in settings.models.items():
        resolve(name, spec, Path(settings.cache_dir), progress=True)
    # The configured port when free, so `tollgate tenants/keys` find the server with default settings.
    port = urlparse(settings.nats.url).port or 4222
    passwords = roles.load_or_create(roles.auth_file(settings.state_dir), tuple(settings.services))
    config = state / "nats.conf"
    write_private(config, roles.render(passwords).encode())
    server = NatsServer(state / "nats", port=port if _port_free(port) else None, config=config).start()
    settings = msgspec.structs.replace(settings, nats=msgspec.structs.replace(settings.nats, url=server.url))
    env = {**os.environ, "TOLLGATE_NATS_URL": server.url, "TOLLGATE_STATE_DIR": str(state)}
    children: list[subprocess.Popen] = []

    def spawn(role: str, *args: str) -> None:
        role_env = {**env, **roles.credentials(role, passwords[role])}
        children.append(subprocess.Popen([sys.executable, "-m", "infra.cli", *args], env=role_env))

    stop = False

    def on_signal(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    try:
        key, admin = asyncio.run(_bootstrap(roles.as_role(settings, "admin", passwords["admin"])))
        env["TOLLGATE_EDGE_ADMIN_TOKEN"] = admin
        spawn("billing", "billing")
        spawn("edge", "edge")
        for name in settings.models:
            spawn("worker", "worker", "--model", name)
        base = f"http://{settings.edge.host}:{settings.edge.port}"
        _wait_healthy(f"{base}/healthz", list(settings.models), children, timeout=300)
        model = next(iter(settings.models))
        nats_hint = "" if port == server.port else f"NATS is not on its usual port: export TOLLGATE_NATS_URL={server.url}\n"
        print(
            f"\nTollgate is up on {base}  (NATS {server.url}, ClickHouse {settings.clickhouse})\n"
            f"API key (tenant '{DEFAULT_TENANT}'): {key}\n"
            f"Admin token: {admin}\n{nats_hint}\n"
            f"curl {base}/v1/chat/completions -H 'Authorization: Bearer {key}' "
            f"-H 'Content-Type: application/json' "
            f"""-d '{{"model": "{model}", "messages": [{{"role": "user", "content": "What is the capital of France?"}}]}}'\n\n"""
            "Ctrl-C stops everything.",
            flush=True,
        )
        while not stop and all(child.poll() is None for child in children):
            time.sleep(0.2)
        dead = [c for c in children if c.poll() is not None]
        if dead and not stop:
            print(f"{' '.join(dead[0].args[3:])} exited with {dead[0].returncode}; stopping", file=sys.stderr)
            return 1
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        server.stop()
