"""The model package manifest: round trip, validation, and the shared sketch projection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from loopline.package import (
    Manifest,
    PackageError,
    Sketch,
    read_manifest,
    write_manifest,
)


def _manifest(**overrides: object) -> Manifest:
    fields: dict[str, object] = dict(
        name="sentiment",
        labels=["negative", "positive"],
        max_length=64,
        embedding_dim=8,
        architecture="bert",
        base_model="tiny",
        variants={"fp32": "model.onnx"},
    )
    fields.update(overrides)
    return Manifest.model_validate(fields)


def _package(tmp_path: Path, manifest: Manifest) -> Path:
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    (tmp_path / "tokenizer.json").write_text("{}")
    write_manifest(tmp_path, manifest)
    return tmp_path


def test_round_trip(tmp_path: Path) -> None:
    manifest = _manifest(metrics={"accuracy": 0.9})
    assert read_manifest(_package(tmp_path, manifest)) == manifest


def test_missing_manifest_or_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match=r"no loopline\.json"):
        read_manifest(tmp_path)
    _package(tmp_path, _manifest(variants={"fp32": "model.onnx", "int8": "model.int8.onnx"}))
    with pytest.raises(PackageError, match=r"missing model\.int8\.onnx"):
        read_manifest(tmp_path)


def test_invalid_or_future_manifest_is_refused(tmp_path: Path) -> None:
    _package(tmp_path, _manifest())
    (tmp_path / "loopline.json").write_text('{"name": "x"}')
    with pytest.raises(PackageError, match=r"invalid loopline\.json"):
        read_manifest(tmp_path)
    _package(tmp_path, _manifest(format_version=99))
    with pytest.raises(PackageError, match="upgrade Loopline"):
        read_manifest(tmp_path)


def test_a_single_label_is_not_a_classifier() -> None:
    with pytest.raises(ValueError, match="labels"):
        _manifest(labels=["only"])


def test_sketch_matrix_is_reproducible_and_roughly_norm_preserving() -> None:
    sketch = Sketch(seed=5, dimensions=16)
    a, b = sketch.matrix(384), sketch.matrix(384)
    assert a.shape == (384, 16)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, Sketch(seed=6).matrix(384))
    vectors = np.random.default_rng(0).standard_normal((200, 384)).astype(np.float32)
    ratio = np.linalg.norm(vectors @ a, axis=1) / np.linalg.norm(vectors, axis=1)
    assert 0.7 < float(ratio.mean()) < 1.3
