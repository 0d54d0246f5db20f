"""Loopline services: one package per process (router, inference, trainer, monitor), and the CLI."""
