"""The static int8 exporter on tiny random models: integer kernels, and batching changes nothing.

Random weights are enough: batch independence is a property of the graph (fixed activation
scales), not of what the model learned; accuracy is gated by the trainer's parity check.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from loopline.package import read_manifest
from loopline.runtime import pad, softmax
from services.trainer.export import (
    ExportOptions,
    ExportRefused,
    calibration_batches,
    quantize_int8_static,
    uint8_scale,
    write_graphs,
)
from services.trainer.modeling import build_classifier
from services.trainer.pipeline import TrainRequest, run_job
from tests.fixtures.packages import TINY_RECIPE
from tests.fixtures.tiny_models import DEFAULT_CORPUS

pytestmark = pytest.mark.slow

# Mixed lengths, so a batch pads most texts by several multiples of 8.
TEXTS = [*DEFAULT_CORPUS, "ok", "Bad.", " ".join(DEFAULT_CORPUS[:5])]


def tokenize(base_model: Path, texts: list[str]) -> tuple[list[list[int]], int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_model))
    ids = tokenizer(texts, truncation=True, max_length=64)["input_ids"]
    return [list(x) for x in ids], int(tokenizer.pad_token_id or 0)


def export(base_model: Path, directory: Path, calibrate: bool) -> tuple[dict[str, str], str]:
    model = build_classifier(str(base_model), 2).eval()
    ids, pad_id = tokenize(base_model, list(DEFAULT_CORPUS))
    calibration = calibration_batches(ids, pad_id, batch_size=8) if calibrate else None
    return write_graphs(model, directory, ExportOptions(int8=True), calibration)


def runtime_ops(path: Path, tmp_path: Path) -> set[str]:
    """The operators ONNX Runtime runs after its own optimisations on this CPU."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath, load_external_data=False).graph
    return {node.op_type for node in graph.node}


def probabilities(session: ort.InferenceSession, ids: list[list[int]], pad_id: int) -> np.ndarray:
    input_ids, mask = pad(ids, pad_id)
    (logits,) = session.run(["logits"], {"input_ids": input_ids, "attention_mask": mask})
    return softmax(np.asarray(logits))


@pytest.mark.parametrize("family", ["bert", "deberta-v2"])  # fused graph, and one left unfused
def test_static_int8_runs_integer_kernels_and_batching_changes_nothing(
    family: str, tiny_model_factory: Callable[[str], Path], tmp_path: Path
) -> None:
    base = tiny_model_factory(family)
    variants, description = export(base, tmp_path, calibrate=True)
    assert "int8: static" in description
    int8 = tmp_path / variants["int8"]

    nodes = onnx.load(str(int8), load_external_data=False).graph.node
    assert not [n for n in nodes if n.op_type == "DynamicQuantizeLinear"]  # no per-batch scale
    ops = runtime_ops(int8, tmp_path)
    assert "MatMulIntegerToFloat" in ops
    assert "QuantizeLinear" in ops
    assert not ops & {"DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulInteger"}
    if family == "bert":
        assert "QAttention" in ops  # the fused attention's QKV projection is integer too

    ids, pad_id = tokenize(base, TEXTS)
    assert len({len(x) // 8 for x in ids}) > 2  # several padding widths in one batch
    session = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    batched = probabilities(session, ids, pad_id)
    alone = np.concatenate([probabilities(session, [x], pad_id) for x in ids])
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    assert (batched.argmax(axis=1) == alone.argmax(axis=1)).all()

    # And it still computes the model: close to fp32 on a random model's small logits.
    fp32 = ort.InferenceSession(
        str(tmp_path / variants["fp32"]), providers=["CPUExecutionProvider"]
    )
    assert np.abs(probabilities(fp32, ids, pad_id) - batched).max() < 0.05


def test_the_trainer_ships_static_int8_calibrated_on_training_text(tiny_package: Path) -> None:
    manifest = read_manifest(tiny_package)
    assert "int8: static (activation scales from" in manifest.optimization
    parity = manifest.parity
    assert parity is not None
    assert parity.int8_batch_label_flips == 0
    assert parity.int8_max_batch_prob_diff is not None
    assert parity.int8_max_batch_prob_diff < 1e-5
    assert manifest.default_cpu_variant == "int8"


def test_static_int8_failing_a_gate_falls_back_to_blockwise_before_refusing(
    tiny_model_factory: Callable[[str], Path],
    sentiment_files: tuple[Path, Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    request = TrainRequest(
        data=sentiment_files[0],
        validation=sentiment_files[1],
        base_model=str(tiny_model_factory("bert")),
        output=tmp_path,
        register_version=False,
        int8_max_drop_points=-1.0,  # int8 would have to beat fp32: both graphs fail
        train=TINY_RECIPE.model_copy(update={"epochs": 1}),
    )
    with caplog.at_level("WARNING"), pytest.raises(ExportRefused, match="int8 accuracy"):
        run_job(request)
    assert any("block-wise int8 instead" in r.getMessage() for r in caplog.records)
    nodes = onnx.load(str(tmp_path / "package" / "model.int8.onnx"), load_external_data=False)
    assert {n.op_type for n in nodes.graph.node} >= {"MatMulNBits"}  # the fallback was written


def test_without_calibration_text_the_int8_variant_is_blockwise(
    tiny_model_factory: Callable[[str], Path], tmp_path: Path
) -> None:
    variants, description = export(tiny_model_factory("bert"), tmp_path, calibrate=False)
    assert "int8: blockwise" in description
    assert "MatMulNBits" in runtime_ops(tmp_path / variants["int8"], tmp_path)


def test_static_int8_refuses_to_run_without_calibration(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="calibration"):
        quantize_int8_static(tmp_path / "missing.onnx", tmp_path / "int8.onnx", [])


def test_calibration_batches_sample_evenly_sort_by_length_and_pad() -> None:
    ids = [[1] * (n % 13 + 2) for n in range(100)]
    batches = calibration_batches(ids, pad_id=0, texts=20, batch_size=8)
    assert [len(b[0]) for b in batches] == [8, 8, 4]
    lengths = [int(m.sum()) for _, mask in batches for m in mask]
    assert lengths == sorted(lengths)
    assert all(ids_.shape[1] % 8 == 0 and ids_.dtype == np.int64 for ids_, _ in batches)
    assert calibration_batches([], pad_id=0) == []


@pytest.mark.parametrize(
    ("low", "high", "scale", "zero"),
    [(-1.0, 1.0, 2 / 255, 128), (0.5, 2.0, 2 / 255, 0), (-3.0, -1.0, 3 / 255, 255), (0, 0, 1, 0)],
)
def test_uint8_scale_holds_zero_exactly(low: float, high: float, scale: float, zero: int) -> None:
    got_scale, got_zero = uint8_scale(low, high)
    assert got_scale == pytest.approx(scale)
    assert got_zero == zero
