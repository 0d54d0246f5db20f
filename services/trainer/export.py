"""Export a trained classifier as a model package: ONNX fp32 (optimised), int8, optional fp16.

The int8 variant uses 8-bit block-quantised weights (MatMulNBits) whose activations are quantised
per row and block at run time. Dynamic quantisation (ORT's `quantize_dynamic`) picks one
activation scale for the whole batch, so a text's answer would depend on its batch neighbours;
block-wise scales never look across rows, so batching cannot change an answer.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loopline.errors import FailedPrecondition
from loopline.package import EMBEDDING_OUTPUT, LOGITS_OUTPUT, TOKENIZER_FILE, VARIANT_FILES
from services.trainer.modeling import SentenceClassifier

log = logging.getLogger(__name__)

OPSET = 17
INPUT_NAMES = ["input_ids", "attention_mask"]
# Families whose exported graph matches the BERT fusion patterns of ORT's transformer optimizer.
BERT_LIKE = {"bert", "roberta", "xlm-roberta", "distilbert", "camembert", "electra", "mpnet"}


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
    max_abs_logit_diff: float = 1e-3
    max_int8_accuracy_drop_points: float = 0.5
    int8_block_size: int = 32


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
    model: SentenceClassifier, directory: Path, options: ExportOptions
) -> tuple[dict[str, str], str]:
    """Write every requested variant; returns (variant -> file, optimisation description)."""
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
        quantize_int8(fp32, directory / VARIANT_FILES["int8"], options.int8_block_size)
        variants["int8"] = VARIANT_FILES["int8"]
    if options.fp16:
        convert_fp16(fp32, directory / VARIANT_FILES["fp16"])
        variants["fp16"] = VARIANT_FILES["fp16"]
    return variants, optimization


def label_flips(a: np.ndarray, b: np.ndarray) -> int:
    """How many rows change their argmax between two probability arrays."""
    return int((a.argmax(axis=1) != b.argmax(axis=1)).sum())


def batch_independence(
    probs_batched: np.ndarray, probs_alone: Sequence[np.ndarray]
) -> tuple[float, int]:
    """(max probability difference, label flips) between batched and one-at-a-time answers."""
    alone = np.concatenate(list(probs_alone), axis=0)
    return float(np.abs(probs_batched - alone).max()), label_flips(probs_batched, alone)
