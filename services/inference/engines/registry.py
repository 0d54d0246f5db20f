"""Engines registered by name: settings name an `EngineKind`, this table builds the engine.

Adding a backend means adding one entry here, never a branch in the worker.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from loopline.errors import NotFound
from loopline.package import Manifest
from services.inference.engines.base import Engine, EngineKind
from services.inference.engines.onnx import OnnxEngine, OnnxOptions

__all__ = ["ENGINES", "EngineFactory", "create_engine"]

EngineFactory = Callable[[Path, Manifest, OnnxOptions], Engine]

ENGINES: dict[EngineKind, EngineFactory] = {
    EngineKind.ONNX: OnnxEngine.load,
}


def create_engine(
    kind: EngineKind, package_dir: Path, manifest: Manifest, options: OnnxOptions
) -> Engine:
    """Load `package_dir` with the engine registered as `kind`; NotFound names the known ones."""
    factory = ENGINES.get(kind)
    if factory is None:
        known = ", ".join(sorted(str(k) for k in ENGINES))
        raise NotFound("engine", str(kind), hint=f"registered engines: {known}")
    return factory(Path(package_dir), manifest, options)
