"""The model package: everything a worker needs to serve one model version, and no pickles.

A package is a folder (and the artifact set of one MLflow model version):

- ``model.onnx``       fp32, graph-optimised, inputs ``input_ids`` / ``attention_mask`` with
                       dynamic batch and sequence axes, outputs ``logits`` and ``embedding``
- ``model.int8.onnx``  optional, CPU; ``model.fp16.onnx`` optional, GPU
- ``tokenizer.json``   a ``tokenizers`` fast tokenizer, truncation and padding switched off
- ``loopline.json``    the manifest below
- ``reference.json``   the distributions the monitor compares live traffic with

This module has no heavy imports: the router, the monitor and the worker all read manifests.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from loopline.errors import FailedPrecondition

FORMAT_VERSION = 1
MANIFEST_FILE = "loopline.json"
TOKENIZER_FILE = "tokenizer.json"
REFERENCE_FILE = "reference.json"
VARIANT_FILES: dict[str, str] = {
    "fp32": "model.onnx",
    "int8": "model.int8.onnx",
    "fp16": "model.fp16.onnx",
}
LOGITS_OUTPUT = "logits"
EMBEDDING_OUTPUT = "embedding"

Variant = Literal["fp32", "int8", "fp16"]


class PackageError(FailedPrecondition):
    """A folder is not a usable model package; the message names the file and the fix."""

    def __init__(self, message: str, *, path: Path | str) -> None:
        super().__init__(f"model package {path}: {message}", path=str(path))


# The export's limits unless a request or job spec sets them (`loopline train`, `gate` in a
# job spec, the exporter's own options): largest |ONNX fp32 - PyTorch| logit difference, and
# the int8 graph's largest accuracy loss against fp32, in points.
MAX_EXPORT_ERROR = 1e-3
INT8_MAX_DROP_POINTS = 0.5


class Parity(BaseModel):
    """How closely the exported graphs follow the PyTorch model, measured at export."""

    fp32_max_abs_logit_diff: float = Field(description="max |ONNX fp32 - PyTorch| over logits")
    fp32_label_agreement: float = Field(description="share of texts with the same label")
    fp32_accuracy: float | None = Field(None, description="ONNX fp32 accuracy on validation")
    int8_accuracy: float | None = Field(None, description="ONNX int8 accuracy on validation")
    int8_accuracy_drop_points: float | None = Field(None, description="fp32 - int8, in points")
    int8_max_batch_prob_diff: float | None = Field(
        None, description="largest probability change of a text batched vs alone (int8)"
    )
    int8_batch_label_flips: int | None = Field(
        None, description="labels that change between batched and one-at-a-time (int8)"
    )
    fp16_max_abs_logit_diff: float | None = Field(None, description="max |fp16 - fp32| logits")
    fp16_label_agreement: float | None = Field(None, description="fp16 labels equal to fp32")
    texts: int = Field(0, description="how many validation texts the figures cover")


class Sketch(BaseModel):
    """The fixed random projection that turns a pooled embedding into a small drift sketch."""

    seed: int = 1234
    dimensions: int = 16

    def matrix(self, embedding_dim: int) -> np.ndarray:
        """Gaussian projection, scaled so a sketch keeps the embedding's norm on average.

        NumPy documents PCG64 streams as stable across releases, so every process (trainer,
        worker, monitor) rebuilds exactly the same matrix from the seed.
        """
        rng = np.random.Generator(np.random.PCG64(self.seed))
        scale = 1.0 / np.sqrt(self.dimensions)
        return np.asarray(rng.standard_normal((embedding_dim, self.dimensions)) * scale, np.float32)


class Manifest(BaseModel):
    """`loopline.json`: what a worker must know to serve the package and a person to trust it."""

    format_version: int = FORMAT_VERSION
    name: str
    version: str = Field("unregistered", description="the registry's version once registered")
    labels: list[str] = Field(min_length=2, description="class names in output order")
    max_length: int = Field(gt=0, description="tokens per text; longer texts are truncated")
    input_names: list[str] = ["input_ids", "attention_mask"]
    output_names: list[str] = [LOGITS_OUTPUT, EMBEDDING_OUTPUT]
    pad_token_id: int = 0
    unk_token_id: int | None = None
    embedding_dim: int = Field(gt=0)
    architecture: str = Field(description="the encoder's model_type, e.g. bert")
    base_model: str
    languages: list[str] = ["en"]
    variants: dict[str, str] = Field(description="variant -> file, e.g. {'fp32': 'model.onnx'}")
    default_cpu_variant: Variant = "fp32"
    data_fingerprint: str = ""
    metrics: dict[str, float] = {}
    parity: Parity | None = None
    sketch: Sketch = Sketch()
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())
    code_revision: str = "unknown"
    optimization: str = Field("none", description="graph optimisation applied at export")


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    """Write `loopline.json` (pretty, stable key order)."""
    path = directory / MANIFEST_FILE
    path.write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return path


def read_manifest(directory: Path | str) -> Manifest:
    """Read and validate `loopline.json`, and check that every file it names is there."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise PackageError(
            f"no {MANIFEST_FILE}; export the model with `loopline train`", path=directory
        )
    try:
        manifest = Manifest.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as err:
        raise PackageError(f"invalid {MANIFEST_FILE}: {err}", path=directory) from None
    if manifest.format_version > FORMAT_VERSION:
        raise PackageError(
            f"format version {manifest.format_version} is newer than this "
            f"Loopline understands ({FORMAT_VERSION}); upgrade Loopline",
            path=directory,
        )
    for name in [TOKENIZER_FILE, *manifest.variants.values()]:
        if not (directory / name).is_file():
            raise PackageError(f"missing {name}", path=directory)
    return manifest


def read_reference(directory: Path | str) -> dict[str, object]:
    """The reference distributions saved beside the model (empty when absent)."""
    path = Path(directory) / REFERENCE_FILE
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}
