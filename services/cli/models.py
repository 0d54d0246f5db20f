"""`loopline models list | promote | rollback`: the registry from the command line."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from services.cli.common import mlflow_uri as resolve_mlflow_uri
from services.cli.common import out, reports_errors

if TYPE_CHECKING:
    from loopline.registry import Registry

app = typer.Typer(help="Registered models, versions and aliases (MLflow).", no_args_is_help=True)

MlflowUri = Annotated[
    str | None,
    typer.Option(
        "--mlflow-uri", envvar="LOOPLINE_MLFLOW_URI", help="MLflow tracking/registry URI."
    ),
]


def _registry(uri: str | None) -> Registry:
    from loopline.registry import Registry

    return Registry(resolve_mlflow_uri(uri))


@app.command("list")
@reports_errors
def list_models(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON, for scripts.")] = False,
    name: Annotated[str | None, typer.Argument(help="Only this model.")] = None,
    mlflow_uri: MlflowUri = None,
) -> None:
    """Every registered version with its aliases, accuracy and data fingerprint."""
    versions = _registry(mlflow_uri).versions(name)
    if as_json:
        out.print_json(json.dumps([dataclasses.asdict(v) for v in versions]))
        return
    table = Table("model", "version", "aliases", "accuracy", "base model", "data", "created")
    for v in versions:
        created = datetime.fromtimestamp(v.created_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")
        table.add_row(
            v.name,
            v.version,
            ", ".join(v.aliases),
            v.tags.get("loopline.accuracy", ""),
            v.tags.get("loopline.base_model", ""),
            v.tags.get("loopline.data_fingerprint", "")[:12],
            created,
        )
    out.print(table)


@app.command()
@reports_errors
def promote(
    name: str,
    version: str,
    alias: Annotated[str, typer.Option(help="Alias to move.")] = "champion",
    mlflow_uri: MlflowUri = None,
) -> None:
    """Point an alias (champion by default) at a version; workers pick it up."""
    registry = _registry(mlflow_uri)
    before = registry.set_alias(name, alias, version)
    was = f" (was {before})" if before else ""
    out.print(f"{name}@{alias} -> version {version}{was}")


@app.command()
@reports_errors
def rollback(name: str, mlflow_uri: MlflowUri = None) -> None:
    """Point champion back at the version it held before the last promotion."""
    registry = _registry(mlflow_uri)
    current, previous = registry.rollback(name)
    out.print(f"{name}@champion -> version {previous} (was {current})")
