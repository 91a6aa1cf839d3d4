"""``tollgate up``: the whole stack on embedded defaults, in child processes, until Ctrl-C."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import msgspec
import nats

from bus.provision import provision
from bus.settings import Settings
from consumers.models import resolve
from infra.nats_launcher import NatsServer


def api_key(settings: Settings) -> str:
    """The configured key, else the one kept in the state dir (created on first start)."""
    if settings.edge.api_key:
        return settings.edge.api_key
    path = Path(settings.state_dir, "api_key")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("sk-tg-" + secrets.token_urlsafe(24))
        path.chmod(0o600)
    return path.read_text().strip()


async def _provision(settings: Settings) -> None:
    nc = await nats.connect(settings.nats.url)
    try:
        await provision(nc.jetstream(), settings)
    finally:
        await nc.close()


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
    """Start nats-server, provision, pull models, start edge, workers and meter; serve until Ctrl-C."""
    state = Path(settings.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    for name, spec in settings.models.items():
        resolve(name, spec, Path(settings.cache_dir), progress=True)
    server = NatsServer(state / "nats").start()
    settings = msgspec.structs.replace(settings, nats=msgspec.structs.replace(settings.nats, url=server.url))
    key = api_key(settings)
    env = {**os.environ, "TOLLGATE_NATS_URL": server.url, "TOLLGATE_EDGE_API_KEY": key, "TOLLGATE_STATE_DIR": str(state)}
    children: list[subprocess.Popen] = []

    def spawn(*args: str) -> None:
        children.append(subprocess.Popen([sys.executable, "-m", "infra.cli", *args], env=env))

    stop = False

    def on_signal(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    try:
        asyncio.run(_provision(settings))
        spawn("meter")
        spawn("edge")
        for name in settings.models:
            spawn("worker", "--model", name)
        base = f"http://{settings.edge.host}:{settings.edge.port}"
        _wait_healthy(f"{base}/healthz", list(settings.models), children, timeout=300)
        model = next(iter(settings.models))
        print(
            f"\nTollgate is up on {base}  (NATS {server.url}, ClickHouse {settings.clickhouse})\n"
            f"API key: {key}\n\n"
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
