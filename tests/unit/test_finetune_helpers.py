"""Batching, padding and device choice of the training loop, without training anything."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from services.trainer.finetune import collate, length_batches, select_device, select_precision
from services.trainer.presets import DEFAULT_BASE_MODEL, PRESETS, resolve_base_model


def test_length_batches_cover_every_index_once_and_group_similar_lengths() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(3, 60) for _ in range(1000)]
    batches = length_batches(lengths, 32, random.Random(1))
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(1000))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    random_spread = sum(
        max(lengths[i] for i in chunk) - min(lengths[i] for i in chunk)
        for chunk in (list(range(s, min(s + 32, 1000))) for s in range(0, 1000, 32))
    )
    assert spread < random_spread / 3


def test_length_batches_are_seeded() -> None:
    lengths = list(range(100))
    assert length_batches(lengths, 8, random.Random(3)) == length_batches(
        lengths, 8, random.Random(3)
    )
    assert length_batches(lengths, 8, random.Random(3)) != length_batches(
        lengths, 8, random.Random(4)
    )


def test_collate_pads_to_a_multiple_of_eight_with_a_mask() -> None:
    ids, mask = collate([[5, 6, 7], [8] * 10], pad_id=0)
    assert ids.shape == (2, 16)
    assert mask.sum(dim=1).tolist() == [3, 10]
    assert ids[0, 3:].eq(0).all()


def test_device_auto_falls_back_to_cpu_and_explicit_missing_device_is_an_error() -> None:
    if not torch.cuda.is_available():
        assert select_device("auto").type in {"cpu", "mps"}
        with pytest.raises(ValueError, match="'cuda' is not available"):
            select_device("cuda")
    assert select_device("cpu").type == "cpu"


def test_precision_auto_is_fp32_on_cpu_and_fp16_needs_cuda() -> None:
    cpu = torch.device("cpu")
    assert select_precision(cpu, "auto") == "fp32"
    assert select_precision(cpu, "bf16") == "bf16"
    with pytest.raises(ValueError, match="fp16 mixed precision needs a CUDA device"):
        select_precision(cpu, "fp16")


def test_default_base_model_resolves_offline_to_the_packaged_weights() -> None:
    source, name = resolve_base_model(None)
    assert name == DEFAULT_BASE_MODEL
    assert (Path(source) / "config.json").is_file()
    assert DEFAULT_BASE_MODEL in PRESETS
    assert {
        "bert-large-uncased",
        "roberta-large",
        "microsoft/deberta-v3-large",
        "xlm-roberta-base",
        "xlm-roberta-large",
        "bert-base-multilingual-cased",
    } <= set(PRESETS)


def test_other_ids_pass_through_for_users_with_a_network() -> None:
    assert resolve_base_model("roberta-large") == ("roberta-large", "roberta-large")


def test_preset_max_length_applies_only_when_unset(tmp_path: Path) -> None:
    from services.trainer.finetune import TrainConfig
    from services.trainer.pipeline import TrainRequest, with_preset

    default = TrainRequest(data=tmp_path / "d.jsonl")
    assert with_preset(default).train.max_length == PRESETS[DEFAULT_BASE_MODEL].max_length
    explicit = TrainRequest(data=tmp_path / "d.jsonl", train=TrainConfig(max_length=64))
    assert with_preset(explicit).train.max_length == 64
    unknown = TrainRequest(data=tmp_path / "d.jsonl", base_model=str(tmp_path))
    assert with_preset(unknown).train.max_length == TrainConfig().max_length
