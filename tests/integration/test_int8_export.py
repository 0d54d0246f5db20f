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
from onnx import TensorProto, helper, numpy_helper

from loopline.package import read_manifest
from loopline.runtime import pad, softmax
from services.trainer.export import (
    ExportOptions,
    ExportRefused,
    Int8Method,
    calibration_batches,
    compact_word_embedding,
    quantize_int8,
    quantize_int8_static,
    quantize_rows,
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


def calibration(base_model: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    ids, pad_id = tokenize(base_model, list(DEFAULT_CORPUS))
    return calibration_batches(ids, pad_id, batch_size=8)


def export(
    base_model: Path, directory: Path, calibrate: bool, optimize: bool = True
) -> tuple[dict[str, str], str]:
    model = build_classifier(str(base_model), 2).eval()
    options = ExportOptions(int8=True, optimize=optimize)
    return write_graphs(model, directory, options, calibration(base_model) if calibrate else None)


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


def initializers(path: Path) -> dict[str, np.ndarray]:
    graph = onnx.load(str(path)).graph
    return {i.name: numpy_helper.to_array(i) for i in graph.initializer}


def word_table(path: Path, shape: tuple[int, int], dtype: type) -> list[str]:
    """Names of the initializers of the word table's shape and `dtype`."""
    return [n for n, a in initializers(path).items() if a.shape == shape and a.dtype == dtype]


def outputs(path: Path, ids: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, embeddings) of one padded batch."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_ids, mask = pad(ids, pad_id)
    logits, embedding = session.run(
        ["logits", "embedding"], {"input_ids": input_ids, "attention_mask": mask}
    )
    return softmax(np.asarray(logits)), np.asarray(embedding)


@pytest.mark.parametrize(
    ("family", "optimize", "method", "lookup"),
    [
        ("bert", True, "static", "EmbedLayerNormalization"),
        ("bert", False, "static", "Gather"),
        ("bert", True, "blockwise", "EmbedLayerNormalization"),
        ("distilbert", True, "static", "EmbedLayerNormalization"),  # and a Gather, both rewritten
    ],
)
def test_int8_word_table_is_stored_as_int8_rows_and_the_graph_computes_the_same(
    family: str,
    optimize: bool,
    method: Int8Method,
    lookup: str,
    tiny_model_factory: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    base = tiny_model_factory(family)
    variants, description = export(base, tmp_path, method == "static", optimize)
    assert f"int8: {method}" in description
    assert "word embeddings int8 per row" in description
    shipped, fp32 = tmp_path / variants["int8"], tmp_path / variants["fp32"]
    # The same quantiser without the post-pass: what shipped before the table was compacted.
    before = tmp_path / "uncompacted.onnx"
    if method == "static":
        quantize_int8_static(fp32, before, calibration(base))
    else:
        quantize_int8(fp32, before)
    assert lookup in {n.op_type for n in onnx.load(str(before)).graph.node}
    config = build_classifier(str(base), 2).config
    shape = (int(config.vocab_size), int(config.hidden_size))

    (table_name,) = word_table(before, shape, np.float32)
    assert word_table(shipped, shape, np.float32) == []  # no fp32 copy of the table is left
    (int8_name,) = word_table(shipped, shape, np.int8)
    (scale_name,) = word_table(shipped, (shape[0],), np.float32)
    table = initializers(before)[table_name]
    quantized, scale = initializers(shipped)[int8_name], initializers(shipped)[scale_name]
    # Symmetric per row: the largest element of each row maps to +-127, every element rounds to
    # within half a step (float32 division adds at most an ulp to that).
    np.testing.assert_allclose(scale, np.abs(table).max(axis=1) / 127, rtol=1e-6)
    dequantized_table = quantized.astype(np.float32) * scale[:, None]
    assert (np.abs(dequantized_table - table) <= scale[:, None] * 0.501).all()
    assert shipped.stat().st_size < before.stat().st_size - table.nbytes // 2

    # The rewired graph looks up exactly the rows the dequantised table holds: against the
    # uncompacted graph given that table, only floating-point noise may differ (the batch
    # independence bar above). Padding, several lengths and repeated tokens are all in TEXTS.
    dequantized = tmp_path / "dequantized.onnx"
    model = onnx.load(str(before))
    (init,) = [i for i in model.graph.initializer if i.name == table_name]
    init.CopyFrom(numpy_helper.from_array(dequantized_table, table_name))
    onnx.save(model, str(dequantized))
    ids, pad_id = tokenize(base, TEXTS)
    probs, embedding = outputs(shipped, ids, pad_id)
    expected_probs, expected_embedding = outputs(dequantized, ids, pad_id)
    np.testing.assert_allclose(probs, expected_probs, atol=1e-5)
    np.testing.assert_allclose(embedding, expected_embedding, atol=1e-5)
    # Against the fp32 table: each element moved by at most 1/254 of its row's largest, a 0.4 %
    # perturbation that the embedding LayerNorm passes on at about that size; 0.01 in probability
    # is the trainer's batch-independence bar, far above it and far below any real change.
    assert np.abs(probs - outputs(before, ids, pad_id)[0]).max() < 0.01

    alone = np.concatenate([outputs(shipped, [x], pad_id)[0] for x in ids])
    np.testing.assert_allclose(probs, alone, atol=1e-5)  # still batch independent


def test_a_word_table_also_read_by_another_node_is_left_fp32(tmp_path: Path) -> None:
    """Tied weights: the table is also an output projection, so it cannot become int8 rows."""
    table = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "input_ids"], ["hidden"]),
            helper.make_node("Transpose", ["table"], ["table_t"]),
            helper.make_node("MatMul", ["hidden", "table_t"], ["logits"]),
        ],
        "tied",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(table, "table")],
    )
    path = tmp_path / "tied.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    saved = path.read_bytes()
    description = compact_word_embedding(path)
    assert description.startswith("word embeddings left fp32")
    assert "Transpose" in description
    assert path.read_bytes() == saved


def test_quantize_rows_is_symmetric_per_row_within_half_a_step() -> None:
    table = np.random.default_rng(0).standard_normal((20, 16)).astype(np.float32)
    table[3] = 0.0  # a padding row: stays exactly zero
    table[5] *= 100.0  # rows of very different sizes keep their own scales
    quantized, scale = quantize_rows(table)
    assert quantized.dtype == np.int8
    assert scale.shape == (20,)
    assert scale.dtype == np.float32
    assert (np.abs(quantized).max(axis=1)[np.arange(20) != 3] == 127).all()
    assert not quantized[3].any()
    assert scale[3] == 0
    assert (np.abs(quantized * scale[:, None] - table) <= scale[:, None] * 0.501).all()
