"""What every subcommand shares: console, error reporting, MLflow location."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console

from loopline.errors import ErrorKind, LooplineError
from loopline.settings import SettingsError, default_mlflow_uri

# Soft wrap: long paths in messages stay on one line, which scripts and people can both grep.
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

# Exit codes by error kind: scripts can tell bad input (2) from missing things (3) and failures.
EXIT_CODES = {ErrorKind.INVALID_INPUT: 2, ErrorKind.NOT_FOUND: 3, ErrorKind.FAILED_PRECONDITION: 4}

F = TypeVar("F", bound=Callable[..., Any])


def mlflow_uri(explicit: str | None) -> str:
    """The given URI, else the embedded SQLite store (whose folder is created on first use)."""
    uri = explicit or default_mlflow_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return uri


def reports_errors(func: F) -> F:
    """Turn LooplineError into one red line and a non-zero exit code, without a traceback."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except LooplineError as err:
            console.print(f"[bold red]error:[/] {err.message}", highlight=False)
            raise typer.Exit(EXIT_CODES.get(err.kind, 1)) from None
        except SettingsError as err:
            console.print(f"[bold red]error:[/] {err}", highlight=False)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]
