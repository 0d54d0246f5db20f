"""Which int8 graph to ship: speed at batch 1 and 32, accuracy, and batch independence.

    python scripts/int8_study.py --package /tmp/int8work/run/package \
        --checkpoint /tmp/int8work/run/checkpoint --out /tmp/int8work/study

Builds int8 variants of one package's fp32 graph (`model.onnx`, the fused graph the exporter
writes), then measures each against fp32 in the same run, interleaved round by round so that a
noisy shared machine slows every variant alike:

- speed: the worker's session options (`OnnxOptions` defaults: arena off, glibc mmap threshold
  pinned at 128 KiB unless --no-mmap-pin, intra-op threads one per core), the 1,000 validation
  texts in length-sorted batches of 32, and one at a time; sentences/s and ms per text, and the
  ratio to fp32. Variants take turns chunk by chunk and each chunk keeps its fastest round
  (`measure_speed`), so the ratios hold on a machine other work is using;
- accuracy on the validation labels, agreement with fp32, and batch independence as the exporter's
  parity gate measures it: each text batched (32, sorted by length) vs alone, label flips and the
  largest probability difference.

Variants (names in the table):
  fp32            the package's fused fp32 graph
  blockwise       MatMulNBits 8-bit weights, activations quantised per row and block at run time
                  (accuracy_level 4): the exporter's fallback
  dynamic         ORT `quantize_dynamic` on the fused graph, as a user would run it: one activation
                  scale per batch (the fast, batch-dependent reference)
  static          the exporter's default: `quantize_dynamic`'s integer graph (per-channel
                  weights) with every activation scale fixed from training text (QuantizeLinear +
                  QAttention / MatMulIntegerToFloat)
  static-pt       the same with one weight scale per tensor
  static-noqkv    the same with the fused attention left fp32 (its QKV projection unquantised)
  qdq-fused       `quantize_static` QDQ on MatMul only, after symbolic shape inference of the fused
                  graph, MatMul outputs left float: ORT runs MatMulIntegerToFloat, attention fp32
  qdq-weights     the same without shape inference: the quantiser cannot type the fused operators'
                  outputs, so only weights are quantised and ORT runs fp32 MatMulNBits
  qdq-noattn      (with --checkpoint) the raw export optimised without attention fusion, then QDQ
                  static on MatMul, outputs float
  static-noattn   (with --checkpoint) the same graph through the exporter's static recipe
The calibration texts come from the training file, never from the validation file.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loopline.package import read_manifest  # noqa: E402
from loopline.runtime import PackageTokenizer, pad, softmax  # noqa: E402
from services.trainer import export as exportlib  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "movie_reviews"
Batch = tuple[np.ndarray, np.ndarray]


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Reader:
    """ORT's CalibrationDataReader protocol over prepared batches."""

    def __init__(self, batches: Sequence[Batch]) -> None:
        self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {"input_ids": batch[0], "attention_mask": batch[1]}


def build_dynamic(fp32: Path, target: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(fp32),
        str(target),
        weight_type=QuantType.QInt8,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )


def build_qdq(
    fp32: Path, target: Path, calibration: Sequence[Batch], *, shapes: bool = True
) -> None:
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "shaped.onnx"
        model = onnx.load(str(fp32))
        if shapes:
            model = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
        onnx.save(model, str(source))
        quantize_static(
            str(source),
            str(target),
            Reader(calibration),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"],
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            extra_options={
                "MatMulConstBOnly": True,
                "OpTypesToExcludeOutputQuantization": ["MatMul"],
            },
        )


def build_no_attention_fusion(
    checkpoint: Path, target: Path, calibration: Sequence[Batch], *, qdq: bool
) -> None:
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    from services.trainer.modeling import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    config = model.config
    with tempfile.TemporaryDirectory() as tmp:
        raw, fused = Path(tmp) / "raw.onnx", Path(tmp) / "fused.onnx"
        exportlib.export_fp32(model, raw)
        fusion = FusionOptions("bert")
        fusion.enable_attention = False
        optimized = optimize_model(
            str(raw),
            model_type="bert",
            num_heads=int(config.num_attention_heads),
            hidden_size=int(config.hidden_size),
            optimization_options=fusion,
            opt_level=1,
        )
        optimized.save_model_to_file(str(fused))
        if qdq:
            build_qdq(fused, target, calibration)
        else:
            exportlib.quantize_int8_static(fused, target, calibration)


def runtime_ops(path: Path) -> dict[str, int]:
    """The operators ORT actually runs after its own optimisations (all levels, this CPU)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath, load_external_data=False).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    interesting = {
        "MatMul",
        "MatMulNBits",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        "DynamicQuantizeLinear",
        "QLinearMatMul",
        "QuantizeLinear",
        "DequantizeLinear",
        "Attention",
        "QAttention",
    }
    return {k: v for k, v in sorted(counts.items()) if k in interesting}


def session(path: Path, *, pin_mmap_threshold: bool = True) -> Any:
    """A session as the worker's engine makes it; the glibc pin is process-wide, like there."""
    import onnxruntime as ort

    from services.inference.engines.onnx import (
        OnnxOptions,
        _session_options,
        pin_malloc_mmap_threshold,
    )

    options = OnnxOptions()
    if pin_mmap_threshold and options.malloc_mmap_threshold_bytes is not None:
        pin_malloc_mmap_threshold(options.malloc_mmap_threshold_bytes)
    return ort.InferenceSession(
        str(path), _session_options(options), providers=["CPUExecutionProvider"]
    )


def quality(sess: Any, texts: Texts) -> tuple[dict[str, Any], np.ndarray]:
    """Accuracy and batch independence, measured as the exporter's parity gate does."""

    def logits(chunk: list[int]) -> np.ndarray:
        input_ids, mask = pad([texts.ids[i] for i in chunk], texts.pad_id)
        out = sess.run(["logits"], {"input_ids": input_ids, "attention_mask": mask})[0]
        return np.asarray(out, np.float32)

    count = len(texts.ids)
    order = sorted(range(count), key=lambda i: texts.char_lengths[i])
    batched = np.zeros((count, int(texts.truth.max()) + 1), np.float32)
    for start in range(0, count, 32):
        chunk = order[start : start + 32]
        batched[chunk] = logits(chunk)
    alone = np.concatenate([logits([i]) for i in range(count)])
    pb, pa = softmax(batched), softmax(alone)
    figures = {
        "accuracy": float((pb.argmax(1) == texts.truth).mean()),
        "flips": int((pb.argmax(1) != pa.argmax(1)).sum()),
        "max_prob_diff": float(np.abs(pb - pa).max()),
    }
    return figures, pb


def timed(sess: Any, batches: Sequence[Batch]) -> float:
    started = time.perf_counter()
    for input_ids, mask in batches:
        sess.run(None, {"input_ids": input_ids, "attention_mask": mask})
    return time.perf_counter() - started


@dataclass
class Texts:
    """The validation texts tokenized once, in the shapes each measurement needs."""

    ids: list[list[int]]
    truth: np.ndarray
    char_lengths: list[int]  # PackageRunner (the parity gate) sorts by characters
    b32: list[Batch]  # the worker and the bench sort by tokens
    b1: list[Batch]
    pad_id: int


def load_texts(package: Path, validation: Path) -> Texts:
    manifest = read_manifest(package)
    tokenizer = PackageTokenizer(package, manifest)
    pad_id = manifest.pad_token_id
    examples = rows(validation)
    ids = [t.ids for t in tokenizer.tokenize([r["text"] for r in examples])]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    return Texts(
        ids=ids,
        truth=np.asarray([manifest.labels.index(r["label"]) for r in examples]),
        char_lengths=[len(r["text"]) for r in examples],
        b32=[pad([ids[i] for i in order[s : s + 32]], pad_id) for s in range(0, len(order), 32)],
        b1=[pad([ids[i]], pad_id) for i in order],
        pad_id=pad_id,
    )


def build_variants(
    args: argparse.Namespace, calibration: Sequence[Batch], wanted: set[str] | None
) -> dict[str, Path]:
    fp32 = args.package / "model.onnx"

    def static(target: Path, *, per_channel: bool = True, attention: bool = True) -> None:
        exportlib.quantize_int8_static(
            fp32, target, calibration, per_channel=per_channel, attention=attention
        )

    builders: dict[str, Callable[[Path], None]] = {
        "blockwise": lambda t: exportlib.quantize_int8(fp32, t),
        "dynamic": lambda t: build_dynamic(fp32, t),
        "static-pt": lambda t: static(t, per_channel=False),
        "static": static,
        "static-noqkv": lambda t: static(t, attention=False),
        "qdq-fused": lambda t: build_qdq(fp32, t, calibration),
        "qdq-weights": lambda t: build_qdq(fp32, t, calibration, shapes=False),
    }
    if args.checkpoint is not None:
        checkpoint = args.checkpoint
        builders["qdq-noattn"] = lambda t: build_no_attention_fusion(
            checkpoint, t, calibration, qdq=True
        )
        builders["static-noattn"] = lambda t: build_no_attention_fusion(
            checkpoint, t, calibration, qdq=False
        )
    paths = {"fp32": fp32}
    for name, build in builders.items():
        if wanted is not None and name not in wanted:
            continue
        target = args.out / f"{name}.onnx"
        started = time.perf_counter()
        build(target)
        paths[name] = target
        print(f"built {name} in {time.perf_counter() - started:.1f} s", flush=True)
    return paths


def measure_speed(
    sessions: dict[str, Any], texts: Texts, rounds: int, results: dict[str, dict[str, Any]]
) -> None:
    """Time on a shared, noisy machine: interleave finely and keep each chunk's fastest run.

    The texts are cut into chunks of about 0.1 s of work (one batch of 32, or 20 texts one at a
    time); each round runs every variant on a chunk before moving to the next chunk, rotating
    which variant goes first. A variant's time is the sum over chunks of its fastest round, so a
    burst of someone else's work costs a round, not the comparison.
    """
    names = list(sessions)
    for sess in sessions.values():  # warm-up
        timed(sess, texts.b32[:4])
        timed(sess, texts.b1[:50])
    count = len(texts.ids)
    plans = {
        "b32": [texts.b32[i : i + 1] for i in range(len(texts.b32))],
        "b1": [texts.b1[i : i + 20] for i in range(0, len(texts.b1), 20)],
    }
    for size, chunks in plans.items():
        best = {name: [float("inf")] * len(chunks) for name in names}
        for round_ in range(rounds):
            for index, chunk in enumerate(chunks):
                for k in range(len(names)):
                    name = names[(index + round_ + k) % len(names)]
                    best[name][index] = min(best[name][index], timed(sessions[name], chunk))
            print(f"{size}: round {round_ + 1}/{rounds} done", flush=True)
        for name in names:
            seconds = sum(best[name])
            results[name][f"{size}_per_s"] = round(count / seconds, 1)
            results[name][f"{size}_vs_fp32"] = round(sum(best["fp32"]) / seconds, 2)
    for name in names:
        results[name]["b1_ms"] = round(1000 / results[name]["b1_per_s"], 2)


def print_table(results: dict[str, dict[str, Any]]) -> None:
    acc32 = results["fp32"]["accuracy"]
    print(
        "| variant | batch 32 (sent./s) | vs fp32 | batch 1 (ms) | vs fp32 | accuracy "
        "| vs fp32 (points) | flips | max prob. diff |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(
            f"| {name} | {r['b32_per_s']} | x{r['b32_vs_fp32']} | {r['b1_ms']} "
            f"| x{r['b1_vs_fp32']} | {100 * r['accuracy']:.1f} % "
            f"| {100 * (r['accuracy'] - acc32):+.1f} | {r['flips']} | {r['max_prob_diff']:.2g} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--package", type=Path, required=True, help="package with model.onnx")
    parser.add_argument("--checkpoint", type=Path, help="its checkpoint (for *-noattn)")
    parser.add_argument("--train", type=Path, default=DATA / "train.jsonl")
    parser.add_argument("--validation", type=Path, default=DATA / "validation.jsonl")
    parser.add_argument("--out", type=Path, default=Path("/tmp/int8-study"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calibration-texts", type=int, default=512)
    parser.add_argument("--variants", help="comma-separated subset (fp32 is always measured)")
    parser.add_argument(
        "--speed-only",
        action="store_true",
        help="time the variants already built in --out (a quieter moment's rerun), no quality",
    )
    parser.add_argument(
        "--no-mmap-pin",
        action="store_true",
        help="leave glibc's mmap threshold dynamic (OnnxOptions.malloc_mmap_threshold_bytes=None)",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    manifest = read_manifest(args.package)
    tokenizer = PackageTokenizer(args.package, manifest)
    train_ids = [t.ids for t in tokenizer.tokenize([r["text"] for r in rows(args.train)])]
    calibration = exportlib.calibration_batches(
        train_ids, manifest.pad_token_id, texts=args.calibration_texts
    )
    texts = load_texts(args.package, args.validation)
    wanted = set(args.variants.split(",")) if args.variants else None
    if args.speed_only:
        built = {p.stem: p for p in sorted(args.out.glob("*.onnx"))}
        paths = {"fp32": args.package / "model.onnx"}
        paths.update({n: p for n, p in built.items() if wanted is None or n in wanted})
    else:
        paths = build_variants(args, calibration, wanted)

    results: dict[str, dict[str, Any]] = {name: {} for name in paths}
    pin = not args.no_mmap_pin
    sessions = {name: session(path, pin_mmap_threshold=pin) for name, path in paths.items()}
    if args.speed_only:
        measure_speed(sessions, texts, args.rounds, results)
        for name, figures in results.items():
            print(name, figures)
        return
    reference: np.ndarray | None = None
    for name, sess in sessions.items():
        figures, probs = quality(sess, texts)
        if reference is None:
            reference = probs
        results[name] |= {
            **figures,
            "agree_fp32": float((probs.argmax(1) == reference.argmax(1)).mean()),
            "runtime_ops": runtime_ops(paths[name]),
        }
        print(name, results[name], flush=True)
    measure_speed(sessions, texts, args.rounds, results)
    (args.out / "int8_study.json").write_text(json.dumps(results, indent=2))
    print()
    print_table(results)


if __name__ == "__main__":
    main()
