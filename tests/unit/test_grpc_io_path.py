"""Loopline's processes set gRPC core's I/O path unless the user set one (services/__init__.py).

Each case runs in a fresh interpreter: gRPC reads the variable once, when grpc is imported.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import services

# What a service process sees: `services` is imported first, then grpc.
PROBE = "import os, services, grpc; print(repr(os.environ.get('GRPC_EXPERIMENTS')))"


def probe(value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    if value is not None:
        env["GRPC_EXPERIMENTS"] = value
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def test_a_service_process_sets_the_io_path_when_the_user_has_not() -> None:
    assert probe(None) == repr(services.GRPC_EXPERIMENTS)


@pytest.mark.parametrize("value", ["", "-event_engine_listener", "event_engine_client"])
def test_a_users_own_setting_wins_even_an_empty_one(value: str) -> None:
    assert probe(value) == repr(value)
