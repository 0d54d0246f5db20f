"""The whole stack on one machine as supervised processes: what `loopline up` and the demo run.

Order: Redis (unless LOOPLINE_REDIS_URL is given) -> trainer and monitor -> the first champion
(trained through the trainer when the registry has none) -> inference workers -> router. Each
step waits for the service's gRPC health before the next. `stop` reverses the order, so the
router stops taking calls before the workers drain and the workers flush their records before
Redis goes.

Environment: children inherit the caller's `LOOPLINE_*` variables, so any service setting can be
given as usual; the launcher sets only what wires the stack together (ports, Redis, MLflow, homes)
and a few defaults for a machine shared by many processes, which the caller's variables override.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loopline.errors import FailedPrecondition
from services.launcher.champion import (
    TrainingText,
    admin_metadata,
    champion_spec,
    retrain_spec,
    submit_and_follow,
    training_text,
)
from services.launcher.redis_server import redis_binary, redis_command, redis_ready
from services.launcher.settings import LauncherSettings
from services.launcher.supervisor import ChildSpec, Supervisor, grpc_serving

__all__ = ["Endpoints", "Stack", "free_port"]

# Defaults for a small shared machine; a LOOPLINE_* variable in the caller's environment wins.
WORKER_DEFAULTS = {
    "LOOPLINE_INFERENCE_INTRA_OP_THREADS": "1",
    "LOOPLINE_INFERENCE_ALLOW_SPINNING": "false",
    "LOOPLINE_INFERENCE_HEARTBEAT_SECONDS": "1",
    "LOOPLINE_INFERENCE_ALIAS_POLL_SECONDS": "2",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port(configured: int) -> int:
    return configured or free_port()


@dataclass
class Endpoints:
    """Where everything listens once the stack is up."""

    redis_url: str
    mlflow_uri: str
    router: str = ""
    trainer: str = ""
    monitor: str = ""
    workers: list[str] = field(default_factory=list)
    metrics: dict[str, str] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """For `endpoints.json`: what scripts and dashboards need to find every part."""
        return {**asdict(self), "logs": {name: str(path) for name, path in self.logs.items()}}

    def environment(self) -> dict[str, str]:
        """What a shell needs so that `loopline` commands reach this stack."""
        return {
            "LOOPLINE_REDIS_URL": self.redis_url,
            "LOOPLINE_MLFLOW_URI": self.mlflow_uri,
            "LOOPLINE_ROUTER_ADDRESS": self.router,
            "LOOPLINE_TRAINER_ADDRESS": self.trainer,
            "LOOPLINE_MONITOR_ADDRESS": self.monitor,
        }


class Stack:
    """Start with `up()`, block with `supervisor.watch()`, end with `down()`.

    `extra_env` adds per-service variables (keys: redis, trainer, monitor, inference, router),
    e.g. the demo's short monitor windows; they override the caller's environment.
    """

    def __init__(
        self,
        settings: LauncherSettings,
        on_event: Callable[[str], None] = lambda _: None,
        on_job_event: Callable[[Any], None] = lambda _: None,
        extra_env: Mapping[str, Mapping[str, str]] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.home = settings.home.resolve()
        self.say = on_event
        self.on_job_event = on_job_event
        self.extra_env = {k: dict(v) for k, v in (extra_env or {}).items()}
        self.environ = dict(os.environ if environ is None else environ)
        self.supervisor = Supervisor(on_event=on_event)
        mlflow_uri = settings.mlflow_uri or f"sqlite:///{self.home / 'mlflow.db'}"
        self.endpoints = Endpoints(redis_url=settings.redis_url or "", mlflow_uri=mlflow_uri)
        self.text: TrainingText | None = None
        # The services inherit LOOPLINE_ADMIN_TOKEN; the launcher's own admin calls carry it.
        self.metadata = admin_metadata(self.environ)

    # ----- environment -----

    def _env(self, service: str, wiring: Mapping[str, str]) -> dict[str, str]:
        base = {k: v for k, v in self.environ.items() if not k.startswith("LOOPLINE_UP_")}
        defaults = WORKER_DEFAULTS if service == "inference" else {}
        return {
            **defaults,
            **base,
            "LOOPLINE_REDIS_URL": self.endpoints.redis_url,
            "LOOPLINE_MLFLOW_URI": self.endpoints.mlflow_uri,
            "LOOPLINE_LOG_JSON": base.get("LOOPLINE_LOG_JSON", "1"),
            **wiring,
            **self.extra_env.get(service, {}),
        }

    def _metrics(self, name: str, port: int) -> dict[str, str]:
        if not self.settings.metrics_offset:
            return {}
        metrics_port = port + self.settings.metrics_offset
        if metrics_port > 65535:
            metrics_port = free_port()
        self.endpoints.metrics[name] = f"http://127.0.0.1:{metrics_port}/metrics"
        return {"METRICS_PORT": str(metrics_port)}

    def _service(
        self, name: str, module: str, service: str, port: int, fields: Mapping[str, str]
    ) -> ChildSpec:
        prefix = f"LOOPLINE_{service.upper()}_"
        own = {"PORT": str(port), "HOST": "127.0.0.1", **self._metrics(name, port), **fields}
        env = self._env(service, {prefix + key: value for key, value in own.items()})
        address = f"127.0.0.1:{port}"
        log = self.home / "logs" / f"{name}.log"
        self.endpoints.logs[name] = log
        return ChildSpec(
            name=name,
            argv=[sys.executable, "-m", module],
            env=env,
            log=log,
            ready=lambda: grpc_serving(address),
            address=address,
            stop_timeout=30.0,
        )

    # ----- steps -----

    def up(self) -> Endpoints:
        """Start everything; on any failure, stop what started and re-raise."""
        self.home.mkdir(parents=True, exist_ok=True)
        try:
            self._redis()
            self._trainer_and_monitor()
            self._ensure_champion()
            self._workers()
            self._router()
        except BaseException:
            self.down()
            raise
        return self.endpoints

    def down(self) -> dict[str, int | None]:
        return self.supervisor.stop()

    def _start(self, spec: ChildSpec) -> None:
        self.say(f"starting {spec.name} {spec.address}".rstrip())
        self.supervisor.start(spec, timeout=self.settings.start_timeout_seconds)

    def _redis(self) -> None:
        if self.settings.redis_url:
            if not redis_ready(self.settings.redis_url):
                raise FailedPrecondition(
                    f"LOOPLINE_REDIS_URL={self.settings.redis_url} does not answer PING"
                )
            return
        port = _port(self.settings.redis_port)
        url = f"redis://127.0.0.1:{port}/0"
        if redis_ready(url):
            raise FailedPrecondition(
                f"a Redis already answers on port {port}; stop it, set LOOPLINE_UP_REDIS_PORT "
                "to another port (0: any free one), or use it with LOOPLINE_REDIS_URL"
            )
        self.endpoints.redis_url = url
        log = self.home / "logs" / "redis.log"
        self.endpoints.logs["redis"] = log
        self._start(
            ChildSpec(
                name="redis",
                argv=redis_command(redis_binary(), port, self.home / "redis"),
                env=dict(self.environ),
                log=log,
                ready=lambda: redis_ready(url),
                address=url,
            )
        )

    def _trainer_and_monitor(self) -> None:
        trainer_port = _port(self.settings.trainer_port)
        self.endpoints.trainer = f"127.0.0.1:{trainer_port}"
        trainer_home = str(self.home / "trainer")
        self._start(
            self._service(
                "trainer", "services.trainer", "trainer", trainer_port, {"HOME": trainer_home}
            )
        )
        monitor_port = _port(self.settings.monitor_port)
        self.endpoints.monitor = f"127.0.0.1:{monitor_port}"
        fields = {"HOME": str(self.home / "monitor"), "TRAINER_ADDRESS": self.endpoints.trainer}
        if "LOOPLINE_MONITOR_RETRAIN_SPEC" not in self.environ:
            try:
                fields["RETRAIN_SPEC"] = str(self._retrain_spec_file())
            except FailedPrecondition as err:  # no text for its validation set: no triggers
                self.say(f"alerts will not start retraining: {err.message}")
        self._start(self._service("monitor", "services.monitor", "monitor", monitor_port, fields))

    def _training_text(self) -> TrainingText:
        if self.text is None:
            self.text = training_text(
                self.home, self.settings.data_dir, self.settings.champion_examples
            )
        return self.text

    def _retrain_spec_file(self) -> Path:
        """The spec a drift or accuracy alert submits (written once; edit it to taste)."""
        path = self.home / "retrain.yaml"
        if not path.exists():
            spec = retrain_spec(
                self.settings.model,
                self._training_text(),
                self.settings.champion_epochs,
                self.settings.max_length,
            )
            path.write_text(
                "# Submitted by the monitor when a drift or accuracy alert fires "
                "(LOOPLINE_MONITOR_RETRAIN_SPEC).\n" + yaml.safe_dump(spec, sort_keys=False)
            )
        return path

    def has_champion(self) -> bool:
        from loopline.registry import Registry

        registry = Registry(self.endpoints.mlflow_uri)
        return registry.alias_version(self.settings.model, "champion") is not None

    def train(self, spec: dict[str, Any], key: str) -> Any:
        """Run a job on the stack's trainer and follow it; the final Job (any state)."""
        return submit_and_follow(
            self.endpoints.trainer, spec, key, self.on_job_event, self.metadata
        )

    def _ensure_champion(self) -> None:
        if self.has_champion():
            self.say(f"{self.settings.model}@champion found in {self.endpoints.mlflow_uri}")
            return
        text = self._training_text()
        source = text.data_dir or "Rotten Tomatoes (datasets)"
        self.say(
            f"no {self.settings.model}@champion yet: training one on "
            f"{self.settings.champion_examples} sentences from {source}"
        )
        spec = champion_spec(
            self.settings.model,
            text,
            self.settings.champion_epochs,
            self.settings.max_length,
            self.settings.base_model,
        )
        job = self.train(spec, key=f"loopline-up-champion-{self.settings.model}-{time.time_ns()}")
        if not job.model.version:
            raise FailedPrecondition(
                f"training the first champion failed: {job.error or 'no version registered'} "
                f"(trainer log: {self.endpoints.logs['trainer']})"
            )
        self.say(f"{self.settings.model} version {job.model.version} is the champion")

    def _workers(self) -> None:
        models = [f"models:/{self.settings.model}@champion"]
        for n, configured in enumerate(self.settings.worker_ports):
            port = _port(configured)
            self.endpoints.workers.append(f"127.0.0.1:{port}")
            home = self.home / f"worker-{n}"
            fields = {
                "MODELS": json.dumps(models),
                "CACHE_DIR": str(home / "cache"),
                "SPOOL_PATH": str(home / "spool.jsonl"),
            }
            self._start(
                self._service(f"worker-{n}", "services.inference", "inference", port, fields)
            )

    def _router(self) -> None:
        port = _port(self.settings.router_port)
        self.endpoints.router = f"127.0.0.1:{port}"
        fields = {"DEFAULT_MODEL": self.settings.model}
        self._start(self._service("router", "services.router", "router", port, fields))
