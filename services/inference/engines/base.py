"""The engine contract every backend implements (ONNX Runtime today).

Synchronous on purpose: the batcher calls `run` from a worker thread (ONNX Runtime releases the
GIL), so an engine never needs to know about the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import numpy as np


class EngineKind(StrEnum):
    """Registered engine names (settings and logs use these values)."""

    ONNX = "onnx"


@dataclass(frozen=True)
class EngineOutput:
    """What one batch produced: logits [N, C] and pooled embeddings [N, H], float32."""

    logits: np.ndarray
    embedding: np.ndarray


class Engine(Protocol):
    """A loaded model graph that turns padded token ids into logits and embeddings."""

    kind: EngineKind
    variant: str  # the package variant it runs: fp32, int8 or fp16
    providers: list[str]  # what actually executes it, e.g. ["CPUExecutionProvider"]

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> EngineOutput:
        """Run one padded batch (int64 [N, T] each); must be safe to call from any thread."""
        ...

    def close(self) -> None:
        """Release the session and its memory."""
        ...
