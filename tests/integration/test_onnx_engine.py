"""The ONNX engine on a real package: the trainer's exporter over a tiny random BERT (no training).

Compared with `loopline.runtime.PackageRunner`, the smallest faithful way to run a package, so the
engine and the trainer's parity checks agree on every logit.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from loopline.errors import NotReady
from loopline.package import Manifest, write_manifest
from loopline.runtime import PackageRunner, PackageTokenizer, softmax
from services.inference.engines.base import EngineKind
from services.inference.engines.onnx import OnnxEngine, OnnxOptions
from services.inference.engines.registry import create_engine
from tests.fixtures.tiny_models import DEFAULT_CORPUS

pytestmark = pytest.mark.slow

LABELS = ["negative", "positive"]
CPU = OnnxOptions(providers=("cpu",), intra_op_threads=1)
# Mixed lengths, several multiples of 8 apart once tokenized, so batching pads most of them.
TEXTS = [*DEFAULT_CORPUS, "ok", "Bad.", " ".join(DEFAULT_CORPUS[:4])]


def write_package(base_model: Path, directory: Path) -> Manifest:
    """Export fp32 + int8 graphs, the tokenizer and a manifest, as `build_package` fills them."""
    from transformers import AutoTokenizer

    from services.trainer.export import ExportOptions, save_tokenizer, write_graphs
    from services.trainer.modeling import build_classifier

    directory.mkdir(parents=True, exist_ok=True)
    model = build_classifier(str(base_model), len(LABELS)).eval()
    variants, optimization = write_graphs(model, directory, ExportOptions(int8=True))
    tokenizer = AutoTokenizer.from_pretrained(str(base_model))
    save_tokenizer(tokenizer, directory)
    manifest = Manifest(
        name="tiny-engine",
        labels=LABELS,
        max_length=64,
        pad_token_id=int(tokenizer.pad_token_id or 0),
        unk_token_id=tokenizer.unk_token_id,
        embedding_dim=int(model.config.hidden_size),
        architecture=str(model.config.model_type),
        base_model=str(base_model),
        variants=variants,
        default_cpu_variant="int8",  # block-wise int8 is batch independent; tested below
        optimization=optimization,
    )
    write_manifest(directory, manifest)
    return manifest


@pytest.fixture(scope="module")
def package(
    tiny_model_factory: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Manifest]:
    directory = tmp_path_factory.mktemp("engine-package")
    return directory, write_package(tiny_model_factory("bert"), directory)


def load(
    package: tuple[Path, Manifest], options: OnnxOptions = CPU, **manifest: object
) -> OnnxEngine:
    directory, base = package
    return OnnxEngine.load(directory, base.model_copy(update=manifest), options)


def probabilities(engine: OnnxEngine, tokenizer: PackageTokenizer, texts: list[str]) -> np.ndarray:
    batch = tokenizer.encode(texts)
    return softmax(engine.run(batch.input_ids, batch.attention_mask).logits)


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_engine_runs_each_cpu_variant(package: tuple[Path, Manifest], variant: str) -> None:
    options = OnnxOptions(providers=("cpu",), cpu_variant=variant)  # type: ignore[arg-type]
    engine = load(package, options)
    assert (engine.kind, engine.variant, engine.providers) == (
        EngineKind.ONNX,
        variant,
        ["CPUExecutionProvider"],
    )
    batch = PackageTokenizer(*package).encode(TEXTS[:5])
    out = engine.run(batch.input_ids, batch.attention_mask)
    assert out.logits.shape == (5, len(LABELS))
    assert out.embedding.shape == (5, package[1].embedding_dim)
    assert out.logits.dtype == out.embedding.dtype == np.float32
    assert np.isfinite(out.logits).all()
    assert np.isfinite(out.embedding).all()


def test_fp32_matches_the_package_runner(package: tuple[Path, Manifest]) -> None:
    engine = load(package, OnnxOptions(providers=("cpu",), cpu_variant="fp32"))
    runner = PackageRunner(package[0], "fp32")
    batch = runner.tokenizer.encode(TEXTS)
    logits, embedding = runner.run(batch)
    out = engine.run(batch.input_ids, batch.attention_mask)
    np.testing.assert_allclose(out.logits, logits, atol=1e-5)
    np.testing.assert_allclose(out.embedding, embedding, atol=1e-5)


@pytest.mark.parametrize(
    ("default", "opt_in", "expected"),
    [("int8", False, "int8"), ("fp32", False, "fp32"), ("fp32", True, "int8")],
)
def test_cpu_picks_int8_only_when_the_manifest_says_so(
    package: tuple[Path, Manifest], default: str, opt_in: bool, expected: str
) -> None:
    options = OnnxOptions(providers=("cpu",), allow_batch_dependent_int8=opt_in)
    engine = load(package, options, default_cpu_variant=default)
    assert engine.variant == expected
    assert engine.execution.reason.startswith("CPU: ")


def test_registry_builds_the_onnx_engine(package: tuple[Path, Manifest]) -> None:
    engine = create_engine(EngineKind.ONNX, package[0], package[1], CPU)
    assert isinstance(engine, OnnxEngine)
    engine.close()


def test_load_logs_the_device_selection(
    package: tuple[Path, Manifest], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="services.inference.engines.onnx"):
        load(package)
    (record,) = caplog.records
    assert record.__dict__["variant"] == "int8"
    assert record.__dict__["providers"] == ["CPUExecutionProvider"]
    assert "CPUExecutionProvider" in record.__dict__["available_providers"]
    assert record.__dict__["reason"]


def test_close_releases_the_session_and_later_runs_fail_clearly(
    package: tuple[Path, Manifest],
) -> None:
    engine = load(package)
    batch = PackageTokenizer(*package).encode(TEXTS[:2])
    engine.run(batch.input_ids, batch.attention_mask)
    engine.close()
    engine.close()  # idempotent: a drain and a shutdown may both close it
    with pytest.raises(NotReady, match="closed"):
        engine.run(batch.input_ids, batch.attention_mask)


# Measured on this package: both differ by about 1e-7. int8 gets more room because other CPUs take
# other MatMulNBits kernels; the bar for int8 is 0.01 and no label flips.
@pytest.mark.parametrize(("variant", "tolerance"), [("fp32", 1e-4), ("int8", 1e-3)])
def test_batched_and_alone_agree(
    package: tuple[Path, Manifest], variant: str, tolerance: float
) -> None:
    options = OnnxOptions(providers=("cpu",), cpu_variant=variant)  # type: ignore[arg-type]
    engine = load(package, options)
    tokenizer = PackageTokenizer(*package)
    batched = probabilities(engine, tokenizer, TEXTS)
    alone = np.concatenate([probabilities(engine, tokenizer, [text]) for text in TEXTS])
    assert len({len(tokenizer.encode([t]).input_ids[0]) for t in TEXTS}) > 2  # mixed padding
    np.testing.assert_allclose(batched, alone, atol=tolerance)
    assert (batched.argmax(axis=1) == alone.argmax(axis=1)).all()
