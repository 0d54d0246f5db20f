"""Monitor: inference-record consumption, drift and live accuracy (later issue)."""
