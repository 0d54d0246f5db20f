"""Logging for every service: stdlib `logging`, readable text or one JSON object per line.

Call `configure_logging` first thing in `main.py`, before heavy imports (onnxruntime, torch,
mlflow) so that whatever they log at import time is already formatted and filtered.

Structured fields travel through `extra=`; `get_logger(name, **fields)` returns an adapter that adds
bound fields to every record (a request id, a model name) and merges them with per-call `extra=`.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping, MutableMapping
from datetime import UTC, datetime
from typing import Any

__all__ = ["BoundLogger", "JsonFormatter", "TextFormatter", "configure_logging", "get_logger"]

# Libraries that log routine chatter at INFO (or DEBUG) and would drown ours.
NOISY_LOGGERS = (
    "asyncio",
    "grpc",
    "urllib3",
    "httpx",
    "httpcore",
    "filelock",
    "alembic",
    "mlflow",
    "botocore",
    "matplotlib",
    "PIL",
    "onnxruntime",
    "optuna",
    "transformers",
    "urllib3",
)

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}

# Marks the handler we install, so a second call replaces it instead of adding another.
_HANDLER_MARK = "_loopline_handler"


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a caller attached to `record` with `extra=` (or a `BoundLogger`)."""
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRS}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, extra fields and the exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(extra_fields(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: a field we cannot serialise still shows up rather than losing the record.
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`time level logger: message key=value ...` for people reading a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (stdlib name)
        line = super().formatMessage(record)
        fields = extra_fields(record)
        if not fields:
            return line
        return line + " " + " ".join(f"{k}={v}" for k, v in fields.items())


def configure_logging(level: str = "INFO", json: bool = False) -> None:
    """Send all logs to stderr at `level`, as JSON or text; calling it again reconfigures."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json else TextFormatter())
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
    root.setLevel(level.upper())
    quiet_libraries()


def quiet_libraries() -> None:
    """Hold chatty third-party loggers at WARNING, unless the root logger asks for DEBUG."""
    debugging = logging.getLogger().level <= logging.DEBUG
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if debugging else logging.WARNING)


class BoundLogger(logging.LoggerAdapter[logging.Logger]):
    """A logger that adds bound fields to every record, merged under the call's own `extra=`."""

    def __init__(self, logger: logging.Logger, fields: Mapping[str, Any] | None = None) -> None:
        super().__init__(logger, dict(fields or {}))

    def bind(self, **fields: Any) -> BoundLogger:
        """A new logger with `fields` added to the ones already bound."""
        return BoundLogger(self.logger, {**(self.extra or {}), **fields})

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        # The stdlib adapter (before 3.13) replaces the call's extra with the bound one; merge.
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return msg, kwargs


def get_logger(name: str, **fields: Any) -> BoundLogger:
    """The logger `name`, with `fields` bound to every record it writes."""
    return BoundLogger(logging.getLogger(name), fields)
