"""`loopline demo`: the closed loop end to end on one machine, with an HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from services.cli.common import console, out, reports_errors
from services.cli.up import _job_printer

DEFAULT_HOME = Path(".loopline") / "demo"


@reports_errors
def demo(
    profile: Annotated[
        str,
        typer.Option(
            help="full (all-MiniLM-L6-v2, 5-11 min on 2 cores) or quick (fewer "
            "sentences; with --base-model a tiny model, what the tests run)."
        ),
    ] = "full",
    home: Annotated[
        Path, typer.Option(help="Folder of the demo's stack, data and report.")
    ] = DEFAULT_HOME,
    base_model: Annotated[
        str, typer.Option(help="Base model id or folder; empty: all-MiniLM-L6-v2.")
    ] = "",
) -> None:
    """Train v1 and v2, A/B test them with a shadow arm, drift to Yelp text, retrain on
    feedback behind the gate, promote and roll back under traffic, and write an HTML report."""
    import grpc

    from loopline.errors import InvalidInput
    from loopline.settings import load_settings
    from services.demo.run import PROFILES, run_demo
    from services.launcher.settings import LauncherSettings
    from services.launcher.supervisor import StartupError

    if profile not in PROFILES:
        raise InvalidInput(f"--profile {profile}: choose one of {', '.join(PROFILES)}")
    chosen = PROFILES[profile]
    # Free ports everywhere: the demo runs beside a `loopline up` or anything else.
    settings = load_settings(
        LauncherSettings,
        home=home,
        redis_port=0,
        router_port=0,
        trainer_port=0,
        monitor_port=0,
        worker_ports=[0, 0],
        metrics_offset=0,
        champion_examples=chosen.v1_examples,
        champion_epochs=chosen.epochs,
        max_length=chosen.max_length,
        base_model=base_model,
        redis_url=None,
        mlflow_uri=None,
    )
    try:
        figures, report = run_demo(
            settings,
            chosen,
            say=lambda text: console.print(escape(text), highlight=False),
            on_job_event=_job_printer(),
        )
    except (StartupError, grpc.RpcError) as err:  # a service that would not start or answer
        console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False)
        raise typer.Exit(1) from None
    out.print(
        f"demo finished in {figures.seconds / 60:.1f} min: {len(figures.requests)} requests, "
        f"{figures.failed} failed; report: {report}",
        highlight=False,
    )
