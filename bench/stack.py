"""What every gateway benchmark sets up alike: the bus bootstrapped with a tenant no limit stops, the wait
until the edge serves the models under test, and a whole gateway (nats-server, edge, workers) for one run."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import nats

from bus.account.tenants import Limits, Tenant
from bus.settings import Settings, load_settings
from infra.bootstrap import bootstrap
from infra.children import stop_all
from infra.nats_launcher import NatsServer, free_port

ROOT = Path(__file__).resolve().parent.parent

# Limits so high that a benchmark measures the gateway, never a 429.
BENCH_TENANT = Tenant(id="bench", tier="enterprise", default_lane="normal", limits=Limits(rpm=10**9, tpm=10**12))


def bench_key(nats_url: str, settings: Settings) -> str:
    """Bootstrap the bus at ``nats_url`` with ``BENCH_TENANT``; return the tenant's API key."""
    async def run() -> str:
        nc = await nats.connect(nats_url)
        try:
            return (await bootstrap(nc.jetstream(), settings, tenant=BENCH_TENANT)).api_key
        finally:
            await nc.close()

    return asyncio.run(run())


def wait_serving(port: int, models: list[str], timeout: float) -> None:
    """Return once the edge on ``port`` serves every one of ``models``, or after ``timeout`` seconds
    (the benchmark's first request then says what is wrong)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:
                if all(json.load(resp)["models"].get(m) for m in models):
                    return
        except (OSError, ValueError):  # not up yet, or a half-started edge's answer
            pass
        time.sleep(0.1)


@dataclass(frozen=True)
class Gateway:
    """A running gateway: the edge's port, the bench tenant's API key and the run's scratch directory."""

    port: int
    key: str
    tmp: Path
    pids: dict[str, int]  # each process started for the run, by role ("nats-server", "edge", "billing", model)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def gateway(models_toml: str, models: list[str], *, tmp: Path | None = None, worker_env: dict | None = None,
            timeout: float = 120, billing: bool = False, worker_cmd: list[str] | None = None,
            logs: bool = False, edges: int = 1) -> Iterator[Gateway]:
    """A nats-server, an edge and one worker per name in ``models``, configured by ``models_toml`` (the
    config's model tables) on a fresh state directory; stopped on exit.

    ``billing`` adds the billing process (metering into chDB under the state directory); ``worker_cmd``
    replaces ``tollgate worker --model`` as the command each model's name is appended to; with ``logs``
    each process writes to ``<tmp>/<role>.log`` instead of this terminal; ``edges`` edge processes share
    the port (``processes.edges``), named edge, edge-2, …"""
    tmp = tmp or Path(tempfile.mkdtemp(prefix="tollgate-bench-"))
    port = free_port()
    config = tmp / "tollgate.toml"
    config.write_text(f'state_dir = "{tmp / "state"}"\n[edge]\nport = {port}\n[processes]\nedges = {edges}\n'
                      + models_toml)
    server = NatsServer(tmp / "nats").start()
    procs: list[subprocess.Popen] = []
    try:
        env = {**os.environ, "TOLLGATE_CONFIG": str(config), "TOLLGATE_NATS_URL": server.url, "PYTHONPATH": str(ROOT)}
        key = bench_key(server.url, load_settings(config, env))
        cli = [sys.executable, "-m", "infra.cli", "--log-level", "WARNING"]
        pids = {"nats-server": server.pid}
        worker = worker_cmd or [*cli, "worker", "--model"]
        starts = {**{"edge" + (f"-{n}" if n > 1 else ""): ([*cli, "edge"], env) for n in range(1, edges + 1)},
                  **({"billing": ([*cli, "billing"], env)} if billing else {}),
                  **{name: ([*worker, name], {**env, **(worker_env or {})}) for name in models}}
        for role, (argv, role_env) in starts.items():
            with open(tmp / f"{role}.log", "w") if logs else contextlib.nullcontext() as out:
                procs.append(subprocess.Popen(argv, env=role_env, cwd=ROOT, stdout=out,
                                              stderr=subprocess.STDOUT if logs else None))
            pids[role] = procs[-1].pid
        wait_serving(port, models, timeout)
        yield Gateway(port, key, tmp, pids)
    finally:
        stop_all(procs, 20)
        server.stop()
