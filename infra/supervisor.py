"""``tollgate up``: the whole stack on embedded defaults, in supervised child processes, until Ctrl-C or SIGTERM."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import socket
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import msgspec

from bus.connect import connect
from bus.signing import write_private
from bus.settings import Settings
from consumers.models import resolve
from infra.bootstrap import DEFAULT_TENANT, bootstrap
from infra.children import Child, stop_group
from infra.nats import roles
from infra.nats_launcher import NatsCluster, NatsServer

log = logging.getLogger("tollgate.up")


def _secret_file(path: Path, make) -> str:
    if not path.exists():
        write_private(path, make().encode())
    return path.read_text().strip()


async def _bootstrap(settings: Settings) -> tuple[str, str]:
    """Bootstrap the bus for the default tenant; return its API key and the admin token.

    The key (and an admin token not set in the settings) is kept in the state dir (mode 0600),
    so that a second ``tollgate up`` prints the same; the key is re-minted if it no longer works.
    """
    state = Path(settings.state_dir)
    admin = settings.edge.admin_token or _secret_file(state / "admin_token", lambda: "tga-" + secrets.token_urlsafe(24))
    nc = await connect(settings.nats, "tollgate-up", service=False)
    try:
        done = await bootstrap(nc.jetstream(), settings, key_name="tollgate up", key_file=state / "api_key")
        return done.api_key, admin
    finally:
        await nc.close()


_ADMIN_TOKEN_ENV = "TOLLGATE_EDGE_ADMIN_TOKEN"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


class _Stop:
    """Set by SIGTERM or SIGINT; the supervisor checks it between short, bounded steps."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum, _frame) -> None:
        if not self.requested:
            log.info("%s received: draining the stack", signal.Signals(signum).name)
        self.requested = True


def _children(settings: Settings, env: dict[str, str], passwords: dict[str, str], admin: str) -> list[Child]:
    """Every process of the stack, as settings ask: ``processes.edges`` edges, workers per model, billing."""
    policy = settings.processes

    # Only edges serve admin routes, so only they are handed the admin token (an operator's
    # exported TOLLGATE_EDGE_ADMIN_TOKEN included: nothing else inherits it).
    base = {k: v for k, v in env.items() if k != _ADMIN_TOKEN_ENV}

    def child(name: str, role: str, *args: str, extra: dict[str, str] | None = None, user: str | None = None) -> Child:
        user = user or role  # the NATS role; workers have one per model
        role_env = {**base, **roles.credentials(user, passwords[user]), **(extra or {})}
        return Child(name, role, [sys.executable, "-m", "infra.cli", *args], role_env, policy)

    def metrics(variable: str, base: int, offset: int) -> dict[str, str]:
        # Each process of a kind its own /metrics port, counted up from the configured one (0: all off).
        return {variable: str(base + offset)} if base else {}

    edges = [child(f"edge#{i}", "edge", "edge",
                   extra={_ADMIN_TOKEN_ENV: admin, **metrics("TOLLGATE_EDGE_METRICS_PORT", settings.edge.metrics_port, i - 1)})
             for i in range(1, policy.edges + 1)]
    workers = [child(f"worker {name}#{i}", "worker", "worker", "--model", name, user=roles.worker_role(name),
                     extra=metrics("TOLLGATE_WORKER_METRICS_PORT", settings.worker.metrics_port, n))
               for n, (name, i) in enumerate((name, i) for name in settings.models
                                             for i in range(1, policy.workers_per_model + 1))]
    return [child("billing", "billing", "billing"), *edges, *workers]


def _ready(url: str, children: list[Child], models: list[str]) -> bool:
    """The edge answers, and each model is served or every worker of it has been given up on."""
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            live = json.load(resp)["models"]
    except (OSError, ValueError, KeyError):
        return False
    abandoned = {c.argv[-1] for c in children if c.role == "worker" and c.given_up}
    abandoned -= {c.argv[-1] for c in children if c.role == "worker" and not c.given_up}
    return all(live.get(m) or m in abandoned for m in models)


def _banner(settings: Settings, base: str, server: NatsServer | NatsCluster, port: int, key: str, admin: str,
            children: list[Child]) -> str:
    model = next(iter(settings.models))
    nats_hint = "" if port == server.port else f"NATS is not on its usual port: export TOLLGATE_NATS_URL={server.url}\n"
    if isinstance(server, NatsCluster):  # other commands must know every node, and provision at the same replicas
        nats_hint = (f"NATS is a cluster: export TOLLGATE_NATS_URL={server.url} "
                     f"TOLLGATE_NATS_REPLICAS={settings.nats.replicas}\n")
    given_up = "".join(f"Given up on {c.name} (crash loop; see the log above)\n" for c in children if c.given_up)
    host = settings.processes.metrics_host
    scraped = [f"{role} http://{host}:{port}/metrics" for role, port in (
        ("edge", settings.edge.metrics_port), ("billing", settings.meter.metrics_port),
        ("workers from", settings.worker.metrics_port)) if port]
    metrics = f"Prometheus: {', '.join(scraped)}\n" if scraped else ""
    return (
        f"\nTollgate is up on {base}  (NATS {server.url}, ClickHouse {settings.clickhouse})\n"
        f"API key (tenant '{DEFAULT_TENANT}'): {key}\n"
        f"Admin token: {admin}  (console: {base}/console)\n{metrics}{nats_hint}{given_up}\n"
        f"curl {base}/v1/chat/completions -H 'Authorization: Bearer {key}' "
        f"-H 'Content-Type: application/json' "
        f"""-d '{{"model": "{model}", "messages": [{{"role": "user", "content": "What is the capital of France?"}}]}}'\n\n"""
        "Ctrl-C stops everything."
    )


def _drain(children: list[Child], server: NatsServer | NatsCluster, policy) -> None:
    """Edges first (they stop accepting and finish what is in flight, which needs workers), then the rest, then NATS."""
    edges = [c for c in children if c.role == "edge"]
    log.info("stopping edges (grace %g s for requests in flight)", policy.drain_grace_s)
    stop_group(edges, policy.drain_grace_s + policy.stop_timeout_s)
    log.info("stopping workers and billing")
    stop_group([c for c in children if c.role != "edge"], policy.stop_timeout_s)
    log.info("stopping nats-server")
    server.stop()


def up(settings: Settings, config: Path | None = None, nats_cluster: int = 0) -> int:
    """Start nats-server, provision, pull models, start edges, workers and billing, and supervise them.

    With ``nats_cluster`` nodes (2 or more) NATS is a local cluster instead of one server,
    every stream and bucket has min(3, nodes) replicas, and every child is given each
    node's URL, so the stack rides through the loss of a node.

    A child that dies is restarted (``processes`` settings: backoff, crash-loop limit),
    never taking the rest down. SIGTERM or Ctrl-C, at any point, drains the stack in
    order. ``config`` is the settings file in force, handed to every child.
    """
    state = Path(settings.state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    try:
        for name, spec in settings.models.items():
            resolve(name, spec, Path(settings.cache_dir), progress=True)
    except KeyboardInterrupt:
        return 130
    stop = _Stop()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # The configured port when free, so `tollgate tenants/keys` find the server with default settings.
    port = urlparse(settings.nats.servers[0]).port or 4222
    passwords = roles.load_or_create(roles.auth_file(str(state)), tuple(settings.services), tuple(settings.models))
    nats_config = state / "nats.conf"
    write_private(nats_config, roles.render(passwords).encode())
    first_port = port if _port_free(port) else None
    if nats_cluster > 1:
        # Its own data directory: a single server's streams are not a cluster's.
        server = NatsCluster(state / "nats-cluster", nats_cluster, config=nats_config, port=first_port).start()
        replicas = min(3, nats_cluster)
    else:
        server = NatsServer(state / "nats", port=first_port, config=nats_config).start()
        replicas = 1  # one server can hold one copy, whatever the settings say
    settings = msgspec.structs.replace(settings, state_dir=str(state),
                                       nats=msgspec.structs.replace(settings.nats, url=server.url, replicas=replicas))
    # Children read the same file (not whatever ./tollgate.toml their working directory has) and the environment.
    env = {**os.environ, "TOLLGATE_NATS_URL": server.url, "TOLLGATE_NATS_REPLICAS": str(replicas),
           "TOLLGATE_STATE_DIR": str(state)}
    if config is not None:
        env["TOLLGATE_CONFIG"] = str(config.resolve())
    children: list[Child] = []
    try:
        key, admin = asyncio.run(_bootstrap(roles.as_role(settings, "admin", passwords["admin"])))
        children = _children(settings, env, passwords, admin)
        base = f"http://{settings.edge.host}:{settings.edge.port}"
        ready_by = time.monotonic() + settings.processes.ready_timeout_s
        announced = False
        while not stop.requested:
            now = time.monotonic()
            for child in children:
                child.tend(now)
            if not announced and (_ready(f"{base}/healthz", children, list(settings.models)) or now > ready_by):
                print(_banner(settings, base, server, port, key, admin, children), flush=True)
                announced = True
            time.sleep(0.2)
        return 0
    finally:
        _drain(children, server, settings.processes)
