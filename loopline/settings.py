"""The settings every Loopline service shares, read from `LOOPLINE_` environment variables.

A service subclasses `ServiceSettings`, adds its own fields and usually narrows the prefix:

    class InferenceSettings(ServiceSettings):
        model_config = SettingsConfigDict(env_prefix="LOOPLINE_INFERENCE_")
        max_batch_size: int = Field(default=32, description="...")

Then `LOOPLINE_INFERENCE_PORT` sets that service's port, while the settings that name shared
infrastructure (`LOOPLINE_REDIS_URL`, `LOOPLINE_MLFLOW_URI`, `LOOPLINE_ADMIN_TOKEN`,
`LOOPLINE_LOG_LEVEL`, `LOOPLINE_LOG_JSON`) keep one name for the whole stack: they carry an explicit
alias, which pydantic-settings uses as-is instead of prefixing it.

Nothing here reads the environment at import time: settings exist only once `load_settings` (or
the class) is called, in a service's `main.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "ServiceSettings",
    "SettingsError",
    "default_mlflow_uri",
    "env_var_name",
    "load_settings",
]

SHARED_PREFIX = "LOOPLINE_"


def _upper(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


# Accept `info` as well as `INFO`: people type both.
LogLevel = Annotated[
    Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], BeforeValidator(_upper)
]

S = TypeVar("S", bound=BaseSettings)


def default_mlflow_uri() -> str:
    """An embedded MLflow store: a SQLite file in `~/.loopline`, so one machine works untouched."""
    return f"sqlite:///{Path.home() / '.loopline' / 'mlflow.db'}"


def _shared(name: str) -> str:
    """The one environment variable for a setting that every service reads under the same name."""
    return SHARED_PREFIX + name.upper()


class ServiceSettings(BaseSettings):
    """Settings common to every service: where to listen, how to log, where Redis and MLflow are."""

    model_config = SettingsConfigDict(
        env_prefix=SHARED_PREFIX,
        # Keyword arguments use field names (`redis_url=`), environment variables use the aliases.
        validate_by_name=True,
        validate_by_alias=True,
        str_strip_whitespace=True,
    )

    log_level: LogLevel = Field(
        default="INFO",
        validation_alias=_shared("log_level"),
        description="Minimum level of log records: DEBUG, INFO, WARNING, ERROR or CRITICAL.",
    )
    log_json: bool = Field(
        default=False,
        validation_alias=_shared("log_json"),
        description="Write one JSON object per log record instead of readable text.",
    )
    host: str = Field(
        default="127.0.0.1",
        min_length=1,
        description="Address the gRPC server binds; 0.0.0.0 (or ::) to accept remote clients.",
    )
    port: int = Field(
        default=50051,
        ge=0,
        le=65535,
        description="gRPC port; 0 picks a free port (the bound port is logged).",
    )
    metrics_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Port of the Prometheus /metrics endpoint; 0 disables it.",
    )
    grace_period_seconds: float = Field(
        default=10.0,
        ge=0,
        description="On SIGTERM, how long in-flight calls may run before they are cancelled.",
    )
    max_message_bytes: int = Field(
        default=16 * 1024 * 1024,
        gt=0,
        description="Largest gRPC message the server accepts or sends, in bytes.",
    )
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        min_length=1,
        validation_alias=_shared("redis_url"),
        description="Redis holding experiments, the worker registry and the record streams.",
    )
    mlflow_uri: str = Field(
        default_factory=default_mlflow_uri,
        min_length=1,
        validation_alias=_shared("mlflow_uri"),
        description="MLflow tracking and registry URI; default: SQLite at ~/.loopline/mlflow.db.",
    )
    admin_token: SecretStr | None = Field(
        default=None,
        validation_alias=_shared("admin_token"),
        description="Bearer token the mutating (admin) RPCs require from callers.",
    )
    # Per service (LOOPLINE_<SERVICE>_TLS_...), not shared: each service has its own name to prove.
    tls_cert_file: Path | None = Field(
        default=None,
        description="PEM certificate chain served on the gRPC port (TLS); set with tls_key_file.",
    )
    tls_key_file: Path | None = Field(
        default=None,
        # Validated even when unset, so that a certificate without its key is caught.
        validate_default=True,
        description="PEM private key (unencrypted) of tls_cert_file; neither: plaintext gRPC.",
    )

    @field_validator("tls_cert_file", "tls_key_file")
    @classmethod
    def _readable_file(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        if not value.is_file():
            raise ValueError(f"{value} is not a file")
        try:
            with value.open("rb"):
                pass
        except OSError as err:
            raise ValueError(f"cannot read {value}: {err.strerror}") from None
        return value

    @field_validator("tls_key_file")
    @classmethod
    def _tls_pair(cls, key: Path | None, info: ValidationInfo) -> Path | None:
        if "tls_cert_file" not in info.data:
            return key  # the certificate failed its own check, which names the problem
        if (info.data["tls_cert_file"] is None) != (key is None):
            cert_var, key_var = (
                env_var_name(cls, "tls_cert_file"),
                env_var_name(cls, "tls_key_file"),
            )
            raise ValueError(f"set both {cert_var} and {key_var} for TLS, or neither")
        return key


class SettingsError(ValueError):
    """Settings failed validation; `problems` maps each environment variable to what is wrong."""

    def __init__(self, settings_cls: type[BaseSettings], problems: dict[str, str]) -> None:
        self.problems = problems
        lines = [f"invalid settings for {settings_cls.__name__}:"]
        lines += [f"  {name}: {problem}" for name, problem in problems.items()]
        super().__init__("\n".join(lines))


def env_var_name(settings_cls: type[BaseSettings], field: str) -> str:
    """The environment variable that sets `field` (a field name or its alias) of `settings_cls`."""
    for name, info in settings_cls.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, str) and field.lower() in (name, alias.lower()):
            return alias.upper()
    prefix = str(settings_cls.model_config.get("env_prefix", ""))
    return (prefix + field).upper()


def load_settings(cls: type[S], **overrides: Any) -> S:
    """Build `cls` from the environment and `overrides` (which win), or raise `SettingsError`.

    The error names every bad field by its environment variable, one per line, so a failed start
    says exactly what to fix.
    """
    try:
        return cls(**overrides)
    except ValidationError as err:
        raise SettingsError(cls, _problems(cls, err)) from None


def _problems(cls: type[BaseSettings], err: ValidationError) -> dict[str, str]:
    problems: dict[str, str] = {}
    for error in err.errors():
        name = env_var_name(cls, str(error["loc"][0]) if error["loc"] else "?")
        # Never echo a secret back into logs: a mistyped token is still mostly the token.
        secret = "TOKEN" in name or "SECRET" in name or "PASSWORD" in name
        shown = "" if secret or "input" not in error else f" (got {error['input']!r})"
        problems[name] = f"{error['msg']}{shown}"
    return problems
