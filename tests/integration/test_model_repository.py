"""The repository's alias following, with a scripted registry and a counting fake engine.

The package on disk is real (the tiny one the trainer exports); the registry and the engine are
stand-ins so a failure can be injected exactly where it matters.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from loopline.package import Manifest
from services.inference.batching import Batcher, BatchSettings
from services.inference.engines.base import EngineKind, EngineOutput
from services.inference.models import ModelRepository, ModelSource


class FakeEngine:
    kind = EngineKind.ONNX
    variant = "fp32"

    def __init__(self, fail_warm_up: bool = False) -> None:
        self.providers = ["FakeProvider"]
        self.fail_warm_up = fail_warm_up
        self.closed = False

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> EngineOutput:
        if self.fail_warm_up:
            raise RuntimeError("broken graph")
        rows = input_ids.shape[0]
        return EngineOutput(np.zeros((rows, 2), np.float32), np.zeros((rows, 4), np.float32))

    def close(self) -> None:
        self.closed = True


class ScriptedStore:
    """Aliases from a dict; versions in `broken` fail to download."""

    def __init__(self, package: Path) -> None:
        self.package = package
        self.aliases = {("tiny", "champion"): "1"}
        self.broken: set[str] = set()

    def alias_version(self, name: str, alias: str) -> str:
        return self.aliases[(name, alias)]

    def fetch(self, name: str, version: str) -> Path:
        if version in self.broken:
            raise OSError(f"download of {name}/{version} failed")
        return self.package


def _repository(
    store: ScriptedStore, engines: list[FakeEngine], fail_versions: set[str] | None = None
) -> ModelRepository:
    def build(directory: Path, manifest: Manifest) -> tuple[FakeEngine, Batcher]:
        engine = FakeEngine(fail_warm_up=len(engines) in (fail_versions or set()))
        engines.append(engine)
        return engine, Batcher(engine.run, manifest.pad_token_id, BatchSettings())

    return ModelRepository(store, build, max_batch_size=4)  # type: ignore[arg-type]


def test_a_target_that_fails_to_load_keeps_the_old_version_serving(tiny_package: Path) -> None:
    async def scenario() -> None:
        store = ScriptedStore(tiny_package)
        repository = _repository(store, [])
        await repository.add(ModelSource("models:/tiny@champion", "tiny", alias="champion"))
        store.aliases[("tiny", "champion")] = "2"
        store.broken.add("2")
        assert await repository.check_aliases() == []  # no exception escapes the watcher
        assert repository.resolve("tiny", "champion").version == "1"
        store.broken.clear()  # the next pass succeeds
        assert await repository.check_aliases() == [("tiny", "champion", "1", "2")]
        assert [m.version for m in repository.served()] == ["2"]
        await repository.close()

    asyncio.run(scenario())


def test_an_engine_that_fails_warm_up_is_closed(tiny_package: Path) -> None:
    async def scenario() -> None:
        store = ScriptedStore(tiny_package)
        engines: list[FakeEngine] = []
        repository = _repository(store, engines, fail_versions={1})
        await repository.add(ModelSource("models:/tiny@champion", "tiny", alias="champion"))
        store.aliases[("tiny", "champion")] = "2"
        assert await repository.check_aliases() == []
        assert engines[1].closed
        assert not engines[0].closed
        assert repository.loading() == []
        await repository.close()

    asyncio.run(scenario())


def test_a_pinned_folder_stands_in_for_champion_until_the_real_alias_is_followed(
    tiny_package: Path,
) -> None:
    async def scenario() -> None:
        store = ScriptedStore(tiny_package)
        repository = _repository(store, [])
        folder = await repository.add(ModelSource.parse(str(tiny_package)))
        # A router's plain traffic asks for champion; the folder's own version (not a number)
        # can be named too.
        assert repository.resolve("tiny", "champion") is folder
        assert repository.resolve("tiny", folder.version) is folder
        assert "champion" in folder.aliases

        await repository.add(ModelSource("models:/tiny@champion", "tiny", alias="champion"))
        followed = repository.resolve("tiny", "champion")
        assert followed.version == "1"
        assert followed is not folder
        assert "champion" not in folder.aliases
        assert repository.resolve("tiny", folder.version) is folder  # still pinned, still served
        await repository.close()

    asyncio.run(scenario())
