"""Supervised child processes for `loopline up`: start, wait for health, restart after a crash,
stop in order, and leave nothing behind.

Each child runs in its own session (a terminal's Ctrl-C reaches only the launcher, which then
stops the children in reverse start order) and, on Linux, asks the kernel for SIGTERM should the
launcher die without cleaning up (`PR_SET_PDEATHSIG`). Stopping sends SIGTERM, waits for the
service's own drain, then SIGKILLs the child's whole process group, so helpers it spawned (the
trainer's job processes) go too.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Child", "ChildSpec", "StartupError", "Supervisor", "grpc_serving"]

PR_SET_PDEATHSIG = 1


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None


# Loaded before any fork: between fork and exec the child only calls the resolved function.
_LIBC = _libc() if sys.platform == "linux" else None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def grpc_serving(address: str, timeout: float = 1.0) -> bool:
    """True when the gRPC health service at `address` answers SERVING for the whole server."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


@dataclass(frozen=True)
class ChildSpec:
    """What to run, how to tell it is ready, and how long it may take to drain on SIGTERM."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str]
    log: Path
    ready: Callable[[], bool]
    address: str = ""
    metrics: str = ""
    stop_timeout: float = 20.0


@dataclass
class Child:
    """One supervised process and its restart history."""

    spec: ChildSpec
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0
    next_start: float = 0.0
    exits: list[int] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        self.spec.log.parent.mkdir(parents=True, exist_ok=True)
        with self.spec.log.open("ab") as log:
            self.process = subprocess.Popen(
                list(self.spec.argv),
                env=dict(self.spec.env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # A plain prctl call on a preloaded libc: no locks, no allocation by us.
                preexec_fn=_die_with_parent if _LIBC is not None else None,  # noqa: PLW1509
            )
        self.started_at = time.monotonic()

    def stop(self) -> int | None:
        """SIGTERM, wait up to `stop_timeout`, then SIGKILL the process group. The exit code."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=self.spec.stop_timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # the child's helpers, and itself if stuck
        return process.wait()

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.spec.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class StartupError(RuntimeError):
    """A child did not become ready; the message names it and quotes its log."""


class Supervisor:
    """Children started in order; `watch` restarts the ones that exit until `stop` is called.

    Restarts back off exponentially (1 s doubling to `max_backoff`), and the back-off resets once
    a child has stayed up for `healthy_after` seconds, so a crash loop does not spin the CPU while
    a one-off crash is repaired at once.
    """

    def __init__(
        self,
        on_event: Callable[[str], None] = lambda _: None,
        max_backoff: float = 30.0,
        healthy_after: float = 60.0,
    ) -> None:
        self.children: list[Child] = []
        self._on_event = on_event
        self._max_backoff = max_backoff
        self._healthy_after = healthy_after
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    def start(self, spec: ChildSpec, timeout: float = 120.0) -> Child:
        """Start `spec` and return once it is ready; StartupError (with its log) otherwise."""
        child = Child(spec)
        with self._lock:
            self.children.append(child)
            child.start()
        deadline = time.monotonic() + timeout
        while not spec.ready():
            if self._stopping.is_set():
                raise StartupError(f"{spec.name}: stopped while starting")
            if not child.running:
                code = child.process.returncode if child.process else None
                raise StartupError(
                    f"{spec.name} exited with code {code} while starting; its log "
                    f"({spec.log}) ends with:\n{child.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise StartupError(
                    f"{spec.name} was not ready within {timeout:.0f} s; its log ({spec.log}) "
                    f"ends with:\n{child.log_tail()}"
                )
            time.sleep(0.2)
        return child

    def check(self) -> None:
        """Restart every child that exited (one pass; `watch` calls it in a loop)."""
        now = time.monotonic()
        with self._lock:
            for child in self.children:
                if self._stopping.is_set() or child.running or child.process is None:
                    continue
                if child.next_start == 0.0:
                    code = child.process.returncode
                    # What the dead child started (its process group) goes with it.
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(child.process.pid, signal.SIGKILL)
                    child.exits.append(code)
                    uptime = now - child.started_at
                    if uptime >= self._healthy_after:
                        child.restarts = 0
                    delay = min(self._max_backoff, 2.0**child.restarts)
                    child.next_start = now + delay
                    self._on_event(
                        f"{child.spec.name} exited with code {code} after {uptime:.0f} s; "
                        f"restarting in {delay:.0f} s (log: {child.spec.log})"
                    )
                elif now >= child.next_start:
                    child.restarts += 1
                    child.next_start = 0.0
                    child.start()
                    self._on_event(f"{child.spec.name} restarted (restart {child.restarts})")

    def watch(self, interval: float = 0.5) -> None:
        """Block, restarting crashed children, until `request_stop` (e.g. from a signal)."""
        while not self._stopping.wait(interval):
            self.check()

    def request_stop(self) -> None:
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stop(self) -> dict[str, int | None]:
        """Stop every child, last started first; their exit codes by name."""
        self._stopping.set()
        codes: dict[str, int | None] = {}
        with self._lock:
            for child in reversed(self.children):
                codes[child.spec.name] = child.stop()
        return codes
