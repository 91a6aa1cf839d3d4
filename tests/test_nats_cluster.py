"""A three-node NATS cluster that loses a node under steady traffic, billing running.

One node is killed with SIGKILL and restarted twice: first a follower, then the leader of
both the REQUESTS and the USAGE streams. Clients may see retryable errors (502/503/504,
a dropped connection) while leaders move, and are answered again while the node is still
down; every answered request is billed exactly once; the restarted node catches up.

With one replica the killed leader takes its streams with it: nothing is answered until
it is back, which the test refuses.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
import json
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import nats.errors
import nats.js.errors
import openai
import pytest

from bus.connect import connect
from bus.settings import load_settings
from bus.subjects import METER_CONSUMER, REQUESTS_STREAM, USAGE_STREAM
from infra.nats import roles
from infra.nats_launcher import NatsCluster, free_port, healthy
from tests.conftest import (
    CHAT_MODEL, ROOT, BillingRunner, Stack, _config, eventually, request_id,
)

CLIENTS = 4
RETRYABLE = (502, 503, 504)
# A node down this long after the cluster answers again: its peers keep serving meanwhile.
DOWN_S = 4.0


class ClusterStack(Stack):
    """The test stack on a cluster: every connection is given each node and rides through reconnects."""

    async def connect(self, role: str):
        return await connect(self.role(role), f"test-{role}")


@dataclass
class Traffic:
    """Clients sending short chat requests until stopped; what each got, and when."""

    answered: list[tuple[float, str]] = field(default_factory=list)  # (time, request id)
    errors: list[tuple[float, str]] = field(default_factory=list)  # (time, what the client saw)
    unexpected: list[str] = field(default_factory=list)  # errors a client may not retry

    def answered_since(self, t: float) -> int:
        return sum(1 for at, _ in self.answered if at > t)

    def errors_between(self, start: float, end: float) -> dict[str, int]:
        return dict(Counter(what for at, what in self.errors if start <= at <= end))


async def _client_loop(client: openai.AsyncOpenAI, traffic: Traffic, stop: asyncio.Event, n: int) -> None:
    i = 0
    while not stop.is_set():
        i += 1
        try:
            done = await client.chat.completions.create(
                model=CHAT_MODEL, messages=[{"role": "user", "content": f"Say hi ({n}.{i})"}], max_tokens=1 + i % 2)
            traffic.answered.append((time.monotonic(), request_id(done.id)))
        except openai.APIStatusError as exc:
            traffic.errors.append((time.monotonic(), f"{exc.status_code} {exc.code}: {exc.message[:60]}"))
            if exc.status_code not in RETRYABLE:
                traffic.unexpected.append(f"{exc.status_code}: {exc.message}")
            await asyncio.sleep(0.2)  # as a client honouring Retry-After would, briefly
        except openai.APIConnectionError as exc:  # a timeout is one too
            traffic.errors.append((time.monotonic(), type(exc).__name__))
            await asyncio.sleep(0.2)


@pytest.fixture(scope="module")
def cluster_stack(tmp_path_factory):
    """Three routed nats-server nodes with the project's users; an edge and a smollm2 worker on them."""
    tmp = tmp_path_factory.mktemp("cluster")
    edge_port = free_port()
    config = _config(tmp, edge_port)
    passwords = roles.load_or_create(tmp / "nats-auth.json", models=(CHAT_MODEL,))
    (tmp / "nats.conf").write_text(roles.render(passwords))
    cluster = NatsCluster(tmp / "nats", 3, config=tmp / "nats.conf").start()
    st = ClusterStack(tmp, config, cluster.url, edge_port, passwords)
    # Every process, this one included, provisions at three replicas.
    st.env["TOLLGATE_NATS_REPLICAS"] = "3"
    st.settings = load_settings(config, st.env)
    try:
        st.bootstrap()
        subprocess.run([sys.executable, "-m", "infra.cli", "models", "pull", CHAT_MODEL], env=st.env, cwd=ROOT,
                       check=True)
        st.spawn("edge", "edge")
        st.spawn(roles.worker_role(CHAT_MODEL), "worker", "--model", CHAT_MODEL)
        st.wait_serving(CHAT_MODEL)
        yield st, cluster
    finally:
        st.stop()
        cluster.stop()


async def _leaders(js) -> dict[str, str]:
    return {name: (await js.stream_info(name)).cluster.leader for name in (REQUESTS_STREAM, USAGE_STREAM)}


async def _lead_both_from(nc, node: str) -> None:
    """Move the USAGE stream's leadership to ``node``, which leads REQUESTS, so one kill takes both."""
    request = json.dumps({"placement": {"preferred": node}}).encode()
    await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{USAGE_STREAM}", request, timeout=5)

    async def moved():
        return (await _leaders(nc.jetstream()))[USAGE_STREAM] == node

    await eventually(moved, timeout=15)


async def _caught_up(js, node: str) -> bool:
    """``node`` is a current replica, with no lag, of REQUESTS, USAGE and the meter's consumer."""
    try:
        infos = [(await js.stream_info(s)).cluster for s in (REQUESTS_STREAM, USAGE_STREAM)]
        infos.append((await js.consumer_info(USAGE_STREAM, METER_CONSUMER)).cluster)
    except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError):
        return False  # the cluster is still settling after the restart: ask again
    for info in infos:
        if info.leader == node:
            continue
        peer = next((p for p in info.replicas or [] if p.name == node), None)
        if peer is None or not peer.current or (peer.lag or 0) != 0:
            return False
    return True


async def _kill_and_restart(cluster: NatsCluster, js, traffic: Traffic, name: str) -> dict:
    """SIGKILL node ``name``; once the others answer clients again, keep it down a while, then restart
    it and wait until it has caught up. Returns what was measured."""
    node = cluster.node(name)
    killed = time.monotonic()
    node.kill()
    # Answered while the node is still down: the other two hold every stream and elect new leaders.
    await _until(lambda: traffic.answered_since(killed) >= CLIENTS, 30, "answered again")
    recovered = time.monotonic()
    await asyncio.sleep(DOWN_S)
    answered_while_down = traffic.answered_since(killed)
    leaders_while_down = await _leaders(js)
    restarted = time.monotonic()
    await asyncio.to_thread(node.start)
    await _until(lambda: healthy(node), 60, f"{name} healthy")

    async def caught_up():
        return await _caught_up(js, name)

    await eventually(caught_up, timeout=30)
    return {"recover_s": recovered - killed, "answered_while_down": answered_while_down,
            "leaders_while_down": leaders_while_down, "catch_up_s": time.monotonic() - restarted,
            "errors": traffic.errors_between(killed, time.monotonic())}


async def _until(predicate, timeout: float, what: str) -> None:
    """Wait until ``predicate()`` is true; ``predicate`` may block briefly (it runs in a thread)."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        assert time.monotonic() < deadline, f"not {what} after {timeout}s"
        await asyncio.sleep(0.1)


async def test_losing_a_follower_and_then_the_leader_loses_and_doubles_no_usage(cluster_stack, clickhouse):
    st, cluster = cluster_stack
    # chDB allows one engine path per process: this cluster's billing shares the session's tables, and
    # reads back only the rows of requests queued since it started.
    ch, since = clickhouse, datetime.fromtimestamp(time.time(), timezone.utc)
    billing = BillingRunner(st, ch)
    await billing.start()
    admin = await st.connect("admin")
    js = admin.jetstream()
    traffic, stop = Traffic(), asyncio.Event()
    clients = [st.client(timeout=30) for _ in range(CLIENTS)]
    loops = [asyncio.create_task(_client_loop(c, traffic, stop, n)) for n, c in enumerate(clients)]
    try:
        for info in [await js.stream_info(s) for s in (REQUESTS_STREAM, USAGE_STREAM)]:
            assert info.config.num_replicas == 3 and len(info.cluster.replicas) == 2
        await _until(lambda: len(traffic.answered) >= 2 * CLIENTS, 60, "answering")

        leaders = await _leaders(js)
        follower = next(n.cluster.name for n in cluster.nodes if n.cluster.name not in leaders.values())
        lost_follower = await _kill_and_restart(cluster, js, traffic, follower)

        leader = (await _leaders(js))[REQUESTS_STREAM]
        await _lead_both_from(admin, leader)
        lost_leader = await _kill_and_restart(cluster, js, traffic, leader)
        assert leader not in lost_leader["leaders_while_down"].values()

        await asyncio.sleep(1)  # steady traffic again on all three nodes
    finally:
        stop.set()
        await asyncio.gather(*loops)
    print(f"\nfollower {follower}: {lost_follower}\nleader {leader}: {lost_leader}\n"
          f"answered {len(traffic.answered)}, errors {len(traffic.errors)}")

    try:
        assert traffic.unexpected == []
        answered = [rid for _, rid in traffic.answered]
        assert len(set(answered)) == len(answered)

        async def billed():
            rows = await ch.query("SELECT request_id, count() FROM usage_events WHERE queued_at >= {since:DateTime64(6)} "
                                  "GROUP BY request_id", {"since": since})
            counts = dict(rows)
            return counts if all(rid in counts for rid in answered) else None

        counts = await eventually(billed, timeout=60)
        # Rows are counted as inserted (no FINAL): a request stored twice would show here.
        assert {rid: n for rid, n in counts.items() if n != 1} == {}
        # Unanswered but billed: a publish the edge answered 503 for that had landed, and ran.
        unanswered = set(counts) - set(answered)
        print(f"usage rows {sum(counts.values())} for {len(answered)} answered requests; "
              f"{len(unanswered)} for requests whose client saw an error")
        assert len(unanswered) <= len(traffic.errors)
    finally:
        await admin.close()
        await billing.stop()
