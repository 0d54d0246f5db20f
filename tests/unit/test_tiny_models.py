"""The tiny-model factory and the throwaway MLflow store behave as the other tests rely on."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModel, AutoTokenizer

from tests.fixtures.mlflow_store import MlflowStore
from tests.fixtures.tiny_models import FAMILIES, HIDDEN, build_tiny_model

SENTENCES = [
    "What a great little phone!",
    "The battery died after two days and support never replied.",
]


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to reach the Hugging Face hub fails instead of hanging."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.mark.usefixtures("offline")
def test_forward_pass_on_a_padded_batch(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModel.from_pretrained(tiny_model_dir).eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    assert lengths[0] < lengths[1]
    assert tuple(hidden.shape) == (2, batch["input_ids"].shape[1], HIDDEN)
    assert torch.isfinite(hidden).all()


@pytest.mark.usefixtures("offline")
def test_rust_tokenizer_matches_transformers(tiny_model_dir: Path) -> None:
    rust = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for text in [*SENTENCES, "Order #12 cost 19.99 EUR - unbelievable!"]:
        assert rust.encode(text).ids == tokenizer(text)["input_ids"]


@pytest.mark.usefixtures("offline")
def test_config_vocab_matches_tokenizer(tiny_model_dir: Path) -> None:
    config = json.loads((tiny_model_dir / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert config["vocab_size"] == len(tokenizer)
    assert config["pad_token_id"] == tokenizer.pad_token_id
    assert (tiny_model_dir / "model.safetensors").is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_gives_identical_weights(family: str, tmp_path: Path) -> None:
    first = load_file(build_tiny_model(family, tmp_path / "a", seed=7) / "model.safetensors")
    second = load_file(build_tiny_model(family, tmp_path / "b", seed=7) / "model.safetensors")
    other = load_file(build_tiny_model(family, tmp_path / "c", seed=8) / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


def test_build_does_not_touch_the_global_rng(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model("bert", tmp_path, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_custom_corpus_shapes_the_vocabulary(tmp_path: Path) -> None:
    corpus = ["zebra quokka zebra quokka"] * 20
    folder = build_tiny_model("bert", tmp_path, corpus=corpus)
    vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab()
    assert {"zebra", "quokka"} <= vocab.keys()


def test_unknown_family_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown family"):
        build_tiny_model("gpt2", tmp_path)


def test_mlflow_store_keeps_artifacts_out_of_cwd(
    mlflow_store: MlflowStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    note = tmp_path / "note.txt"
    note.write_text("hello")
    with mlflow.start_run(experiment_id=mlflow_store.experiment("unit")) as run:
        mlflow.log_param("lr", 0.01)
        mlflow.log_artifact(str(note))
    assert mlflow_store.client().get_run(run.info.run_id).data.params == {"lr": "0.01"}
    assert [p.read_text() for p in mlflow_store.artifact_root.rglob("note.txt")] == ["hello"]
    assert list(cwd.iterdir()) == []


def test_mlflow_default_experiment_also_stays_in_tmp(
    mlflow_store: MlflowStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with mlflow.start_run():
        mlflow.log_text("x", "x.txt")
    assert len(list(mlflow_store.artifact_root.rglob("x.txt"))) == 1
    assert not (tmp_path / "mlruns").exists()


def test_mlflow_store_is_the_active_one(mlflow_store: MlflowStore) -> None:
    assert mlflow.get_tracking_uri() == mlflow_store.tracking_uri
    assert mlflow.get_registry_uri() == mlflow_store.registry_uri
    assert os.environ["MLFLOW_TRACKING_URI"] == mlflow_store.tracking_uri
    assert mlflow_store.experiment("same") == mlflow_store.experiment("same")
