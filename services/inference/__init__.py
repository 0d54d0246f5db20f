"""Inference worker: Open Inference Protocol server over model packages (next issue)."""
