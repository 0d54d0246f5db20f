"""The model registry (MLflow): registered versions, aliases, promotion, rollback, downloads.

Shared by every part that reads or moves aliases: the trainer registers, workers resolve and
download, the router promotes an experiment's winner, the CLI lists and rolls back. Rollback needs
memory: every promotion records the version `champion` held before in a tag on
the registered model, so `rollback` can point the alias back without a person looking it up.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loopline.errors import FailedPrecondition, NotFound

log = logging.getLogger(__name__)

CHAMPION = "champion"
PREVIOUS_TAG = "loopline.previous_champion"
PACKAGE_ARTIFACT_PATH = "package"
CHECKPOINT_ARTIFACT_PATH = "checkpoint"  # the trained weights, to continue training from


@dataclass(frozen=True)
class VersionInfo:
    """One registered version as the CLI shows it."""

    name: str
    version: str
    aliases: tuple[str, ...]
    run_id: str | None
    created_ms: int
    tags: Mapping[str, str]
    source: str


def artifact_location(tracking_uri: str) -> str | None:
    """Where an embedded store keeps artifacts: beside its SQLite file, never in the CWD.

    MLflow's own default for a SQLite store is `./mlruns` relative to wherever the command ran;
    a tracking server (http) decides for itself, so we leave it alone.
    """
    if not tracking_uri.startswith("sqlite:///"):
        return None
    database = Path(tracking_uri.removeprefix("sqlite:///"))
    return (database.parent / "artifacts").resolve().as_uri()


class Registry:
    """A thin layer over MlflowClient that speaks in our terms."""

    def __init__(self, tracking_uri: str, registry_uri: str | None = None) -> None:
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(
            tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri
        )

    def ensure_experiment(self, name: str) -> str:
        """The id of the named MLflow experiment, created on first use."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        location = artifact_location(self.tracking_uri)
        return str(self.client.create_experiment(name, artifact_location=location))

    def register(
        self, name: str, run_id: str, artifact_uri: str, tags: Mapping[str, str], alias: str | None
    ) -> str:
        """Create a model version from a run's package artifacts; set the alias if given."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as err:
            if "already exists" not in str(err).lower() and "RESOURCE_ALREADY_EXISTS" not in str(
                getattr(err, "error_code", "")
            ):
                raise
        version = self.client.create_model_version(
            name, source=artifact_uri, run_id=run_id, tags=dict(tags)
        )
        number = str(version.version)
        if alias:
            self.set_alias(name, alias, number)
        return number

    def set_alias(self, name: str, alias: str, version: str) -> str | None:
        """Point an alias at a version; returns the version it held before (or None)."""
        self._require_version(name, version)
        before = self.alias_version(name, alias)
        self.client.set_registered_model_alias(name, alias, version)
        if alias == CHAMPION and before is not None and before != version:
            self.client.set_registered_model_tag(name, PREVIOUS_TAG, before)
        return before

    def promote(self, name: str, version: str) -> str | None:
        """Make a version the champion; remembers the previous champion for rollback."""
        return self.set_alias(name, CHAMPION, version)

    def rollback(self, name: str) -> tuple[str, str]:
        """Point champion back at the version it held before the last promotion.

        Returns (from_version, to_version). Rolling back twice returns to where it started,
        which is what an operator undoing a rollback expects.
        """
        current = self.alias_version(name, CHAMPION)
        model = self._registered(name)
        previous = model.tags.get(PREVIOUS_TAG)
        if current is None or previous is None:
            raise FailedPrecondition(
                f"model '{name}' has no earlier champion to roll back to; promote a version "
                "first with `loopline models promote NAME VERSION`",
                name=name,
            )
        self._require_version(name, previous)
        self.client.set_registered_model_alias(name, CHAMPION, previous)
        self.client.set_registered_model_tag(name, PREVIOUS_TAG, current)
        return current, previous

    def alias_version(self, name: str, alias: str) -> str | None:
        """The version an alias points at, or None when unset."""
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(name, alias).version)
        except MlflowException:
            return None

    def versions(self, name: str | None = None) -> list[VersionInfo]:
        """Every registered version (of one model, or of all), newest first."""
        query = f"name = '{name}'" if name else ""
        if name:
            self._registered(name)
        found = self.client.search_model_versions(query)
        # Search results leave `aliases` empty; the registered model holds them.
        aliases: dict[tuple[str, str], list[str]] = {}
        for model_name in {v.name for v in found}:
            for alias, number in (self._registered(model_name).aliases or {}).items():
                aliases.setdefault((model_name, str(number)), []).append(alias)
        infos = [
            VersionInfo(
                name=v.name,
                version=str(v.version),
                aliases=tuple(sorted(aliases.get((v.name, str(v.version)), []))),
                run_id=v.run_id,
                created_ms=int(v.creation_timestamp or 0),
                tags=dict(v.tags or {}),
                source=str(v.source),
            )
            for v in found
        ]
        return sorted(infos, key=lambda v: (v.name, -int(v.version)))

    def resolve(self, name: str, ref: str) -> str:
        """The concrete version a reference means (`ref`: a version number or an alias);
        NotFound, naming what to list, when the model, version or alias does not exist."""
        if ref.isdigit():
            self._require_version(name, ref)
            return ref
        self._registered(name)
        version = self.alias_version(name, ref)
        if version is None:
            raise NotFound(
                "model alias", f"{name}@{ref}", f"list aliases with `loopline models list {name}`"
            )
        return version

    def describe_version(self, name: str, version: str, key: str, value: str) -> None:
        """Tag a version (e.g. why an experiment promoted it)."""
        self.client.set_model_version_tag(name, version, key, value)

    def download(self, name: str, ref: str, destination: Path) -> Path:
        """Fetch a version's package (`ref` is a version number or an alias) into a folder."""
        from mlflow.artifacts import download_artifacts

        version = ref if ref.isdigit() else self.alias_version(name, ref)
        if version is None:
            raise NotFound(
                "model alias", f"{name}@{ref}", f"list aliases with `loopline models list {name}`"
            )
        self._require_version(name, version)
        # Resolve through our client: MLflow's `models:/` URIs follow the process-wide registry
        # URI, not the one this Registry was built with.
        uri = self.client.get_model_version_download_uri(name, version)
        destination.mkdir(parents=True, exist_ok=True)
        # The tracking URI too: an `mlflow-artifacts:/` URI (a server that serves artifacts) is
        # resolved against it, not against the process-wide default.
        return Path(
            download_artifacts(
                artifact_uri=uri, dst_path=str(destination), tracking_uri=self.tracking_uri
            )
        )

    def download_checkpoint(self, name: str, version: str, destination: Path) -> Path:
        """Fetch the training checkpoint (encoder, head, tokenizer) a version was exported from,
        which its training run keeps beside the package, to continue training from it."""
        from mlflow.artifacts import download_artifacts
        from mlflow.exceptions import MlflowException

        self._require_version(name, version)
        run_id = self.client.get_model_version(name, version).run_id
        if not run_id:
            raise FailedPrecondition(f"version {name}/{version} has no training run", name=name)
        destination.mkdir(parents=True, exist_ok=True)
        try:
            path = download_artifacts(
                run_id=run_id,
                artifact_path=CHECKPOINT_ARTIFACT_PATH,
                dst_path=str(destination),
                tracking_uri=self.tracking_uri,
            )
        except (MlflowException, OSError) as err:
            raise FailedPrecondition(
                f"version {name}/{version} kept no training checkpoint ({type(err).__name__}); "
                "continue from its base model instead",
                name=name,
                version=version,
            ) from None
        return Path(path)

    def _registered(self, name: str) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_registered_model(name)
        except MlflowException:
            raise NotFound(
                "registered model", name, "list models with `loopline models list`"
            ) from None

    def _require_version(self, name: str, version: str) -> None:
        from mlflow.exceptions import MlflowException

        self._registered(name)
        try:
            self.client.get_model_version(name, version)
        except MlflowException:
            raise NotFound(
                "model version",
                f"{name}/{version}",
                f"list versions with `loopline models list {name}`",
            ) from None
