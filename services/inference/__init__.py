"""Inference worker: the Open Inference Protocol over model packages, with dynamic batching."""
