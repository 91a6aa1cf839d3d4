"""`tollgate up` as an operator runs it: a real `python -m infra.cli --config FILE up` in a temp dir.

Its working directory holds a decoy ``tollgate.toml`` (another port, another state
dir), so a child that read it instead of FILE would be found out. One stack serves
every test but the first; the last one stops it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nats
import nats.js.errors
import pytest
from openai import AsyncOpenAI

from bus.settings import DEFAULT_MODELS
from bus.subjects import REQUESTS_STREAM, WORKERS_BUCKET, token
from consumers.models import resolve
from infra.nats.roles import inbox
from infra.nats_launcher import free_port

CHAT = "smollm2-135m"
# Same weights, a backend that does not exist: its worker dies at once, every time.
BROKEN = "broken-backend"
CRASH_LOOP_RESTARTS = 2
BANNER = "Tollgate is up on"


def _weights() -> str:
    """The demo model's cached weights (the suite's cache), pulled once if missing."""
    default = DEFAULT_MODELS[CHAT]
    return resolve(CHAT, default, Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tollgate")


class Up:
    """One `tollgate --config FILE up`, run from a directory with a decoy tollgate.toml."""

    def __init__(self, tmp: Path, models: list[str]):
        self.tmp = tmp
        self.edge_port, self.nats_port, decoy_port = free_port(), free_port(), free_port()
        self.state = tmp / "state"
        weights = _weights()
        model_tables = "".join(
            f'[models."{name}"]\nsource = "{weights}"\n'
            + ('backend = "no-such-backend"\n' if name == BROKEN else "temperature = 0.2\ntop_p = 0.9\n")
            for name in models
        )
        self.config = tmp / "conf" / "tollgate.toml"
        self.config.parent.mkdir()
        self.config.write_text(f"""
state_dir = "{self.state}"
clickhouse_dsn = "chdb://{tmp / 'clickhouse'}"

[nats]
url = "nats://127.0.0.1:{self.nats_port}"

[edge]
port = {self.edge_port}
worker_silence_s = 5

[worker]
heartbeat_s = 0.5
liveness_s = 0.5

[processes]
edges = 2
restart_backoff_s = 0.2
crash_loop_restarts = {CRASH_LOOP_RESTARTS}
drain_grace_s = 90  # generous: the drain test's requests run on two shared cores
stop_timeout_s = 10

{model_tables}""")
        self.cwd = tmp / "run"
        self.cwd.mkdir()
        (self.cwd / "tollgate.toml").write_text(f'state_dir = "{tmp / "decoy"}"\n[edge]\nport = {decoy_port}\n')
        self.decoy_port = decoy_port
        self.log_path = tmp / "up.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "infra.cli", "--config", str(self.config), "up"],
                                         cwd=self.cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.base_url = f"http://127.0.0.1:{self.edge_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> dict[int, str]:
        """The supervisor's live child processes: pid -> command line."""
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == self.proc.pid and fields[0] != "Z":
                found[int(entry.name)] = cmdline
        return found

    def pids(self, *words: str) -> set[int]:
        """Children whose command line ends with ``words`` (e.g. ``"edge"``, ``"--model", CHAT``)."""
        tail = " ".join(words) + " "
        return {pid for pid, cmd in self.children().items() if cmd.endswith(tail)}

    def wait_for(self, what: str, check, timeout: float = 120):
        """Poll ``check`` until it returns something truthy; fail saying ``what`` if it never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"tollgate up exited ({self.proc.returncode}) waiting for {what}; log {self.log_path}")
            result = check()
            if result:
                return result
            time.sleep(0.1)
        pytest.fail(f"timed out waiting for {what}; log {self.log_path}")

    def health(self, port: int | None = None) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{port or self.edge_port}/healthz", timeout=2) as resp:
            return json.load(resp)

    def serving(self, model: str) -> bool:
        try:
            return self.health()["models"].get(model) is True
        except OSError:
            return False

    def api_key(self) -> str:
        return (self.state / "api_key").read_text().strip()

    def client(self) -> AsyncOpenAI:
        return AsyncOpenAI(base_url=self.base_url + "/v1", api_key=self.api_key(), max_retries=0, timeout=90)

    async def admin_nats(self):
        password = json.loads((self.state / "nats-auth.json").read_text())["admin"]
        return await nats.connect(f"nats://127.0.0.1:{self.nats_port}", user="admin", password=password,
                                  inbox_prefix=inbox("admin").encode())

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def _gone(pid: int) -> bool:
    try:
        return (Path("/proc", str(pid), "stat").read_text().rsplit(")", 1)[1].split()[0]) == "Z"
    except OSError:
        return True


async def _ask(client: AsyncOpenAI, text: str = "What is the capital of France?", max_tokens: int = 8) -> str:
    reply = await client.chat.completions.create(model=CHAT, max_tokens=max_tokens,
                                                 messages=[{"role": "user", "content": text}])
    return reply.choices[0].finish_reason


def test_sigterm_while_waiting_for_health_stops_everything(tmp_path):
    up = Up(tmp_path, [CHAT])
    try:
        # The supervisor is past bootstrap and waiting for its worker (which loads for seconds).
        up.wait_for("the worker to be started", lambda: up.pids("--model", CHAT), timeout=120)
        assert BANNER not in up.log()
        started = set(up.children())
        sent = time.monotonic()
        up.proc.send_signal(signal.SIGTERM)
        returncode = up.proc.wait(timeout=60)
        took = time.monotonic() - sent
    finally:
        up.stop()
    assert returncode == 0, up.log()
    assert took < 15, f"took {took:.1f} s to stop"
    assert BANNER not in up.log(), "it went on starting the stack after SIGTERM"
    assert all(_gone(pid) for pid in started), "children left running"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    up = Up(tmp_path_factory.mktemp("up"), [CHAT, BROKEN])
    try:
        up.wait_for("the stack to be up", lambda: BANNER in up.log(), timeout=300)
        yield up
    finally:
        up.stop()


def test_children_use_the_config_file_up_was_given(stack):
    assert f"{BANNER} http://127.0.0.1:{stack.edge_port}" in stack.log()
    assert stack.health()["models"][CHAT] is True
    assert len(stack.pids("edge")) == 2, "both edges run, sharing the configured port"
    with pytest.raises(OSError):
        stack.health(stack.decoy_port)


async def test_a_crash_looping_worker_is_given_up_on_alone(stack):
    stack.wait_for("the broken worker to be given up on",
                   lambda: f"worker {BROKEN}#1 exited with status 1; giving up on it: crash loop" in stack.log(),
                   timeout=120)
    assert stack.log().count(f"worker {BROKEN}#1 exited with status 1; restarting it") == CRASH_LOOP_RESTARTS
    assert not stack.pids("--model", BROKEN)
    assert stack.pids("billing") and len(stack.pids("edge")) == 2
    assert await _ask(stack.client()) in ("stop", "length")


async def test_a_killed_worker_comes_back_while_the_edge_keeps_answering(stack):
    edges = stack.pids("edge")
    (worker,) = stack.pids("--model", CHAT)
    announced = f"serving {CHAT}"
    before = stack.log().count(announced)
    os.kill(worker, signal.SIGKILL)

    def back() -> bool:
        health = stack.health()  # the edge answers throughout (this raises otherwise)
        return stack.log().count(announced) > before and health["models"][CHAT]

    await asyncio.to_thread(stack.wait_for, "a new worker to announce itself", back, 120)
    assert f"worker {CHAT}#1 was killed by SIGKILL; restarting it" in stack.log()
    assert worker not in stack.pids("--model", CHAT)
    assert await _ask(stack.client()) in ("stop", "length")
    assert stack.pids("edge") == edges


async def test_killed_billing_is_restarted_and_the_edge_is_unaffected(stack):
    edges = stack.pids("edge")
    (billing,) = stack.pids("billing")
    os.kill(billing, signal.SIGKILL)
    assert await _ask(stack.client()) in ("stop", "length")  # billing down: requests still served
    stack.wait_for("billing to be restarted", lambda: stack.pids("billing") - {billing}, timeout=60)
    assert "billing was killed by SIGKILL; restarting it" in stack.log()

    def usage_answers() -> bool:
        request = urllib.request.Request(stack.base_url + "/v1/usage",
                                         headers={"Authorization": f"Bearer {stack.api_key()}"})
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                return resp.status == 200
        except (urllib.error.HTTPError, OSError):
            return False

    await asyncio.to_thread(stack.wait_for, "the restarted billing to answer usage queries", usage_answers, 60)
    assert stack.pids("edge") == edges


async def test_a_worker_started_by_hand_joins_the_stack(stack):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}  # no credentials given
    with open(stack.tmp / "hand-worker.log", "wb") as out:
        hand = subprocess.Popen([sys.executable, "-m", "infra.cli", "--config", str(stack.config), "worker",
                                 "--model", CHAT], cwd=stack.cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    nc = await stack.admin_nats()
    try:
        kv = await nc.jetstream().key_value(WORKERS_BUCKET)
        deadline = time.monotonic() + 120
        while True:
            try:
                keys = [k for k in await kv.keys() if k.startswith(token(CHAT) + ".")]
            except nats.js.errors.NoKeysError:  # no worker announced at this instant (one restarting, say)
                keys = []
            if len(keys) == 2:
                break
            assert hand.poll() is None, (stack.tmp / "hand-worker.log").read_text()
            assert time.monotonic() < deadline, f"the hand-started worker never announced itself: {keys}"
            await asyncio.sleep(0.2)
    finally:
        await nc.close()
        hand.send_signal(signal.SIGTERM)
        await asyncio.to_thread(hand.wait, 30)
    assert "Authorization Violation" not in (stack.tmp / "hand-worker.log").read_text()


async def test_sigterm_drains_edges_first_and_requests_in_flight_finish(stack):
    """Last: it stops the stack. Queued requests still run, because workers outlive the edges' drain."""
    children = set(stack.children())
    client = stack.client()
    asks = [asyncio.create_task(_ask(client, f"Count to {n}.", max_tokens=6)) for n in range(2)]
    nc = await stack.admin_nats()
    try:
        deadline = time.monotonic() + 30
        # Both published: one running on the only worker, one queued behind it.
        while (await nc.jetstream().stream_info(REQUESTS_STREAM)).state.messages < 2:
            assert time.monotonic() < deadline, "the requests were never queued"
            await asyncio.sleep(0.05)
    finally:
        await nc.close()
    stack.proc.send_signal(signal.SIGTERM)
    finishes = await asyncio.wait_for(asyncio.gather(*asks), timeout=120)
    assert all(f in ("stop", "length") for f in finishes)
    assert await asyncio.to_thread(stack.proc.wait, 120) == 0
    log = stack.log()
    order = [log.index(line) for line in ("stopping edges", "stopping workers and billing", "stopping nats-server")]
    assert order == sorted(order)
    assert all(_gone(pid) for pid in children)
