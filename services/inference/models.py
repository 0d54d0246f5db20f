"""Model sources, the local package cache, and the repository of served versions.

A worker serves several names and versions at once. Versions arrive three ways: a package folder,
a pinned registry version (`models:/NAME/3`), or an alias (`models:/NAME@champion`) that the
worker keeps following: when the alias moves, the new version is downloaded, loaded and warmed on
every batch-size bucket in the background, the alias switches atomically, and the old version
drains (finishes everything it accepted) before its session is closed.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from loopline.errors import InvalidInput, NotFound, NotReady
from loopline.package import Manifest, read_manifest
from loopline.runtime import PackageTokenizer

if TYPE_CHECKING:
    from loopline.registry import Registry
    from services.inference.batching import Batcher
    from services.inference.engines.base import Engine

log = logging.getLogger(__name__)

CHAMPION = "champion"  # the alias a router sends a model's plain traffic to

_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class ModelSource:
    """Where a served model comes from: a registry alias, a pinned version, or a folder."""

    text: str
    name: str | None = None
    alias: str | None = None
    version: str | None = None
    path: Path | None = None

    @classmethod
    def parse(cls, text: str) -> ModelSource:
        """`models:/NAME@ALIAS`, `models:/NAME/VERSION`, or a package folder."""
        match = _REGISTRY_URI.match(text.strip())
        if match and match["name"] not in (".", ".."):  # the name is a folder in the cache
            return cls(text, match["name"], match["alias"], match["version"])
        if text.startswith("models:/"):
            raise InvalidInput(
                f"model source '{text}' is not models:/NAME@ALIAS or models:/NAME/VERSION",
                source=text,
            )
        try:
            path = Path(text).expanduser()
            folder = path.is_dir()
        except (OSError, RuntimeError):  # a name too long for the file system, ~unknown-user
            folder = False
        if not folder:
            raise InvalidInput(
                f"model source '{text}' is neither a registry URI nor a package folder", source=text
            )
        return cls(text, path=path.resolve())


class PackageStore:
    """Local package folders: registry versions are downloaded once into `cache/NAME/VERSION`."""

    def __init__(self, cache_dir: Path, mlflow_uri: str) -> None:
        self.cache_dir = cache_dir
        self.mlflow_uri = mlflow_uri
        self._registry: Registry | None = None

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            from loopline.registry import Registry

            self._registry = Registry(self.mlflow_uri)
        return self._registry

    def alias_version(self, name: str, alias: str) -> str:
        version = self.registry.alias_version(name, alias)
        if version is None:
            raise NotFound(
                "model alias",
                f"{name}@{alias}",
                "set it with `loopline models promote` or `loopline train --alias`",
            )
        return version

    def fetch(self, name: str, version: str) -> Path:
        """The cached folder of a version, downloading it (atomically) on first use."""
        target = self.cache_dir / name / version
        if (target / "loopline.json").is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=target.parent))
        try:
            local = self.registry.download(name, version, staging)
            read_manifest(local)
            # A rename is atomic: a crash mid-download never leaves a half package in the cache.
            try:
                local.rename(target)
            except OSError:
                if not (target / "loopline.json").is_file():
                    raise  # not a concurrent download of the same version that won the race
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target


class ModelState(StrEnum):
    """Lifecycle of one served version."""

    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"


@dataclass(eq=False)
class ServedModel:
    """One loaded version: its package, engine, tokenizer and batch queue."""

    name: str
    version: str
    directory: Path
    manifest: Manifest
    engine: Engine
    tokenizer: PackageTokenizer
    batcher: Batcher
    state: ModelState = ModelState.READY
    aliases: set[str] = field(default_factory=set)
    load_seconds: float = 0.0
    sketch: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # The package's fixed projection of the pooled embedding (16 numbers per record).
        self.sketch = self.manifest.sketch.matrix(self.manifest.embedding_dim)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "aliases": sorted(self.aliases),
            "ready": self.state is ModelState.READY,
            "variant": self.engine.variant,
            "providers": self.engine.providers,
        }


# (directory, manifest) -> (engine, batcher): how a repository turns a package into a server.
Builder = Callable[[Path, Manifest], tuple["Engine", "Batcher"]]


def batch_buckets(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... up to and including max_batch_size: the sizes warm-up runs once each."""
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return [*sizes, max_batch_size]


def warm_up(engine: Engine, manifest: Manifest, max_batch_size: int, length: int = 16) -> None:
    """Run every batch-size bucket once so the first real requests do not pay for allocation."""
    width = min(length, manifest.max_length)
    for size in batch_buckets(max_batch_size):
        ids = np.full((size, width), manifest.pad_token_id, dtype=np.int64)
        ids[:, 0] = 1
        engine.run(ids, np.ones((size, width), dtype=np.int64))


class ModelRepository:
    """Every served version by name, the aliases they answer to, and the loading in progress."""

    def __init__(
        self,
        store: PackageStore,
        build: Builder,
        max_batch_size: int,
        on_ready: Callable[[ServedModel], None] | None = None,
    ) -> None:
        self.store = store
        self.on_ready = on_ready
        self.build = build
        self.max_batch_size = max_batch_size
        self._versions: dict[str, dict[str, ServedModel]] = {}
        self._aliases: dict[tuple[str, str], str] = {}
        self._pinned: set[tuple[str, str]] = set()
        self._default: dict[str, str] = {}
        self._loading: set[tuple[str, str]] = set()
        self._tracked: set[tuple[str, str]] = set()
        self._lock = asyncio.Lock()

    # ----- lookups (hot path: dictionary reads only) -----

    def resolve(self, name: str, ref: str = "") -> ServedModel:
        """The version a request means: "" = the default, digits = a version, else an alias."""
        versions = self._versions.get(name)
        if not versions:
            if any(n == name for n, _ in self._loading):
                raise NotReady(f"model '{name}' is still loading; retry shortly", model=name)
            raise NotFound("model", name, "list served models with RepositoryIndex")
        if not ref:
            version = self._default.get(name, "")
        elif ref in versions or ref.isdigit():
            version = ref  # a folder package's version need not be a number
        else:
            version = self._aliases.get((name, ref), "")
        model = versions.get(version)
        if model is not None:
            return model
        if (name, version) in self._loading:
            raise NotReady(f"model '{name}' version {version} is still loading", model=name)
        raise NotFound(
            "model version",
            f"{name}/{ref or version}",
            f"served versions: {', '.join(sorted(versions))}",
        )

    def served(self) -> list[ServedModel]:
        return [m for versions in self._versions.values() for m in versions.values()]

    def loading(self) -> list[tuple[str, str]]:
        return sorted(self._loading)

    def queue_depth(self) -> int:
        return sum(m.batcher.queue_depth for m in self.served())

    # ----- loading and unloading -----

    async def add(self, source: ModelSource) -> ServedModel:
        """Load a source; an alias source is then followed by `check_aliases`."""
        if source.path is not None:
            manifest = read_manifest(source.path)
            return await self._install(manifest.name, manifest.version, source.path, pin=True)
        assert source.name is not None
        if source.alias is not None:
            self._tracked.add((source.name, source.alias))
            version = await asyncio.to_thread(self.store.alias_version, source.name, source.alias)
            model = await self._install_version(source.name, version, pin=False)
            self._point_alias(source.name, source.alias, version)
            return model
        assert source.version is not None
        return await self._install_version(source.name, source.version, pin=True)

    async def _install_version(self, name: str, version: str, pin: bool) -> ServedModel:
        existing = self._versions.get(name, {}).get(version)
        if existing is not None:
            if pin:
                self._pinned.add((name, version))
            return existing
        self._loading.add((name, version))
        try:
            directory = await asyncio.to_thread(self.store.fetch, name, version)
        except BaseException:
            self._loading.discard((name, version))
            raise
        return await self._install(name, version, directory, pin)

    async def _install(self, name: str, version: str, directory: Path, pin: bool) -> ServedModel:
        self._loading.add((name, version))
        started = time.perf_counter()
        built: tuple[Engine, Batcher] | None = None
        try:
            manifest = read_manifest(directory)
            built = await asyncio.to_thread(self.build, directory, manifest)
            await asyncio.to_thread(warm_up, built[0], manifest, self.max_batch_size)
            tokenizer = PackageTokenizer(directory, manifest)
        except BaseException:
            if built is not None:  # a session that failed warm-up must not keep its memory
                await asyncio.to_thread(built[0].close)
            raise
        finally:
            self._loading.discard((name, version))
        engine, batcher = built
        batcher.start()
        model = ServedModel(
            name,
            version,
            directory,
            manifest,
            engine,
            tokenizer,
            batcher,
            load_seconds=time.perf_counter() - started,
        )
        self._versions.setdefault(name, {})[version] = model
        if pin:
            self._pinned.add((name, version))
            self._stand_in_champion(name, version)
        self._default.setdefault(name, version)
        if self.on_ready is not None:
            self.on_ready(model)
        log.info(
            "model ready",
            extra={
                "model": name,
                "version": version,
                "variant": engine.variant,
                "providers": engine.providers,
                "load_seconds": round(model.load_seconds, 3),
            },
        )
        return model

    def _stand_in_champion(self, name: str, version: str) -> None:
        """A pinned version (a folder, `models:/NAME/3`) answers to `champion` while nothing on
        this worker follows the real alias: a router sends a model's plain traffic to its
        champion, and a worker serving one fixed version of a model is what that traffic means.
        Following `models:/NAME@champion` takes the alias over at its first check."""
        if (name, CHAMPION) in self._aliases or (name, CHAMPION) in self._tracked:
            return
        self._aliases[(name, CHAMPION)] = version
        self._versions[name][version].aliases.add(CHAMPION)

    def _point_alias(self, name: str, alias: str, version: str) -> str | None:
        """Switch an alias (and the name's default, when the alias is the default's source)."""
        before = self._aliases.get((name, alias))
        self._aliases[(name, alias)] = version
        for model in self._versions.get(name, {}).values():
            model.aliases.discard(alias)
        self._versions[name][version].aliases.add(alias)
        if before is None or self._default.get(name) == before or alias == "champion":
            self._default[name] = version
        return before

    async def check_aliases(self) -> list[tuple[str, str, str, str]]:
        """One pass over followed aliases; returns (name, alias, from, to) for each move."""
        moves = []
        async with self._lock:
            for name, alias in sorted(self._tracked):
                try:
                    target = await asyncio.to_thread(self.store.alias_version, name, alias)
                except Exception:  # the registry being away must not stop serving
                    log.warning(
                        "alias check failed", exc_info=True, extra={"model": name, "alias": alias}
                    )
                    continue
                current = self._aliases.get((name, alias))
                if target == current:
                    continue
                try:
                    await self._install_version(name, target, pin=False)
                except Exception:
                    # A version that cannot load (a broken package, a failed download) leaves the
                    # alias where it was: the old version keeps serving, the next pass retries.
                    log.warning(
                        "alias target failed to load; still serving the old version",
                        exc_info=True,
                        extra={"model": name, "alias": alias, "from": current, "to": target},
                    )
                    continue
                self._point_alias(name, alias, target)
                moves.append((name, alias, current or "", target))
                log.info(
                    "alias moved",
                    extra={"model": name, "alias": alias, "from": current, "to": target},
                )
                if current is not None:
                    await self._retire_if_unused(name, current)
        return moves

    async def watch(self, interval: float) -> None:
        """Follow aliases until cancelled."""
        while True:
            await asyncio.sleep(interval)
            await self.check_aliases()

    async def _retire_if_unused(self, name: str, version: str) -> None:
        in_use = (name, version) in self._pinned or version in {
            v for (n, _), v in self._aliases.items() if n == name
        }
        if not in_use:
            await self.unload(name, version)

    async def unload(self, name: str, version: str | None = None) -> list[str]:
        """Stop serving versions: new requests stop at once, accepted ones finish first."""
        versions = self._versions.get(name)
        if not versions:
            raise NotFound("model", name, "list served models with RepositoryIndex")
        chosen = [version] if version else list(versions)
        for number in chosen:
            if number not in versions:
                raise NotFound("model version", f"{name}/{number}")
        for number in chosen:
            model = versions.pop(number)
            model.state = ModelState.DRAINING
            self._pinned.discard((name, number))
            # An alias left pointing at an unloaded version would resolve to nothing; a followed
            # alias is reinstalled by its next check.
            self._aliases = {k: v for k, v in self._aliases.items() if (k[0], v) != (name, number)}
            if self._default.get(name) == number:
                self._default.pop(name)
                if versions:
                    self._default[name] = (
                        max(versions, key=int)
                        if all(v.isdigit() for v in versions)
                        else next(iter(versions))
                    )
            await model.batcher.drain_and_stop()
            await asyncio.to_thread(model.engine.close)
            log.info("model unloaded", extra={"model": name, "version": number})
        if not versions:
            self._versions.pop(name, None)
            self._tracked = {t for t in self._tracked if t[0] != name}
            self._aliases = {k: v for k, v in self._aliases.items() if k[0] != name}
        return chosen

    async def close(self) -> None:
        """Drain and close everything (SIGTERM)."""
        for name in list(self._versions):
            await self.unload(name)
