"""`reference.json`: the distributions live traffic is compared with, from held-out data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from loopline.package import Sketch

CONFIDENCE_BINS = 10
SKETCH_SAMPLE = 512


def histogram(
    values: Sequence[float] | np.ndarray, edges: Sequence[float] | np.ndarray
) -> dict[str, Any]:
    """Counts and shares over fixed edges (values beyond the last edge go to the last bin)."""
    data = np.clip(np.asarray(values, dtype=np.float64), edges[0], edges[-1])
    counts, _ = np.histogram(data, bins=np.asarray(edges, dtype=np.float64))
    total = max(int(counts.sum()), 1)
    return {
        "edges": [float(e) for e in edges],
        "counts": counts.astype(int).tolist(),
        "shares": (counts / total).round(6).tolist(),
    }


def token_length_edges(max_length: int) -> list[float]:
    """Length bins that keep detail for short texts and reach the truncation limit."""
    edges = sorted({0, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, max_length})
    return [float(e) for e in edges if e <= max_length] + [float(max_length) + 1]


def build_reference(
    probs: np.ndarray,
    embeddings: np.ndarray,
    token_lengths: Sequence[int],
    unknown_shares: Sequence[float],
    labels: Sequence[str],
    max_length: int,
    sketch: Sketch,
    seed: int = 0,
) -> dict[str, Any]:
    """Predicted-class shares, confidence and token-length histograms, unknown-token share, and
    the sketch (seeded random projection) of a sample of embeddings."""
    predicted = probs.argmax(axis=1)
    shares = {label: float((predicted == i).mean()) for i, label in enumerate(labels)}
    rng = np.random.default_rng(seed)
    take = min(SKETCH_SAMPLE, len(embeddings))
    sample = rng.choice(len(embeddings), size=take, replace=False)
    projected = embeddings[sample] @ sketch.matrix(embeddings.shape[1])
    return {
        "count": len(probs),
        "labels": list(labels),
        "predicted_class_shares": shares,
        "confidence": histogram(probs.max(axis=1), np.linspace(0.0, 1.0, CONFIDENCE_BINS + 1)),
        "token_length": histogram(token_lengths, token_length_edges(max_length)),
        "unknown_token_share": {
            "mean": float(np.mean(unknown_shares)),
            "texts_with_unknown": float(np.mean(np.asarray(unknown_shares) > 0)),
        },
        "embedding_sketch": {
            "seed": sketch.seed,
            "dimensions": sketch.dimensions,
            "mean": projected.mean(axis=0).round(6).tolist(),
            "std": projected.std(axis=0).round(6).tolist(),
            "sample": projected.round(5).tolist(),
        },
    }
