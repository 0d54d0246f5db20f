"""The container files describe the stack the design asks for.

No Docker engine runs here, so `docker-compose config` is the parser: it validates both compose
files, resolves anchors and merges the GPU override the way `up` would. The tests then check the
merged result against the services' real settings classes, the Prometheus and Grafana files and
the Dockerfiles. `make test` installs docker-compose first (scripts/ensure_compose.sh).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from loopline.settings import ServiceSettings, env_var_name, load_settings
from services.inference.settings import InferenceSettings
from services.monitor.settings import MonitorSettings
from services.router.settings import RouterSettings
from services.trainer.settings import TrainerSettings

ROOT = Path(__file__).resolve().parents[2]
BASE = "docker-compose.yml"
GPU = "docker-compose.gpu.yml"
SETTINGS: dict[str, type[ServiceSettings]] = {
    "router": RouterSettings,
    "inference": InferenceSettings,
    "trainer": TrainerSettings,
    "monitor": MonitorSettings,
}
INFRASTRUCTURE = {"redis", "postgres", "mlflow", "prometheus", "grafana"}
DASHBOARD = ROOT / "deploy" / "grafana" / "loopline.json"

Config = dict[str, Any]
Service = dict[str, Any]


def compose_command() -> list[str]:
    """`docker-compose` (1.28+), else the Compose v2 plugin; failing, say how to get one."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    pytest.fail("no docker-compose command: run scripts/ensure_compose.sh (make test does)")


def compose_config(empty_env_file: Path, *files: str) -> Config:
    """The merged configuration, with every ${VARIABLE:-default} at its default: no LOOPLINE_
    variables from the shell, and an empty env file instead of a developer's `.env`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOPLINE_", "COMPOSE_"))}
    args = [arg for name in files for arg in ("-f", name)]
    command = [*compose_command(), "--env-file", str(empty_env_file), *args, "config"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stderr}"
    config: Config = yaml.safe_load(done.stdout)
    return config


@pytest.fixture(scope="module")
def empty_env_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("compose") / "empty.env"
    path.touch()
    return path


@pytest.fixture(scope="module")
def cpu(empty_env_file: Path) -> Config:
    return compose_config(empty_env_file, BASE)


@pytest.fixture(scope="module")
def gpu(empty_env_file: Path) -> Config:
    return compose_config(empty_env_file, BASE, GPU)


@pytest.fixture(params=["cpu", "gpu"])
def config(request: pytest.FixtureRequest) -> Config:
    """Each check that holds for both stacks runs on both."""
    merged: Config = request.getfixturevalue(request.param)
    return merged


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in [n for n in os.environ if n.startswith("LOOPLINE_")]:
        monkeypatch.delenv(name)
    return monkeypatch


# --- reading the merged configuration (docker-compose 1.x and Compose v2 print it differently)


def kind(service: Service) -> str | None:
    """`router`, `inference`, `trainer` or `monitor` for a Loopline service, from its Dockerfile."""
    dockerfile = str(service.get("build", {}).get("dockerfile", ""))
    found = re.fullmatch(r"(?:.*/)?docker/Dockerfile\.(\w+)", dockerfile)
    return found.group(1) if found and found.group(1) in SETTINGS else None


def loopline_services(config: Config) -> dict[str, Service]:
    return {name: s for name, s in config["services"].items() if kind(s)}


def environment(service: Service) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def mounts(service: Service) -> list[tuple[str, str]]:
    """(source, target) of every volume and bind mount; a named volume's source is its name."""
    found = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            found.append((str(volume.get("source", "")), str(volume["target"])))
        else:
            source, target = volume.split(":")[:2]
            found.append((source, target))
    return found


def published(service: Service) -> list[tuple[str, str]]:
    """(host address, container port) of every published port."""
    found = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            found.append((str(port.get("host_ip", "")), str(port["target"])))
        else:
            parts = str(port).split("/")[0].split(":")
            found.append((parts[0] if len(parts) == 3 else "", parts[-1]))
    return found


def extras(service: Service) -> set[str]:
    """The extras an image is built with: the build argument, else the Dockerfile's default."""
    value = service["build"].get("args", {}).get("EXTRAS")
    if value is None:
        value = dockerfile_arg(dockerfile_of(service), "EXTRAS")
    return set(str(value).split(","))


def gpu_reservations(service: Service) -> list[dict[str, Any]]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {})
    return [
        d
        for d in devices.get("devices", [])
        if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])
    ]


def settings_of(
    service: Service, settings_cls: type[ServiceSettings], env: pytest.MonkeyPatch
) -> Any:
    for name, value in environment(service).items():
        env.setenv(name, value)
    return load_settings(settings_cls)


def under_volume(service: Service, path: Path, volumes: Config) -> bool:
    """Whether `path` (in the container) lies on a named volume, so it survives a recreate."""
    return any(
        source in volumes and path.is_relative_to(target) for source, target in mounts(service)
    )


# --- reading Dockerfiles


def dockerfile_of(service: Service) -> Path:
    return Path(service["build"]["context"]) / service["build"]["dockerfile"]


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [
        line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")
    ]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [
        (word.upper(), rest.strip())
        for word, _, rest in (line.strip().partition(" ") for line in joined.splitlines())
        if word
    ]


def dockerfile_arg(dockerfile: Path, name: str) -> str:
    for instruction, args in instructions(dockerfile):
        if instruction == "ARG" and args.startswith(f"{name}="):
            return args.split("=", 1)[1]
    raise AssertionError(f"{dockerfile.name} has no ARG {name}=default")


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    found = instructions(dockerfile)
    start = max(i for i, (instruction, _) in enumerate(found) if instruction == "FROM")
    return found[start:]


def loopline_dockerfiles() -> list[Path]:
    return [ROOT / "docker" / f"Dockerfile.{name}" for name in SETTINGS]


# --- the stack


def test_the_stack_has_every_part(config: Config) -> None:
    services = config["services"]
    assert set(services) >= INFRASTRUCTURE
    kinds = sorted(str(kind(s)) for s in loopline_services(config).values())
    assert kinds == ["inference", "inference", "monitor", "router", "trainer"]


def test_redis_and_mlflow_keep_their_data(cpu: Config) -> None:
    services, volumes = cpu["services"], cpu["volumes"]
    redis = services["redis"]
    assert "--appendonly" in redis["command"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert under_volume(redis, Path("/data"), volumes)
    assert under_volume(services["postgres"], Path("/var/lib/postgresql/data"), volumes)
    mlflow = services["mlflow"]
    env = environment(mlflow)
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert "@postgres:5432/" in env["MLFLOW_BACKEND_STORE_URI"]
    assert under_volume(mlflow, Path(env["MLFLOW_ARTIFACTS_DESTINATION"]), volumes)
    assert "--serve-artifacts" in mlflow["command"]
    # The server refuses Host headers it does not know: the name the services dial must be one.
    assert "mlflow:5000" in env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert "psycopg2" in dockerfile_of(mlflow).read_text()


def test_every_service_has_a_healthcheck(config: Config) -> None:
    for name, service in config["services"].items():
        check = service.get("healthcheck", {})
        assert not check.get("disable"), name
        assert check.get("test"), name
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name


def test_loopline_healthchecks_probe_the_service_port(config: Config) -> None:
    for name, service in loopline_services(config).items():
        test = service["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"], name
        assert "grpc_health.v1" in test[3], name
        port = environment(service)[f"LOOPLINE_{str(kind(service)).upper()}_PORT"]
        assert test[4:] == [port], f"{name} probes port {test[4:]}, serves on {port}"


def test_settings_are_real_and_fit_containers(
    config: Config, clean_env: pytest.MonkeyPatch
) -> None:
    """Every LOOPLINE_ variable names a field of the service's settings, and the settings they
    make listen on all interfaces, export metrics and point at the compose Redis and MLflow."""
    for name, service in loopline_services(config).items():
        settings_cls = SETTINGS[str(kind(service))]
        known = {env_var_name(settings_cls, field) for field in settings_cls.model_fields}
        unknown = {v for v in environment(service) if v.startswith("LOOPLINE_")} - known
        assert not unknown, f"{name}: {settings_cls.__name__} reads no {sorted(unknown)}"
        settings = settings_of(service, settings_cls, clean_env)
        assert settings.host == "0.0.0.0", name
        assert settings.metrics_port > 0, name
        assert settings.redis_url.startswith("redis://redis:"), name
        assert settings.mlflow_uri == "http://mlflow:5000", name
        # Artifact downloads follow MLflow's process-wide URI, whatever the client was given.
        assert environment(service).get("MLFLOW_TRACKING_URI") == settings.mlflow_uri, name


def test_workers_advertise_their_own_address(config: Config, clean_env: pytest.MonkeyPatch) -> None:
    """A router in another container dials what a worker advertises: never 0.0.0.0 or 127.0.0.1."""
    workers = {n: s for n, s in loopline_services(config).items() if kind(s) == "inference"}
    for name, service in workers.items():
        settings = settings_of(service, InferenceSettings, clean_env)
        assert settings.advertise == f"{name}:{settings.port}"
        assert settings.models == ["models:/sentiment@champion"]
    router = settings_of(config["services"]["router"], RouterSettings, clean_env)
    assert router.discover_workers


def test_monitor_triggers_reach_the_trainer(config: Config, clean_env: pytest.MonkeyPatch) -> None:
    services = config["services"]
    monitor = settings_of(services["monitor"], MonitorSettings, clean_env)
    trainer = settings_of(services["trainer"], TrainerSettings, clean_env)
    assert monitor.trainer_address == f"trainer:{trainer.port}"


def test_service_state_lives_on_volumes(cpu: Config, clean_env: pytest.MonkeyPatch) -> None:
    volumes = cpu["volumes"]
    for name, service in loopline_services(cpu).items():
        settings = settings_of(service, SETTINGS[str(kind(service))], clean_env)
        for field in ("cache_dir", "spool_path", "home"):
            path = getattr(settings, field, None)
            if path is not None:
                assert under_volume(service, path, volumes), f"{name}: {field} {path}"
    volume_names = [source for s in cpu["services"].values() for source, _ in mounts(s)]
    shared = {v for v in volume_names if v in volumes and volume_names.count(v) > 1}
    assert not shared, f"volumes mounted by more than one service: {shared}"


def test_nothing_is_published_on_every_interface_by_default(config: Config) -> None:
    for name, service in config["services"].items():
        for host, port in published(service):
            assert host == "127.0.0.1", f"{name} publishes {port} on {host or 'every interface'}"
    router_ports = published(config["services"]["router"])
    assert ("127.0.0.1", environment(config["services"]["router"])["LOOPLINE_ROUTER_PORT"]) in (
        router_ports
    )


# --- images


def test_images_install_only_their_own_extra(config: Config) -> None:
    for name, service in loopline_services(config).items():
        service_kind = str(kind(service))
        assert service_kind in extras(service), name
        assert extras(service) <= {service_kind, "gpu"}, f"{name} installs {extras(service)}"


@pytest.mark.parametrize("name", ["router", "inference"])
def test_router_and_worker_images_have_no_torch(name: str) -> None:
    for instruction, args in instructions(ROOT / "docker" / f"Dockerfile.{name}"):
        assert "torch" not in args.lower(), f"{instruction} {args}"
        assert "transformers" not in args.lower(), f"{instruction} {args}"
        assert "trainer" not in args.lower(), f"{instruction} {args}"


@pytest.mark.parametrize("dockerfile", [*loopline_dockerfiles(), ROOT / "docker/Dockerfile.mlflow"])
def test_dockerfiles_run_unprivileged_with_a_healthcheck(dockerfile: Path) -> None:
    final = final_stage(dockerfile)
    assert final[0] == ("FROM", "python:3.11-slim")
    users = [args for instruction, args in final if instruction == "USER"]
    assert users, f"{dockerfile.name} runs as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    checks = [args for instruction, args in final if instruction == "HEALTHCHECK"]
    assert len(checks) == 1
    assert checks[0].split()[0] != "NONE"


@pytest.mark.parametrize("name", list(SETTINGS))
def test_dockerfiles_serve_on_all_interfaces(name: str) -> None:
    final = final_stage(ROOT / "docker" / f"Dockerfile.{name}")
    env = " ".join(args for instruction, args in final if instruction == "ENV")
    assert f"LOOPLINE_{name.upper()}_HOST=0.0.0.0" in env
    assert f"LOOPLINE_{name.upper()}_METRICS_PORT=" in env
    assert ("CMD", json.dumps(["loopline", "serve", name])) in final


# --- the health probes, run against a real gRPC health service


@pytest.fixture(scope="module")
def health_server() -> Iterator[tuple[int, health.HealthServicer]]:
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port, servicer
    server.stop(grace=None)


def probe(command: list[str], env: dict[str, str]) -> int:
    assert command[:2] in (["python", "-c"], ["CMD", "python"])
    args = command[2:] if command[0] == "python" else command[3:]
    done = subprocess.run(
        [sys.executable, "-c", *args], env={**os.environ, **env}, capture_output=True, check=False
    )
    return done.returncode


@pytest.mark.parametrize("name", list(SETTINGS))
def test_dockerfile_probe_follows_serving(
    name: str, health_server: tuple[int, health.HealthServicer]
) -> None:
    port, servicer = health_server
    checks = [
        args for i, args in final_stage(ROOT / f"docker/Dockerfile.{name}") if i == "HEALTHCHECK"
    ]
    command = json.loads(checks[0][checks[0].index("CMD") + 3 :])
    env = {f"LOOPLINE_{name.upper()}_PORT": str(port)}
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert probe(command, env) == 0
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert probe(command, env) == 1


def test_compose_probe_follows_serving(
    cpu: Config, health_server: tuple[int, health.HealthServicer]
) -> None:
    port, servicer = health_server
    command = [*cpu["services"]["router"]["healthcheck"]["test"][:-1], str(port)]
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert probe(command, {}) == 0
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert probe(command, {}) == 1


# --- the GPU override


def test_gpu_override_reserves_gpus_for_workers_and_trainer(cpu: Config, gpu: Config) -> None:
    with_gpus = {name for name, s in gpu["services"].items() if gpu_reservations(s)}
    assert with_gpus == {"inference-1", "inference-2", "trainer"}
    assert not any(gpu_reservations(s) for s in cpu["services"].values())
    for name, service in loopline_services(gpu).items():
        assert ("gpu" in extras(service)) == (name in with_gpus), name
    for service in loopline_services(cpu).values():
        assert "gpu" not in extras(service)


def test_gpu_images_are_tagged_apart(cpu: Config, gpu: Config) -> None:
    for name in ("inference-1", "inference-2", "trainer"):
        assert gpu["services"][name]["image"] != cpu["services"][name]["image"], name


def test_gpu_workers_use_cuda_and_trainer_gets_cuda_torch(
    cpu: Config, gpu: Config, clean_env: pytest.MonkeyPatch
) -> None:
    assert settings_of(cpu["services"]["inference-1"], InferenceSettings, clean_env).providers == [
        "cpu"
    ]
    for name in ("inference-1", "inference-2"):
        providers = settings_of(gpu["services"][name], InferenceSettings, clean_env).providers
        assert "cuda" in providers, name
        assert providers[-1] == "cpu", name
    cpu_index = cpu["services"]["trainer"]["build"]["args"]["TORCH_INDEX_URL"]
    gpu_index = gpu["services"]["trainer"]["build"]["args"]["TORCH_INDEX_URL"]
    assert cpu_index.endswith("/whl/cpu")
    assert re.search(r"/whl/cu\d+$", gpu_index)


# --- Prometheus and Grafana


def prometheus_targets() -> set[str]:
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    return {
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    }


def test_prometheus_scrapes_every_metrics_port(config: Config) -> None:
    expected = {
        f"{name}:{environment(s)[f'LOOPLINE_{str(kind(s)).upper()}_METRICS_PORT']}"
        for name, s in loopline_services(config).items()
    }
    targets = prometheus_targets()
    assert expected <= targets, f"not scraped: {sorted(expected - targets)}"
    hosts = {target.rsplit(":", 1)[0] for target in targets}
    assert hosts <= set(config["services"]) | {"localhost"}, f"unknown hosts: {hosts}"


def test_prometheus_reads_that_file(cpu: Config) -> None:
    prometheus = cpu["services"]["prometheus"]
    config_file = next(a.split("=", 1)[1] for a in prometheus["command"] if "config.file" in a)
    assert (str(ROOT / "deploy/prometheus/prometheus.yml"), config_file) in mounts(prometheus)


def test_grafana_provisions_the_dashboard(cpu: Config) -> None:
    grafana = cpu["services"]["grafana"]
    targets = dict(mounts(grafana))
    dashboard_target = Path(targets[str(DASHBOARD)])
    assert targets[str(ROOT / "deploy/grafana/provisioning")] == "/etc/grafana/provisioning"
    providers = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/dashboards/loopline.yml").read_text()
    )["providers"]
    paths = [Path(p["options"]["path"]) for p in providers if p.get("type", "file") == "file"]
    assert any(p in (dashboard_target.parent, dashboard_target) for p in paths), paths


def test_grafana_datasource_is_the_default_prometheus(cpu: Config) -> None:
    sources = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"]
    default = [s for s in sources if s.get("isDefault")]
    assert len(default) == 1
    assert default[0]["type"] == "prometheus"
    ports = [port for _, port in published(cpu["services"]["prometheus"])]
    assert default[0]["url"] in {f"http://prometheus:{port}" for port in ports}
    # The dashboard chooses among data sources of that type, starting on the default one.
    variables = json.loads(DASHBOARD.read_text())["templating"]["list"]
    variable = next(v for v in variables if v["name"] == "datasource")
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")


# --- the build context


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(re-include?, pattern) per line of .dockerignore, in Docker's matching rules: `*` stays
    within one path element, `**` spans any number, and a rule that matches a folder matches
    everything inside it; the last matching rule wins."""
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.removeprefix("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        regex = re.sub(r"\\\[(.*?)\\?\]", r"[\1]", regex)
        rules.append((negated, re.compile(regex)))
    return rules


def in_context(path: str) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for negated, rule in dockerignore_rules():
        if any(rule.fullmatch(prefix) for prefix in prefixes):
            included = negated
    return included


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "bench/results/inference.json",
        "tests/unit/test_compose.py",
        "loopline/__pycache__/settings.cpython-311.pyc",
        "services/router/__pycache__/main.cpython-311.pyc",
        ".mypy_cache/3.11/x.json",
        "mlruns/0/meta.yaml",
        "data/train.jsonl",
    ],
)
def test_build_context_leaves_out(path: str) -> None:
    assert not in_context(path)


def test_build_context_holds_what_the_dockerfiles_copy() -> None:
    for dockerfile in loopline_dockerfiles():
        for instruction, args in instructions(dockerfile):
            if instruction != "COPY" or args.startswith("--from"):
                continue
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), f"{dockerfile.name}: no {source}"
                inside = next((ROOT / source).rglob("*.py")) if source.endswith("/") else None
                path = str(inside.relative_to(ROOT)) if inside else source.rstrip("/")
                assert in_context(path), (
                    f"{dockerfile.name} copies {source}: .dockerignore hides it"
                )


# --- docker/install.sh, with a pip that only writes down what it was asked


def install_log(tmp_path: Path, extras: str, *requirements: str, **env: str) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(sys.executable)
    pip = bin_dir / "pip"
    pip.write_text(
        '#!/bin/sh\necho "$*" >> "$VIRTUAL_ENV/pip.log"\n'
        '[ "$1" = show ] && echo "Version: 1.23.0"\nexit 0\n'
    )
    pip.chmod(0o755)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    subprocess.run(
        ["sh", str(ROOT / "docker/install.sh"), extras, *requirements],
        cwd=tmp_path,
        env={"PATH": path, "VIRTUAL_ENV": str(tmp_path), **env},
        check=True,
    )
    assert (tmp_path / "ld.so.conf").exists()
    return (tmp_path / "pip.log").read_text().splitlines()


def torch_pin() -> str:
    import tomllib

    trainer = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["trainer"]
    return next(d for d in trainer if re.match(r"torch\b", d))


def test_install_router_and_worker_without_torch(tmp_path: Path) -> None:
    assert install_log(tmp_path / "r", "router") == ["install .[router]"]
    assert install_log(tmp_path / "i", "inference") == ["install .[inference]"]


def test_install_trainer_takes_cpu_torch_first(tmp_path: Path) -> None:
    assert install_log(tmp_path, "trainer") == [
        f"install --index-url https://download.pytorch.org/whl/cpu {torch_pin()}",
        "install .[trainer]",
    ]


def test_install_gpu_keeps_only_onnxruntime_gpu(tmp_path: Path) -> None:
    cuda = "https://download.pytorch.org/whl/cu130"
    assert install_log(tmp_path, "trainer,gpu", TORCH_INDEX_URL=cuda) == [
        f"install --index-url {cuda} {torch_pin()}",
        "install .[trainer,gpu]",
        "show onnxruntime-gpu",
        "uninstall --yes onnxruntime onnxruntime-gpu",
        "install onnxruntime-gpu[cuda,cudnn]==1.23.0",
    ]
