"""The Kubernetes manifests in deploy/k8s, checked the way a cluster and the services would.

Each target (the base, the GPU overlay, the router-TLS overlay) is rendered with
`kubectl kustomize`, every document is validated against the Kubernetes JSON schema of its kind
(strict: an unknown field fails, as `kubectl apply` does), and then the manifests are held against
the code: the env names must be fields of the service's settings class, the settings must load
from the rendered values, the probes must hit the port the service binds, and so on.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shlex
import shutil
import subprocess
from base64 import b64decode
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml
from pydantic_settings import BaseSettings

from loopline.jobspec import parse_spec
from loopline.settings import ServiceSettings, env_var_name, load_settings
from services.inference.settings import InferenceSettings
from services.monitor.settings import MonitorSettings
from services.router.settings import RouterSettings
from services.trainer.settings import TrainerSettings

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"

# The oldest Kubernetes the manifests promise (the router's preStop `sleep` needs 1.30) and the
# version of the kubectl the project is tested with.
KUBERNETES_VERSIONS = ("1.30", "1.32")

SETTINGS: dict[str, type[ServiceSettings]] = {
    "router": RouterSettings,
    "inference": InferenceSettings,
    "trainer": TrainerSettings,
    "monitor": MonitorSettings,
}
GRPC_PORTS = {"router": 8000, "inference": 8001, "trainer": 8002, "monitor": 8003}
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")
# Settings that name a place a service writes (the root filesystem is read-only) or only reads.
WRITTEN_PATHS = ("home", "cache_dir", "spool_path", "trt_engine_cache")
READ_PATHS = ("retrain_spec", "tls_cert_file", "tls_key_file")
WRITTEN_ENV = ("HOME", "HF_HOME", "TMPDIR")  # caches and temporary files of the libraries
FAKE_POD_IP = "10.1.2.3"
GPU = "nvidia.com/gpu"


# ----- rendering -----


@dataclass(frozen=True)
class Container:
    """One container of a rendered workload, with the pod spec around it."""

    workload: dict[str, Any]
    pod: dict[str, Any]
    spec: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.workload['kind']}/{self.workload['metadata']['name']}:{self.spec['name']}"

    @property
    def argv(self) -> list[str]:
        return [*self.spec.get("command", []), *self.spec.get("args", [])]

    @property
    def serves(self) -> str | None:
        """The service this container runs with `loopline serve NAME`, if any."""
        argv = self.argv
        return argv[2] if argv[:2] == ["loopline", "serve"] and len(argv) > 2 else None

    def port(self, name: str) -> int | None:
        ports = {p.get("name"): p["containerPort"] for p in self.spec.get("ports", [])}
        return ports.get(name)

    def mounts(self) -> list[tuple[PurePosixPath, bool]]:
        return [
            (PurePosixPath(m["mountPath"]), bool(m.get("readOnly", False)))
            for m in self.spec.get("volumeMounts", [])
        ]

    def volume_of(self, path: str) -> dict[str, Any]:
        """The pod volume mounted closest above `path`."""
        mounts = sorted(
            self.spec.get("volumeMounts", []), key=lambda m: len(m["mountPath"]), reverse=True
        )
        for mount in mounts:
            if _under(PurePosixPath(path), PurePosixPath(mount["mountPath"])):
                return next(v for v in self.pod.get("volumes", []) if v["name"] == mount["name"])
        raise AssertionError(f"{self.name}: nothing is mounted at or above {path}")


@dataclass(frozen=True)
class Manifests:
    """The documents one kustomize target renders to."""

    target: str
    docs: tuple[dict[str, Any], ...]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        return next((d for d in self.of_kind(kind) if d["metadata"]["name"] == name), None)

    def containers(self) -> Iterator[Container]:
        for doc in self.docs:
            if doc["kind"] in WORKLOADS:
                pod = _pod_spec(doc)
                for spec in [*pod.get("initContainers", []), *pod["containers"]]:
                    yield Container(doc, pod, spec)

    def serving(self) -> dict[str, Container]:
        found: dict[str, Container] = {}
        for container in self.containers():
            if container.serves is not None:
                assert container.serves not in found, f"two workloads serve {container.serves}"
                found[container.serves] = container
        return found

    def data(self, kind: str, name: str) -> dict[str, str]:
        """The decoded data of a ConfigMap or Secret."""
        doc = self.get(kind, name)
        assert doc is not None, f"{self.target}: no {kind} named {name}"
        if kind == "Secret":
            return {k: b64decode(v).decode() for k, v in doc.get("data", {}).items()}
        return dict(doc.get("data", {}))


def _pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec = workload["spec"]
    if workload["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return dict(spec["template"]["spec"])


def _under(path: PurePosixPath, root: PurePosixPath) -> bool:
    return path == root or root in path.parents


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail(
            "kubectl is not installed, and the manifests in deploy/k8s are rendered with "
            "`kubectl kustomize` (built into kubectl since 1.14; install kubectl >= 1.27)",
            pytrace=False,
        )
    return kubectl


@functools.cache
def _render(directory: Path) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        [_kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory} failed:\n{result.stderr}", pytrace=False)
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


TARGETS = {
    "base": K8S / "base",
    "gpu": K8S / "overlays" / "gpu",
    "router-tls": K8S / "overlays" / "router-tls",
}


@pytest.fixture(scope="module", params=sorted(TARGETS))
def manifests(request: pytest.FixtureRequest) -> Manifests:
    target = str(request.param)
    return Manifests(target, _render(TARGETS[target]))


@pytest.fixture(scope="module")
def base() -> Manifests:
    return Manifests("base", _render(TARGETS["base"]))


@pytest.fixture(scope="module")
def gpu() -> Manifests:
    return Manifests("gpu", _render(TARGETS["gpu"]))


# ----- environment -----


def _env_names(manifests: Manifests, container: Container) -> list[str]:
    """Every variable the container gets: its env list and the keys of what it takes envFrom."""
    names = [e["name"] for e in container.spec.get("env", [])]
    for source in container.spec.get("envFrom", []):
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if key in source:
                prefix = source.get("prefix", "")
                names += [prefix + k for k in manifests.data(kind, source[key]["name"])]
    return names


def _settings_class(container: Container) -> type[BaseSettings] | None:
    return SETTINGS.get(container.serves or "")


def _allowed_env(container: Container) -> set[str]:
    """LOOPLINE_* names the container's program reads."""
    cls = _settings_class(container)
    if cls is None:
        # `loopline train --submit/--wait` and other CLI uses: only the stack-wide variables.
        cls = ServiceSettings
        return {
            env_var_name(cls, name)
            for name, info in cls.model_fields.items()
            if isinstance(info.validation_alias, str)
        }
    return {env_var_name(cls, name) for name in cls.model_fields}


def unknown_env(names: list[str], container: Container) -> list[str]:
    """The LOOPLINE_* names that no setting of the container's program reads."""
    allowed = _allowed_env(container)
    return sorted(n for n in names if n.startswith("LOOPLINE_") and n not in allowed)


_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _resolved_env(manifests: Manifests, container: Container) -> dict[str, str]:
    """The values the kubelet would give the container (downward API values faked)."""
    env: dict[str, str] = {}
    for source in container.spec.get("envFrom", []):
        if "configMapRef" in source:
            env.update(manifests.data("ConfigMap", source["configMapRef"]["name"]))
        if "secretRef" in source:
            env.update(manifests.data("Secret", source["secretRef"]["name"]))
    for item in container.spec.get("env", []):
        env[item["name"]] = _env_value(manifests, container, item, env)
    return env


def _env_value(
    manifests: Manifests, container: Container, item: dict[str, Any], earlier: dict[str, str]
) -> str:
    if "value" in item:
        value = str(item["value"])
        for ref in _REFERENCE.findall(value):
            # The kubelet expands only variables defined before this one; others stay literal.
            assert ref in earlier, (
                f"{container.name}: {item['name']} uses $({ref}) before it is set"
            )
        return _REFERENCE.sub(lambda m: earlier[m.group(1)], value)
    source = item["valueFrom"]
    if "secretKeyRef" in source:
        ref = source["secretKeyRef"]
        return manifests.data("Secret", ref["name"])[ref["key"]]
    if "configMapKeyRef" in source:
        ref = source["configMapKeyRef"]
        return manifests.data("ConfigMap", ref["name"])[ref["key"]]
    field = source["fieldRef"]["fieldPath"]
    return FAKE_POD_IP if field == "status.podIP" else f"<{field}>"


def _load(
    manifests: Manifests, container: Container, monkeypatch: pytest.MonkeyPatch, tmp: Path
) -> ServiceSettings:
    """Build the container's settings class from the rendered environment, as it would start."""
    cls = SETTINGS[container.serves or ""]
    env = _resolved_env(manifests, container)
    for name in list(os.environ):
        if name.startswith("LOOPLINE_"):
            monkeypatch.delenv(name)
    tls_files = {env_var_name(cls, f) for f in ("tls_cert_file", "tls_key_file")}
    for name, value in env.items():
        if name in tls_files:
            # The files come from a Secret at run time; here any readable file stands in.
            stand_in = tmp / PurePosixPath(value).name
            stand_in.write_text("placeholder", encoding="utf-8")
            monkeypatch.setenv(name, str(stand_in))
        elif name.startswith("LOOPLINE_"):
            monkeypatch.setenv(name, value)
    return load_settings(cls)


# ----- schema -----


def _schema_errors(doc: dict[str, Any], version: str) -> list[str]:
    where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as err:
        path = ".".join(str(p) for p in err.path)
        return [f"{where}: {path}: {err.message}"]
    except kubernetes_validate.SchemaNotFoundError as err:
        return [f"{where}: {err.message}"]
    return []


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_document_matches_the_schema_of_its_kind(manifests: Manifests, version: str) -> None:
    assert manifests.docs, f"{manifests.target} renders to nothing"
    errors = [error for doc in manifests.docs for error in _schema_errors(doc, version)]
    assert not errors, f"{manifests.target} against Kubernetes {version}:\n" + "\n".join(errors)


def test_schema_validation_rejects_what_an_api_server_would(base: Manifests) -> None:
    router = base.get("Deployment", "loopline-router")
    assert router is not None
    misspelt = copy.deepcopy(router)
    container = misspelt["spec"]["template"]["spec"]["containers"][0]
    container["readinessprobe"] = container.pop("readinessProbe")
    assert _schema_errors(misspelt, "1.32")
    # TLS gRPC probes are alpha in 1.37: the schemas we promise do not have them.
    tls_probe = copy.deepcopy(router)
    tls_probe["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["mode"] = "TLS"
    assert _schema_errors(tls_probe, "1.32")
    assert not _schema_errors(router, "1.32")


# ----- workloads -----


def test_the_four_services_run_from_deployments(manifests: Manifests) -> None:
    serving = manifests.serving()
    assert sorted(serving) == sorted(SETTINGS)
    for container in serving.values():
        assert container.workload["kind"] == "Deployment", container.name


def test_probes_use_grpc_health_on_the_grpc_port(manifests: Manifests) -> None:
    for service, container in manifests.serving().items():
        port = container.port("grpc")
        assert port == GRPC_PORTS[service], f"{container.name}: gRPC port {port}"
        env = [e["name"] for e in container.spec.get("env", [])]
        tls = env_var_name(SETTINGS[service], "tls_cert_file") in env
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.spec.get(kind)
            assert probe is not None, f"{container.name} has no {kind}"
            if tls:
                # The kubelet's gRPC probe speaks plaintext only: a TLS port gets a TCP check.
                assert probe.get("tcpSocket", {}).get("port") == port, f"{container.name} {kind}"
            else:
                assert probe.get("grpc", {}).get("port") == port, f"{container.name} {kind}"


def test_containers_run_as_non_root_with_resources(manifests: Manifests) -> None:
    for container in manifests.containers():
        pod_context = container.pod.get("securityContext", {})
        context = {**pod_context, **container.spec.get("securityContext", {})}
        assert context.get("runAsNonRoot") is True, f"{container.name} may run as root"
        assert context.get("runAsUser", 1) != 0, container.name
        assert context.get("allowPrivilegeEscalation") is False, container.name
        assert context.get("readOnlyRootFilesystem") is True, container.name
        assert "ALL" in context.get("capabilities", {}).get("drop", []), container.name
        resources = container.spec.get("resources", {})
        for resource in ("cpu", "memory"):
            request = resources.get("requests", {}).get(resource)
            limit = resources.get("limits", {}).get(resource)
            assert request is not None, f"{container.name}: no {resource} request"
            assert limit is not None, f"{container.name}: no {resource} limit"
            assert _quantity(request) <= _quantity(limit), f"{container.name}: {resource}"


_UNITS = {"m": 1e-3, "": 1.0, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_UNITS |= {"k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def _quantity(text: str | int | float) -> float:
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    assert match is not None, f"not a quantity: {text!r}"
    assert match.group(2) in _UNITS, f"unknown unit in {text!r}"
    return float(match.group(1)) * _UNITS[match.group(2)]


def test_references_name_rendered_objects(manifests: Manifests) -> None:
    """Generated ConfigMaps and Secrets get a hash suffix: every reference must carry it."""
    for container in manifests.containers():
        for source in container.spec.get("envFrom", []):
            for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                if key in source:
                    assert manifests.get(kind, source[key]["name"]), f"{container.name}: {source}"
        for item in container.spec.get("env", []):
            for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                ref = item.get("valueFrom", {}).get(key)
                if ref is not None:
                    assert ref["key"] in manifests.data(kind, ref["name"]), f"{container.name}"
        for volume in container.pod.get("volumes", []):
            for kind, key, field in (
                ("ConfigMap", "configMap", "name"),
                ("Secret", "secret", "secretName"),
                ("PersistentVolumeClaim", "persistentVolumeClaim", "claimName"),
            ):
                if key in volume:
                    name = volume[key][field]
                    assert manifests.get(kind, name), f"{container.name}: no {kind} {name}"


def test_services_select_pods_and_their_ports(manifests: Manifests) -> None:
    for service in manifests.of_kind("Service"):
        selector = service["spec"]["selector"]
        pods = [
            c
            for c in manifests.containers()
            if c.workload["kind"] == "Deployment"
            and selector.items() <= c.workload["spec"]["template"]["metadata"]["labels"].items()
        ]
        name = service["metadata"]["name"]
        assert pods, f"Service {name} selects no pods"
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            found = [c.port(target) if isinstance(target, str) else target for c in pods]
            assert any(found), f"Service {name}: no container port {target}"


# ----- settings -----


def test_env_names_are_settings_of_the_program(manifests: Manifests) -> None:
    problems = []
    for container in manifests.containers():
        unknown = unknown_env(_env_names(manifests, container), container)
        if unknown:
            problems.append(f"{container.name}: {', '.join(unknown)}")
    assert not problems, "env names no setting reads:\n" + "\n".join(problems)


def test_the_env_check_catches_a_misspelt_name(base: Manifests) -> None:
    router = base.serving()["router"]
    names = _env_names(base, router)
    assert unknown_env(names, router) == []
    assert unknown_env([*names, "LOOPLINE_ROUTER_PROT"], router) == ["LOOPLINE_ROUTER_PROT"]
    # A worker's setting is no router setting.
    assert unknown_env(["LOOPLINE_INFERENCE_MODELS"], router) == ["LOOPLINE_INFERENCE_MODELS"]


def test_settings_load_from_the_rendered_environment(
    manifests: Manifests, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for container in manifests.serving().values():
        settings = _load(manifests, container, monkeypatch, tmp_path)
        assert settings.host == "0.0.0.0", f"{container.name} binds {settings.host}"
        assert settings.port == container.port("grpc")
        annotations = container.workload["spec"]["template"]["metadata"].get("annotations", {})
        assert settings.metrics_port == container.port("metrics") > 0, container.name
        assert annotations.get("prometheus.io/scrape") == "true", container.name
        assert annotations.get("prometheus.io/port") == str(settings.metrics_port)
        if isinstance(settings, InferenceSettings):
            # Routers dial what the worker advertises: the pod's own IP, never 0.0.0.0.
            assert settings.advertise == f"{FAKE_POD_IP}:{settings.port}"


def test_settings_paths_lie_on_volumes(
    manifests: Manifests, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The root filesystem is read-only: what a service writes must be on a writable volume."""
    for container in manifests.serving().values():
        settings = _load(manifests, container, monkeypatch, tmp_path)
        env = _resolved_env(manifests, container)
        written = [getattr(settings, f, None) for f in WRITTEN_PATHS]
        written += [env.get(name) for name in WRITTEN_ENV]
        for value in filter(None, written):
            mount = _mount_for(container, PurePosixPath(str(value)))
            assert mount is not None, f"{container.name}: nothing is mounted at {value}"
            assert not mount[1], f"{container.name}: {value} is on a read-only mount"
        for field in READ_PATHS:
            value = env.get(env_var_name(type(settings), field))
            if value:
                assert _mount_for(container, PurePosixPath(value)), f"{container.name}: {value}"


def _mount_for(container: Container, path: PurePosixPath) -> tuple[PurePosixPath, bool] | None:
    mounts = [m for m in container.mounts() if _under(path, m[0])]
    return max(mounts, key=lambda m: len(str(m[0])), default=None)


# ----- scaling -----


def test_autoscalers_scale_router_and_workers_only(manifests: Manifests) -> None:
    deployments = {d["metadata"]["name"]: d for d in manifests.of_kind("Deployment")}
    by_name = {c.workload["metadata"]["name"]: s for s, c in manifests.serving().items()}
    scaled = set()
    for hpa in manifests.of_kind("HorizontalPodAutoscaler"):
        assert hpa["apiVersion"] == "autoscaling/v2"
        target = hpa["spec"]["scaleTargetRef"]
        assert target["kind"] == "Deployment", target
        assert target["name"] in deployments, target
        assert 1 <= hpa["spec"].get("minReplicas", 1) <= hpa["spec"]["maxReplicas"]
        scaled.add(by_name[target["name"]])
        pod = _pod_spec(deployments[target["name"]])
        for metric in hpa["spec"]["metrics"]:
            if metric["type"] == "Resource":
                # Utilization is measured against the request: without one the HPA never acts.
                resource = metric["resource"]["name"]
                for spec in pod["containers"]:
                    assert resource in spec["resources"].get("requests", {}), target["name"]
    assert scaled == {"router", "inference"}


def test_trainer_is_one_replica_with_a_persistent_home(
    manifests: Manifests, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    trainer = manifests.serving()["trainer"]
    assert trainer.workload["spec"]["replicas"] == 1
    # Two pods on one job database (a SQLite file) must never overlap, not even in a rollout.
    assert trainer.workload["spec"]["strategy"]["type"] == "Recreate"
    settings = _load(manifests, trainer, monkeypatch, tmp_path)
    assert isinstance(settings, TrainerSettings)
    assert "persistentVolumeClaim" in trainer.volume_of(str(settings.home))


def _trainer_address(manifests: Manifests) -> str:
    trainer = manifests.serving()["trainer"]
    labels = trainer.workload["spec"]["template"]["metadata"]["labels"]
    for service in manifests.of_kind("Service"):
        if service["spec"]["selector"].items() <= labels.items():
            port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
            return f"{service['metadata']['name']}:{port}"
    raise AssertionError("no Service in front of the trainer")


def _option(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def _mounted_file(manifests: Manifests, container: Container, path: str) -> str:
    """The text a ConfigMap volume puts at `path` in the container."""
    volume = container.volume_of(path)
    assert "configMap" in volume, f"{container.name}: {path} is not from a ConfigMap"
    mount = next(m for m in container.spec["volumeMounts"] if m["name"] == volume["name"])
    relative = str(PurePosixPath(path).relative_to(mount["mountPath"]))
    items = {i["path"]: i["key"] for i in volume["configMap"].get("items", [])}
    key = items.get(relative, relative)
    data = manifests.data("ConfigMap", volume["configMap"]["name"])
    assert key in data, f"{container.name}: ConfigMap has no {key}"
    return data[key]


def test_cronjob_submits_a_mounted_spec_to_the_trainer(
    manifests: Manifests, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (cronjob,) = manifests.of_kind("CronJob")
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    (container,) = [c for c in manifests.containers() if c.workload is cronjob]
    argv = container.argv
    assert argv[:2] == ["loopline", "train"], shlex.join(argv)
    assert "--submit" in argv or "--wait" in argv, shlex.join(argv)
    assert _option(argv, "--trainer") == _trainer_address(manifests)
    spec_path = _option(argv, "--spec")
    assert spec_path is not None, shlex.join(argv)
    spec = parse_spec(yaml.safe_load(_mounted_file(manifests, container, spec_path)))
    # The trainer reads the data files, so they must be absolute paths on its own volume.
    trainer = manifests.serving()["trainer"]
    settings = _load(manifests, trainer, monkeypatch, tmp_path)
    assert isinstance(settings, TrainerSettings)
    home = PurePosixPath(settings.home)
    sources = [*spec.data, *([spec.validation] if spec.validation else [])]
    for source in (s.file for s in sources if s.file is not None):
        assert source.path.is_absolute(), source
        assert _under(PurePosixPath(source.path), home), f"{source.path} is not under {home}"
    # A retried pod resubmits with the same key and follows the job it already queued.
    key = _option(argv, "--idempotency-key")
    env = {e["name"]: e for e in container.spec["env"]}
    assert key is not None, shlex.join(argv)
    match = _REFERENCE.fullmatch(key)
    assert match is not None, f"--idempotency-key {key} is no $(VARIABLE)"
    job_name = env[match.group(1)]["valueFrom"]["fieldRef"]["fieldPath"]
    assert job_name == "metadata.labels['batch.kubernetes.io/job-name']"


def test_monitor_triggers_retraining_with_the_same_spec(
    manifests: Manifests, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monitor = manifests.serving()["monitor"]
    settings = _load(manifests, monitor, monkeypatch, tmp_path)
    assert isinstance(settings, MonitorSettings)
    assert settings.trainer_address == _trainer_address(manifests)
    assert settings.retrain_spec is not None
    spec_path = str(settings.retrain_spec)
    parse_spec(yaml.safe_load(_mounted_file(manifests, monitor, spec_path)))


# ----- GPU overlay -----


def _gpu_containers(manifests: Manifests) -> dict[str, Container]:
    return {
        c.serves or c.name: c
        for c in manifests.containers()
        if GPU in c.spec.get("resources", {}).get("limits", {})
    }


def test_gpu_overlay_gives_gpus_to_workers_and_trainer_only(
    base: Manifests, gpu: Manifests
) -> None:
    assert _gpu_containers(base) == {}
    assigned = _gpu_containers(gpu)
    assert sorted(assigned) == ["inference", "trainer"]
    for container in assigned.values():
        assert int(container.spec["resources"]["limits"][GPU]) >= 1
        tolerated = {t.get("key") for t in container.pod.get("tolerations", [])}
        assert GPU in tolerated, f"{container.name} does not tolerate GPU nodes"
        assert container.pod.get("nodeSelector"), f"{container.name} is not steered to GPU nodes"
        image = container.spec["image"]
        assert image != base.serving()[container.serves or ""].spec["image"], image
    for service in ("router", "monitor"):
        assert gpu.serving()[service].spec["image"] == base.serving()[service].spec["image"]


def test_gpu_workers_prefer_gpu_providers(
    gpu: Manifests, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = _load(gpu, gpu.serving()["inference"], monkeypatch, tmp_path)
    assert isinstance(settings, InferenceSettings)
    providers = list(settings.providers)
    assert providers[0] in ("tensorrt", "cuda"), providers
    assert providers[-1] == "cpu", providers
