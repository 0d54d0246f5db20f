"""Trainer: data checks, fine-tuning, search, ONNX export, evaluation and registration."""
