"""The `loopline` entry point. Subcommands import their service lazily so `--help` stays fast.

Every option also reads a `LOOPLINE_` environment variable (shown in `--help`).
"""

from __future__ import annotations

import typer

from services.cli import models, train

app = typer.Typer(
    name="loopline",
    help="Keep transformer text classifiers in a closed loop: serve, A/B test, monitor, "
    "fine-tune, promote.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.command(name="train", help=train.HELP)(train.train)
app.add_typer(models.app, name="models")


if __name__ == "__main__":
    app()
