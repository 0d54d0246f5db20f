"""Settings: prefixes, shared variables, overrides and error messages that name the variable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from loopline.settings import ServiceSettings, SettingsError, env_var_name, load_settings


class InferenceSettings(ServiceSettings):
    """A service narrowing the prefix, as a real one does."""

    model_config = SettingsConfigDict(env_prefix="LOOPLINE_INFERENCE_")

    max_batch_size: int = Field(default=32, gt=0, description="Largest batch.")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests start from no LOOPLINE_ variables, whatever the shell running pytest has."""
    for name in [n for n in os.environ if n.startswith("LOOPLINE_")]:
        monkeypatch.delenv(name)


def test_defaults() -> None:
    settings = load_settings(ServiceSettings)
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.metrics_port == 0
    assert settings.admin_token is None
    assert settings.mlflow_uri == f"sqlite:///{Path.home() / '.loopline' / 'mlflow.db'}"


def test_every_field_is_documented() -> None:
    for settings_cls in (ServiceSettings, InferenceSettings):
        for name, info in settings_cls.model_fields.items():
            assert info.description, f"{settings_cls.__name__}.{name} has no description"


def test_environment_is_read_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPLINE_PORT", "7001")
    monkeypatch.setenv("LOOPLINE_LOG_LEVEL", "debug")
    monkeypatch.setenv("LOOPLINE_LOG_JSON", "true")
    monkeypatch.setenv("LOOPLINE_ADMIN_TOKEN", "s3cret")
    settings = load_settings(ServiceSettings)
    assert (settings.port, settings.log_level, settings.log_json) == (7001, "DEBUG", True)
    assert settings.admin_token is not None
    assert settings.admin_token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)


def test_service_prefix_keeps_shared_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPLINE_PORT", "1111")  # another service's port: not ours
    monkeypatch.setenv("LOOPLINE_INFERENCE_PORT", "2222")
    monkeypatch.setenv("LOOPLINE_INFERENCE_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("LOOPLINE_REDIS_URL", "redis://redis:6379/1")
    monkeypatch.setenv("LOOPLINE_MLFLOW_URI", "http://mlflow:5000")
    settings = load_settings(InferenceSettings)
    assert (settings.port, settings.max_batch_size) == (2222, 8)
    assert settings.redis_url == "redis://redis:6379/1"
    assert settings.mlflow_uri == "http://mlflow:5000"


def test_overrides_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPLINE_REDIS_URL", "redis://from-env:6379/0")
    settings = load_settings(InferenceSettings, redis_url="redis://override:6379/0", port=0)
    assert settings.redis_url == "redis://override:6379/0"
    assert settings.port == 0


def test_error_names_each_bad_variable_on_its_own_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPLINE_INFERENCE_PORT", "http")
    monkeypatch.setenv("LOOPLINE_LOG_LEVEL", "LOUD")
    monkeypatch.setenv("LOOPLINE_INFERENCE_MAX_BATCH_SIZE", "0")
    with pytest.raises(SettingsError) as caught:
        load_settings(InferenceSettings)
    lines = str(caught.value).splitlines()
    assert lines[0] == "invalid settings for InferenceSettings:"
    assert sorted(caught.value.problems) == [
        "LOOPLINE_INFERENCE_MAX_BATCH_SIZE",
        "LOOPLINE_INFERENCE_PORT",
        "LOOPLINE_LOG_LEVEL",
    ]
    assert len(lines) == 4
    assert any(line.strip().startswith("LOOPLINE_INFERENCE_PORT: ") for line in lines)


def test_error_never_echoes_a_secret() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(ServiceSettings, admin_token=["not", "a", "string"])
    assert "LOOPLINE_ADMIN_TOKEN" in caught.value.problems
    assert "'not'" not in str(caught.value)


def test_env_var_name() -> None:
    assert env_var_name(InferenceSettings, "port") == "LOOPLINE_INFERENCE_PORT"
    assert env_var_name(InferenceSettings, "redis_url") == "LOOPLINE_REDIS_URL"
