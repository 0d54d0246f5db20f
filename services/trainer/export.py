"""Export a trained classifier as a model package: ONNX fp32 (optimised), int8, optional fp16.

The int8 variant must give every text the same answer whatever shares its batch. ORT's
`quantize_dynamic` computes one activation scale per batch, so a text's answer moves with its
neighbours (16-20 of 1,000 labels flipped on the fine-tuned MiniLM). Two exporters avoid that:

- "static" (the default when calibration batches are given): int8 per-channel weights and *fixed*
  uint8 activation scales measured on training text. It starts from `quantize_dynamic`'s graph,
  whose integer kernels are the fast ones on x86 (`QAttention` for the fused attention,
  MatMulInteger for the other projections), replaces each `DynamicQuantizeLinear` with a
  `QuantizeLinear` whose scale and zero point are constants, and writes each MatMulInteger -> Cast
  -> Mul [-> Add] chain as one `MatMulIntegerToFloat` (ORT's own fusion only fires on run-time
  scales). Quantising one element never looks at another, so batching cannot change an answer.
- "blockwise": 8-bit block-quantised weights (MatMulNBits) whose activations are quantised per row
  and block at run time; batch independent too and needs no calibration, but barely faster than
  fp32 on x86. The fallback when no calibration text is given or the static graph fails a gate.

After either, `compact_word_embedding` stores the word-embedding table (most of a small model's
bytes, left fp32 by both) as int8 rows with one scale each, dequantising only the rows looked up.

`scripts/int8_study.py` measured both against the alternatives; docs/training.md has the table.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from loopline.errors import FailedPrecondition
from loopline.package import (
    EMBEDDING_OUTPUT,
    INT8_MAX_DROP_POINTS,
    LOGITS_OUTPUT,
    MAX_EXPORT_ERROR,
    TOKENIZER_FILE,
    VARIANT_FILES,
)
from loopline.runtime import pad
from services.trainer.modeling import SentenceClassifier

log = logging.getLogger(__name__)

OPSET = 17
INPUT_NAMES = ["input_ids", "attention_mask"]
# Families whose exported graph matches the BERT fusion patterns of ORT's transformer optimizer.
BERT_LIKE = {"bert", "roberta", "xlm-roberta", "distilbert", "camembert", "electra", "mpnet"}

Int8Method = Literal["static", "blockwise"]
# (input_ids, attention_mask), int64, padded as the runtime pads: what calibration runs on.
CalibrationBatch = tuple[np.ndarray, np.ndarray]


class ExportRefused(FailedPrecondition):
    """The exported graph does not match the trained model closely enough to be served."""

    def __init__(self, message: str, **figures: Any) -> None:
        super().__init__(f"export refused: {message}", **figures)


@dataclass(frozen=True)
class ExportOptions:
    """What to export and how strictly to check it."""

    int8: bool = True
    fp16: bool = False
    optimize: bool = True
    max_abs_logit_diff: float = MAX_EXPORT_ERROR
    max_int8_accuracy_drop_points: float = INT8_MAX_DROP_POINTS
    # "static" needs calibration batches; without them write_graphs falls back to "blockwise".
    int8_method: Int8Method = "static"
    int8_block_size: int = 32  # blockwise only


def export_fp32(model: SentenceClassifier, path: Path) -> None:
    """Trace to ONNX with dynamic batch and sequence axes; outputs logits and the embedding."""
    model = model.cpu().eval()
    encoder: Any = model.encoder
    if hasattr(encoder, "set_attn_implementation"):
        # Eager attention traces into the MatMul/Softmax pattern that ORT fuses into Attention.
        try:
            encoder.set_attn_implementation("eager")
        except (ValueError, NotImplementedError):
            log.debug("eager attention unavailable; exporting the default implementation")
    dummy_ids = torch.ones((2, 16), dtype=torch.long)
    dummy_mask = torch.ones((2, 16), dtype=torch.long)
    dynamic = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "sequence"},
        LOGITS_OUTPUT: {0: "batch"},
        EMBEDDING_OUTPUT: {0: "batch"},
    }
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (dummy_ids, dummy_mask),
            str(path),
            input_names=INPUT_NAMES,
            output_names=[LOGITS_OUTPUT, EMBEDDING_OUTPUT],
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
        )


def optimize_graph(
    source: Path, target: Path, architecture: str, num_heads: int, hidden_size: int
) -> str:
    """Fuse attention, layer norms and GELU with ORT's transformer optimizer where it applies.

    Returns a short description of what was applied (recorded in the manifest).
    """
    from onnxruntime.transformers.optimizer import optimize_model

    if architecture not in BERT_LIKE:
        shutil.copyfile(source, target)
        return "none (no fusion patterns for this architecture)"
    optimized = optimize_model(
        str(source), model_type="bert", num_heads=num_heads, hidden_size=hidden_size, opt_level=1
    )
    stats = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
    optimized.save_model_to_file(str(target))
    return "onnxruntime transformer optimizer: " + ", ".join(
        f"{k} x{v}" for k, v in sorted(stats.items())
    )


def quantize_int8(source: Path, target: Path, block_size: int = 32) -> None:
    """8-bit block-wise weights with per-row, per-block activation scales (batch independent)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(source)), bits=8, block_size=block_size, is_symmetric=True, accuracy_level=4
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(target), use_external_data_format=False)


def calibration_batches(
    token_ids: Sequence[Sequence[int]], pad_id: int, *, texts: int = 512, batch_size: int = 32
) -> list[CalibrationBatch]:
    """Up to `texts` tokenized texts spread evenly over the set, in length-sorted padded batches.

    Length-sorted like the worker's batches, so calibration sees the padding it will see.
    """
    if not token_ids:
        return []
    step = max(1, len(token_ids) // texts)
    chosen = sorted((list(ids) for ids in token_ids[::step][:texts]), key=len)
    return [pad(chosen[i : i + batch_size], pad_id) for i in range(0, len(chosen), batch_size)]


def activation_ranges(
    source: Path, tensors: Sequence[str], calibration: Sequence[CalibrationBatch]
) -> dict[str, tuple[float, float]]:
    """(min, max) of each named fp32 tensor over the real (unpadded) tokens of the batches."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    model = onnx.load(str(source))
    present = {o.name for o in model.graph.output}
    for name in tensors:
        if name not in present:
            model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    # Basic optimisation only: extended fusions could swallow a tensor we want to observe.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    low = dict.fromkeys(tensors, np.inf)
    high = dict.fromkeys(tensors, -np.inf)
    for input_ids, mask in calibration:
        values = session.run(list(tensors), {"input_ids": input_ids, "attention_mask": mask})
        real = mask.astype(bool)
        for name, value in zip(tensors, values, strict=True):
            array = np.asarray(value)
            if array.ndim >= 3 and array.shape[:2] == real.shape:  # (batch, sequence, ...)
                array = array[real]  # padding is masked out downstream; its range is noise
            if array.size:
                low[name] = min(low[name], float(array.min()))
                high[name] = max(high[name], float(array.max()))
    missing = [n for n in tensors if not np.isfinite(low[n])]
    if missing:
        raise ValueError(f"calibration saw no values for {missing[:3]}")
    return {n: (low[n], high[n]) for n in tensors}


def uint8_scale(low: float, high: float) -> tuple[float, int]:
    """Scale and zero point of asymmetric uint8 over [low, high] widened to hold 0 exactly.

    The same arithmetic as `DynamicQuantizeLinear`, done once at export instead of per batch.
    """
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / 255.0
    if scale <= 0.0 or not np.isfinite(scale):
        return 1.0, 0
    return scale, int(np.clip(round(-low / scale), 0, 255))


def quantize_int8_static(
    source: Path,
    target: Path,
    calibration: Sequence[CalibrationBatch],
    *,
    per_channel: bool = True,
    attention: bool = True,
) -> dict[str, int]:
    """int8 weights, uint8 activations with fixed scales calibrated on `calibration`.

    `per_channel`: one weight scale per output column (same speed, closer to fp32);
    `attention`: quantise the fused attention's QKV projection too (QAttention), else it stays
    fp32. Returns the operator counts of the quantised part (for the manifest's description).
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if not calibration:
        raise ValueError("static int8 needs calibration batches")
    # The head stays fp32: tiny, and its logits are the answer. The quantiser rewrites a Gemm as
    # MatMul + Add named `<name>_MatMul` before it looks at the exclusions, hence both names.
    graph = onnx.load(str(source), load_external_data=False).graph
    heads = [n.name for n in graph.node if n.op_type == "Gemm"]
    with tempfile.TemporaryDirectory() as tmp:
        dynamic = Path(tmp) / "dynamic.onnx"
        quantize_dynamic(
            str(source),
            str(dynamic),
            # Never the embedding lookup: a gather, nothing to gain.
            op_types_to_quantize=["MatMul", "Attention"] if attention else ["MatMul"],
            nodes_to_exclude=[*heads, *(f"{n}_MatMul" for n in heads)],
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
            # Shape inference stops at ORT's fused operators; their outputs are float.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True},
        )
        model = onnx.load(str(dynamic))
    tensors = [n.input[0] for n in model.graph.node if n.op_type == "DynamicQuantizeLinear"]
    ranges = activation_ranges(source, sorted(set(tensors)), calibration)
    _freeze_activation_scales(model, ranges)
    _fuse_matmul_integer_to_float(model)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in _INTEGER_OPS:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    onnx.save(model, str(target))
    return counts


_INTEGER_OPS = {"MatMulIntegerToFloat", "MatMulInteger", "QAttention", "QuantizeLinear"}


def _freeze_activation_scales(model: Any, ranges: dict[str, tuple[float, float]]) -> None:
    """Each DynamicQuantizeLinear(x) -> (q, scale, zero point) becomes QuantizeLinear(x) -> q,
    its scale and zero point constants under the same names, so every consumer stays wired."""
    from onnx import helper, numpy_helper

    graph = model.graph
    nodes = []
    for node in graph.node:
        if node.op_type != "DynamicQuantizeLinear":
            nodes.append(node)
            continue
        source = node.input[0]
        quantized, scale_name, zero_name = node.output
        scale, zero = uint8_scale(*ranges[source])
        graph.initializer.append(numpy_helper.from_array(np.array(scale, np.float32), scale_name))
        graph.initializer.append(numpy_helper.from_array(np.array(zero, np.uint8), zero_name))
        nodes.append(
            helper.make_node(
                "QuantizeLinear", [source, scale_name, zero_name], [quantized], name=node.name
            )
        )
    del graph.node[:]
    graph.node.extend(nodes)


def _fuse_matmul_integer_to_float(model: Any) -> None:
    """MatMulInteger -> Cast -> Mul(Mul(a_scale, b_scale)) [-> Add(bias)] as MatMulIntegerToFloat.

    ORT fuses this chain itself only while the scales are computed at run time: with constant
    scales, constant folding removes the scale Mul before the fusion looks for it, and the three
    separate kernels are about a third slower. A chain of another shape is left as it is.
    """
    from onnx import helper

    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    constants = {init.name: init for init in graph.initializer}
    outputs = {o.name for o in graph.output}
    replaced: dict[int, Any] = {}
    removed: set[int] = set()
    for node in graph.node:
        if node.op_type != "MatMulInteger" or node.output[0] in outputs:
            continue
        chain = _scale_chain(node, consumers, producer, constants, outputs)
        if chain is None:
            continue
        cast, mul, scales, add, bias = chain
        quantize = producer.get(node.input[0])
        if quantize is None or quantize.op_type != "QuantizeLinear":
            continue
        a_scale = quantize.input[1]
        if a_scale not in scales.input:
            continue
        b_scale = scales.input[1] if scales.input[0] == a_scale else scales.input[0]
        zeros = [*node.input[2:4], "", ""][:2]
        inputs = [node.input[0], node.input[1], a_scale, b_scale, *zeros, bias]
        while not inputs[-1]:
            inputs.pop()  # optional inputs left out at the end
        end = add if add is not None else mul
        replaced[id(node)] = helper.make_node(
            "MatMulIntegerToFloat", inputs, [end.output[0]], name=node.name, domain="com.microsoft"
        )
        removed.update(id(n) for n in (cast, mul, scales, add) if n is not None)
    nodes = [replaced.get(id(n), n) for n in graph.node if id(n) not in removed]
    del graph.node[:]
    graph.node.extend(nodes)
    if replaced and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def _scale_chain(
    node: Any,
    consumers: dict[str, list[Any]],
    producer: dict[str, Any],
    constants: dict[str, Any],
    outputs: set[str],
) -> tuple[Any, Any, Any, Any, str] | None:
    """The (Cast, Mul, scale Mul, Add or None, bias name or '') after a MatMulInteger, or None."""
    after = consumers.get(node.output[0], [])
    if len(after) != 1 or after[0].op_type != "Cast" or after[0].output[0] in outputs:
        return None
    cast = after[0]
    after = consumers.get(cast.output[0], [])
    if len(after) != 1 or after[0].op_type != "Mul":
        return None
    mul = after[0]
    other = mul.input[1] if mul.input[0] == cast.output[0] else mul.input[0]
    scales = producer.get(other)
    if scales is None or scales.op_type != "Mul" or len(consumers.get(other, [])) != 1:
        return None
    if not all(name in constants for name in scales.input):
        return None  # a scale still computed at run time: not our graph
    add, bias = None, ""
    after = consumers.get(mul.output[0], [])
    if len(after) == 1 and after[0].op_type == "Add" and mul.output[0] not in outputs:
        candidate = after[0]
        other = candidate.input[1] if candidate.input[0] == mul.output[0] else candidate.input[0]
        if other in constants and len(constants[other].dims) == 1:
            add, bias = candidate, other
    return cast, mul, scales, add, bias


def convert_fp16(source: Path, target: Path) -> None:
    """fp16 weights and compute for GPUs, fp32 inputs and outputs kept for callers."""
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(source)))
    model.convert_float_to_float16(keep_io_types=True)
    model.save_model_to_file(str(target))


def save_tokenizer(tokenizer: Any, directory: Path) -> None:
    """The fast tokenizer's JSON with padding and truncation off: the runtime sets both."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_padding()
    backend.no_truncation()
    backend.save(str(directory / TOKENIZER_FILE))


def write_graphs(
    model: SentenceClassifier,
    directory: Path,
    options: ExportOptions,
    calibration: Sequence[CalibrationBatch] | None = None,
) -> tuple[dict[str, str], str]:
    """Write every requested variant; returns (variant -> file, optimisation description).

    `calibration`: tokenized training text (`calibration_batches`) for the static int8 scales;
    without it the int8 variant is block-wise.
    """
    config = model.config
    architecture = str(config.model_type)
    variants = {"fp32": VARIANT_FILES["fp32"]}
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        export_fp32(model, raw)
        fp32 = directory / VARIANT_FILES["fp32"]
        if options.optimize:
            heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_heads", 0))
            optimization = optimize_graph(raw, fp32, architecture, heads, int(config.hidden_size))
        else:
            shutil.copyfile(raw, fp32)
            optimization = "none"
    if options.int8:
        method = options.int8_method if calibration else "blockwise"
        int8 = directory / VARIANT_FILES["int8"]
        optimization += "; int8: " + write_int8(fp32, int8, method, options, calibration or [])
        variants["int8"] = VARIANT_FILES["int8"]
    if options.fp16:
        convert_fp16(fp32, directory / VARIANT_FILES["fp16"])
        variants["fp16"] = VARIANT_FILES["fp16"]
    return variants, optimization


def write_int8(
    fp32: Path,
    target: Path,
    method: Int8Method,
    options: ExportOptions,
    calibration: Sequence[CalibrationBatch],
) -> str:
    """Write the int8 graph by `method`; returns the manifest's description of it."""
    if method == "blockwise":
        quantize_int8(fp32, target, options.int8_block_size)
        described = f"blockwise (MatMulNBits 8-bit, block {options.int8_block_size})"
    else:
        counts = quantize_int8_static(fp32, target, calibration)
        texts = sum(len(ids) for ids, _ in calibration)
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
        described = f"static (activation scales from {texts} training texts; {ops})"
    return f"{described}; {compact_word_embedding(target)}"


def quantize_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one fp32 scale per row, max|row| / 127: (int8 table, scales [rows]).

    Each dequantised element `q * scale` is within scale / 2 of the original; an all-zero row
    gets scale 0 and stays exactly zero.
    """
    scale = (np.abs(table).max(axis=1) / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0))[:, None]
    quantized = np.clip(np.rint(table / safe), -127, 127).astype(np.int8)
    return quantized, scale


def compact_word_embedding(path: Path) -> str:
    """Store the word-embedding table of the graph at `path` as int8 rows with per-row scales.

    The table is most of an int8 MiniLM (30,522 x 384 fp32: 47 of 58 MB) and both quantisers
    leave it fp32. Only the rows a batch looks up are dequantised, so ONNX Runtime holds the int8
    table (a quarter of the bytes) and each batch dequantises (batch x length) rows. Each token's
    row is computed alone, so batching still cannot change an answer. A table read any other way
    (tied to an output projection, say) is left as it is. Rewrites the file in place; returns
    the manifest's description of what was done.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    found = _word_table(model)
    if isinstance(found, str):
        return f"word embeddings left fp32 ({found})"
    name, readers = found
    initializer = next(i for i in graph.initializer if i.name == name)
    quantized, scale = quantize_rows(numpy_helper.to_array(initializer))
    table = _Int8Table(f"{name}_int8", f"{name}_scale")
    graph.initializer.remove(initializer)
    graph.initializer.extend(
        [numpy_helper.from_array(quantized, table.q), numpy_helper.from_array(scale, table.scale)]
    )
    for info in [v for v in graph.value_info if v.name == name]:
        graph.value_info.remove(info)
    rewritten = {id(n): _INT8_LOOKUPS[n.op_type](n, table, graph) for n in readers}
    nodes = [new for node in graph.node for new in rewritten.get(id(node), [node])]
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(path))
    rows, cols = quantized.shape
    before, after = rows * cols * 4, quantized.nbytes + scale.nbytes
    return (
        f"word embeddings int8 per row ({rows}x{cols}, {before / 1e6:.3g} -> {after / 1e6:.3g} MB)"
    )


@dataclass(frozen=True)
class _Int8Table:
    """The names of the compacted table's initializers."""

    q: str  # int8 [rows, columns]
    scale: str  # fp32 [rows]


def _word_table(model: Any) -> tuple[str, list[Any]] | str:
    """(table name, the nodes that look it up) or why the table is left alone."""
    graph = model.graph
    ids = {INPUT_NAMES[0]} | {
        n.output[0] for n in graph.node if n.op_type == "Cast" and n.input[0] == INPUT_NAMES[0]
    }
    tables = {n.input[2] for n in graph.node if n.op_type == "EmbedLayerNormalization"}
    tables |= {n.input[0] for n in graph.node if n.op_type == "Gather" and n.input[1] in ids}
    if len(tables) != 1:
        return "no single lookup of input_ids" if not tables else f"{len(tables)} lookup tables"
    (name,) = tables
    initializer = next((i for i in graph.initializer if i.name == name), None)
    if initializer is None or initializer.data_type != 1 or len(initializer.dims) != 2:
        return "the table is not a 2-D fp32 initializer"
    if name in {v.name for v in [*graph.input, *graph.output]}:
        return "the table is a graph input or output"
    if next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0) < 13:
        return "opset below 13"  # per-axis DequantizeLinear and Unsqueeze's axes input
    readers = [n for n in graph.node if name in n.input]
    others = [n.op_type for n in readers if not _is_lookup(n, name)]
    if others or name in _subgraph_names(graph):
        return f"the table is also read by {others[0] if others else 'a subgraph'}"
    return name, readers


def _is_lookup(node: Any, table: str) -> bool:
    """Whether `node` reads `table` only as rows picked by ids."""
    if list(node.input).count(table) != 1:
        return False
    if node.op_type == "Gather":
        axis = next((int(a.i) for a in node.attribute if a.name == "axis"), 0)
        return bool(node.input[0] == table and axis == 0)
    return bool(node.op_type == "EmbedLayerNormalization" and node.input[2] == table)


def _subgraph_names(graph: Any) -> set[str]:
    """Every tensor name read inside the subgraphs (If, Loop, Scan bodies) of `graph`."""
    names: set[str] = set()
    for node in graph.node:
        for attribute in node.attribute:
            for body in [attribute.g, *attribute.graphs] if attribute.type in (5, 10) else []:
                names |= {i for n in body.node for i in n.input} | _subgraph_names(body)
    return names


def _int8_gather(node: Any, table: _Int8Table, graph: Any) -> list[Any]:
    """Gather(table, ids) as Cast(Gather(q, ids)) * Unsqueeze(Gather(scale, ids), -1)."""
    from onnx import TensorProto, helper, numpy_helper

    p = f"{node.name or node.output[0]}_int8/"
    ids = node.input[1]
    graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), p + "last"))
    return [
        helper.make_node("Gather", [table.q, ids], [p + "q"], name=p + "q"),
        helper.make_node("Cast", [p + "q"], [p + "f"], name=p + "f", to=TensorProto.FLOAT),
        helper.make_node("Gather", [table.scale, ids], [p + "s"], name=p + "s"),
        helper.make_node("Unsqueeze", [p + "s", p + "last"], [p + "s1"], name=p + "s1"),
        helper.make_node("Mul", [p + "f", p + "s1"], [node.output[0]], name=p + "rows"),
    ]


def _int8_embed_layer_norm(node: Any, table: _Int8Table, graph: Any) -> list[Any]:
    """EmbedLayerNormalization given this batch's dequantised rows as its table.

    ids [B, L] -> rows [B*L, H], the table's row for each token in order, and the kernel's ids
    become Range(0, B*L) as [B, L]: it reads the same vectors as before and stays one fused
    kernel (positions, segments, LayerNorm and mask index as before). Per-axis
    DequantizeLinear does Cast and Mul in one kernel (about 1 % of batch-1 time saved).
    """
    from onnx import TensorProto, helper, numpy_helper

    p = f"{node.name or node.output[0]}_int8/"
    for key, value in {"flat": [-1], "zero": 0, "one": 1}.items():
        graph.initializer.append(numpy_helper.from_array(np.array(value, np.int64), p + key))

    def make(op: str, inputs: list[str], output: str, **attrs: Any) -> Any:
        return helper.make_node(op, inputs, [p + output], name=p + output, **attrs)

    fused = helper.make_node(
        node.op_type,
        [p + "local_ids", node.input[1], p + "rows", *node.input[3:]],
        list(node.output),
        name=node.name,
        domain=node.domain,
    )
    fused.attribute.extend(node.attribute)
    return [
        make("Reshape", [node.input[0], p + "flat"], "ids"),
        make("Gather", [table.q, p + "ids"], "q"),
        make("Gather", [table.scale, p + "ids"], "s"),
        make("DequantizeLinear", [p + "q", p + "s"], "rows", axis=0),
        make("Shape", [node.input[0]], "shape"),
        make("ReduceProd", [p + "shape"], "count", keepdims=0),
        make("Range", [p + "zero", p + "count", p + "one"], "positions"),
        make("Cast", [p + "positions"], "positions_int32", to=TensorProto.INT32),
        make("Reshape", [p + "positions_int32", p + "shape"], "local_ids"),
        fused,
    ]


_INT8_LOOKUPS = {"Gather": _int8_gather, "EmbedLayerNormalization": _int8_embed_layer_norm}


def label_flips(a: np.ndarray, b: np.ndarray) -> int:
    """How many rows change their argmax between two probability arrays."""
    return int((a.argmax(axis=1) != b.argmax(axis=1)).sum())


def batch_independence(
    probs_batched: np.ndarray, probs_alone: Sequence[np.ndarray]
) -> tuple[float, int]:
    """(max probability difference, label flips) between batched and one-at-a-time answers."""
    alone = np.concatenate(list(probs_alone), axis=0)
    return float(np.abs(probs_batched - alone).max()), label_flips(probs_batched, alone)
