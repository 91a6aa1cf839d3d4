"""The processes ``tollgate up`` supervises: each restarted on its own when it dies, until it crash-loops."""

from __future__ import annotations

import ctypes
import logging
import shlex
import signal
import subprocess
import sys
import time
from collections import deque

from bus.settings import ProcessSettings

log = logging.getLogger("tollgate.up")

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it if the supervisor dies, so a killed ``up`` leaves no orphans."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def describe_exit(returncode: int) -> str:
    """``exited with status 1`` or ``was killed by SIGKILL``."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


class Child:
    """One ``tollgate <role> …`` process, restarted with backoff when it dies and given up on in a crash loop.

    Deaths are counted over a sliding window (``crash_loop_window_s``): the restart
    delay doubles with each death in it, and one death more than
    ``crash_loop_restarts`` gives this child up — only this one; the rest keep running.
    """

    def __init__(self, name: str, role: str, argv: list[str], env: dict[str, str], policy: ProcessSettings):
        self.name, self.role, self.argv, self.env, self.policy = name, role, argv, env, policy
        self.proc: subprocess.Popen | None = None
        self.deaths: deque[float] = deque()
        self.restart_at = 0.0
        self.given_up = False
        self.stopping = False

    def start(self) -> None:
        # Its own process group: a terminal's Ctrl-C reaches only the supervisor, which stops children in order.
        self.proc = subprocess.Popen(self.argv, env=self.env, process_group=0, preexec_fn=_die_with_parent)
        log.info("started %s (pid %d)", self.name, self.proc.pid)

    def tend(self, now: float) -> None:
        """Notice a death and decide about it, or start the child again once its backoff is over."""
        if self.given_up or self.stopping:
            return
        if self.proc is None:
            if now >= self.restart_at:
                self.start()
            return
        returncode = self.proc.poll()
        if returncode is None:
            return
        self.proc = None
        self.deaths.append(now)
        while self.deaths[0] < now - self.policy.crash_loop_window_s:
            self.deaths.popleft()
        window = f"{len(self.deaths)} deaths within {self.policy.crash_loop_window_s:g} s"
        if len(self.deaths) > self.policy.crash_loop_restarts:
            self.given_up = True
            log.error("%s %s; giving up on it: crash loop (%s, limit %d restarts); the rest of the stack keeps running",
                      self.name, describe_exit(returncode), window, self.policy.crash_loop_restarts)
            return
        delay = min(self.policy.restart_backoff_max_s, self.policy.restart_backoff_s * 2 ** (len(self.deaths) - 1))
        self.restart_at = now + delay
        log.warning("%s %s; restarting it in %.1f s (%s)", self.name, describe_exit(returncode), delay, window)


def stop_group(children: list[Child], timeout: float) -> None:
    """Stop restarting the children, then stop their processes together (``stop_all``)."""
    for child in children:
        child.stopping = True
    stop_all([child.proc for child in children if child.proc is not None], timeout)


def stop_all(procs: list[subprocess.Popen], timeout: float) -> None:
    """SIGTERM every process at once (each drains and leaves), wait up to ``timeout`` for all of them together,
    SIGKILL the ones still there."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("pid %d did not stop in time; killing it: %s", proc.pid, shlex.join(map(str, proc.args)))
            proc.kill()
            proc.wait()
