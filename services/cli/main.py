"""The `loopline` entry point. Subcommands import their service lazily so `--help` stays fast.

Every option also reads a `LOOPLINE_` environment variable (shown in `--help`).
"""

from __future__ import annotations

from typing import Annotated

import typer

from loopline.logging import configure_logging
from services.cli import classify, demo, experiments, models, monitor, serve, train, up
from services.cli.common import out

app = typer.Typer(
    name="loopline",
    help="Keep transformer text classifiers in a closed loop: serve, A/B test, monitor, "
    "fine-tune, promote.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def main(
    log_level: Annotated[
        str, typer.Option(envvar="LOOPLINE_LOG_LEVEL", help="Log level.")
    ] = "INFO",
    log_json: Annotated[bool, typer.Option(envvar="LOOPLINE_LOG_JSON", help="JSON logs.")] = False,
) -> None:
    """Configure logging before any heavy import, so libraries that call `basicConfig` on import
    (ONNX Runtime's quantizer does) cannot install a second root handler."""
    configure_logging(log_level, json=log_json)


@app.command()
def presets() -> None:
    """Base models we have settings for: max length, batch size and training memory."""
    from rich.table import Table

    from services.trainer.presets import PRESETS

    table = Table(
        "model",
        "family",
        "params (M)",
        "max length",
        "batch",
        "train memory (GB)",
        "languages",
        "note",
    )
    for p in PRESETS.values():
        table.add_row(
            p.model_id,
            p.family,
            str(p.parameters_millions),
            str(p.max_length),
            str(p.batch_size),
            f"{p.train_memory_gb:g}",
            ", ".join(p.languages),
            p.note,
        )
    out.print(table)


app.command(name="train", help=train.HELP)(train.train)
app.command(name="classify")(classify.classify)
app.command(name="feedback")(classify.feedback)
app.command(name="up")(up.up)
app.command(name="demo")(demo.demo)
app.add_typer(experiments.app, name="experiments")
app.add_typer(models.app, name="models")
app.add_typer(serve.app, name="serve")
app.add_typer(monitor.app, name="monitor")


if __name__ == "__main__":
    app()
