"""`loopline up`: the whole stack on one machine, supervised, until Ctrl-C."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from services.cli.common import console, out, reports_errors


def _job_printer() -> Any:
    """Training events as one line per state change or evaluation, progress every 10 %."""
    from loopline.v1 import trainer_pb2 as pb

    shown = {"decile": -1}

    def show(event: Any) -> None:
        kind = event.WhichOneof("event")
        if kind == "state_change":
            state = pb.JobState.Name(event.state_change.state).removeprefix("JOB_STATE_").lower()
            console.print(f"  job {state} {escape(event.state_change.message)}", highlight=False)
        elif kind == "progress" and event.progress.total_steps:
            decile = 10 * event.progress.step // event.progress.total_steps
            if decile > shown["decile"]:
                shown["decile"] = decile
                console.print(
                    f"  training {10 * decile:3d} % loss {event.progress.loss:.4f}",
                    highlight=False,
                )
        elif kind == "metrics" and event.metrics.split:
            figures = " ".join(f"{k}={v:.3f}" for k, v in sorted(event.metrics.metrics.items()))
            console.print(f"  {event.metrics.split}: {figures}", highlight=False)

    return show


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@reports_errors
def up(
    home: Annotated[
        Path | None,
        typer.Option(help="Folder for data, logs and the MLflow store. [env: LOOPLINE_UP_HOME]"),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Public model name. [env: LOOPLINE_UP_MODEL]")
    ] = None,
) -> None:
    """Start Redis, the trainer, the monitor, two inference workers and the router, training a
    first champion when the registry has none. Ctrl-C stops everything."""
    from loopline.settings import load_settings
    from services.launcher.settings import LauncherSettings
    from services.launcher.stack import Stack
    from services.launcher.supervisor import StartupError

    overrides = {k: v for k, v in {"home": home, "model": model}.items() if v is not None}
    settings = load_settings(LauncherSettings, **overrides)
    stack = Stack(
        settings,
        on_event=lambda text: console.print(f"[dim]up:[/] {escape(text)}", highlight=False),
        on_job_event=_job_printer(),
    )
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        endpoints = stack.up()
    except KeyboardInterrupt:
        console.print("interrupted; everything that started was stopped")
        raise typer.Exit(130) from None
    except StartupError as err:  # a service that would not start: its log says why
        console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False)
        raise typer.Exit(1) from None
    finally:
        signal.signal(signal.SIGTERM, previous)

    env_file = stack.home / "env"
    env_file.write_text("".join(f"export {k}={v}\n" for k, v in endpoints.environment().items()))
    (stack.home / "endpoints.json").write_text(json.dumps(endpoints.as_dict(), indent=2) + "\n")
    table = Table("service", "address", "metrics", title="Loopline is up")
    rows = [("router", endpoints.router), ("trainer", endpoints.trainer)]
    rows += [(f"worker-{n}", address) for n, address in enumerate(endpoints.workers)]
    rows += [("monitor", endpoints.monitor), ("redis", endpoints.redis_url)]
    for name, address in [*rows, ("mlflow", endpoints.mlflow_uri)]:
        table.add_row(name, address, endpoints.metrics.get(name, ""))
    out.print(table)
    out.print(f"logs: {stack.home / 'logs'}", highlight=False)
    out.print(
        f"in another shell: source {env_file}, then e.g. loopline classify 'a fine film'",
        highlight=False,
    )
    out.print("Ctrl-C stops everything.")

    def stop(signum: int, frame: FrameType | None) -> None:
        stack.supervisor.request_stop()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    stack.supervisor.watch()
    console.print("stopping ...")
    codes = stack.down()
    unclean = {name: code for name, code in codes.items() if code not in (0, None)}
    if unclean:
        console.print(f"stopped; exit codes other than 0: {unclean}", highlight=False)
    else:
        console.print("stopped cleanly")
