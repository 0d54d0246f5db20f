"""The classifier we fine-tune: a pretrained encoder, mean pooling, and a linear head.

Mean pooling rather than the [CLS] pooler: sentence-embedding checkpoints such as all-MiniLM-L6-v2
were trained to mean-pool, their pooler is untrained, and the pooled vector is the embedding the
monitor watches for drift. The same module is what gets exported to ONNX, so serving and training
cannot disagree about pooling.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

HEAD_FILE = "classifier_head.safetensors"
LABELS_FILE = "labels.json"


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average the token vectors that the mask marks as real."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


class SentenceClassifier(nn.Module):
    """Encoder + mean pooling + dropout + linear head; returns (logits, embedding)."""

    def __init__(self, encoder: nn.Module, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = encoder
        hidden = int(getattr(encoder, "config").hidden_size)  # noqa: B009 (nn.Module is untyped here)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_labels)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @property
    def config(self) -> Any:
        return self.encoder.config

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
        embedding = mean_pool(hidden, attention_mask)
        return self.head(self.dropout(embedding)), embedding


def load_encoder(source: str, attn_implementation: str | None = None) -> nn.Module:
    """Load a pretrained encoder without any task head (hub id or local folder)."""
    from transformers import AutoModel

    kwargs: dict[str, Any] = {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return AutoModel.from_pretrained(source, **kwargs)  # type: ignore[no-any-return]
    except (ValueError, TypeError):
        # Some families do not offer every attention implementation; the default always works.
        return AutoModel.from_pretrained(source)  # type: ignore[no-any-return]


def build_classifier(source: str, num_labels: int, dropout: float = 0.1) -> SentenceClassifier:
    """A fresh classifier on top of a pretrained encoder."""
    return SentenceClassifier(load_encoder(source, "sdpa"), num_labels, dropout)


def save_checkpoint(
    model: SentenceClassifier, tokenizer: Any, labels: list[str], directory: Path
) -> None:
    """Save in Hugging Face layout (encoder and tokenizer) plus the head as safetensors: a
    self-contained folder that can seed further fine-tuning, and no pickles."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    model.encoder.save_pretrained(directory)  # type: ignore[operator]
    tokenizer.save_pretrained(directory)
    head = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
    save_file(head, str(directory / HEAD_FILE))
    (directory / LABELS_FILE).write_text(json.dumps(labels))


def load_checkpoint(
    directory: Path, attn_implementation: str | None = None
) -> tuple[SentenceClassifier, list[str]]:
    """Inverse of save_checkpoint."""
    from safetensors.torch import load_file

    labels = list(json.loads((directory / LABELS_FILE).read_text()))
    model = SentenceClassifier(load_encoder(str(directory), attn_implementation), len(labels))
    model.head.load_state_dict(load_file(str(directory / HEAD_FILE)))
    return model.eval(), labels
