"""Engines: one small synchronous interface, implementations registered by name."""
