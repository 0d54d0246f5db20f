"""`loopline serve <service>`: run one service in the foreground (SIGTERM drains it)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from services.cli.common import reports_errors

app = typer.Typer(help="Run one Loopline service in the foreground.", no_args_is_help=True)


def _overrides(**values: Any) -> dict[str, Any]:
    """Only what was given on the command line; the rest comes from LOOPLINE_* variables."""
    return {k: v for k, v in values.items() if v is not None and v != []}


@app.command()
@reports_errors
def inference(
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            help="models:/NAME@ALIAS, models:/NAME/VERSION or a package folder; repeat "
            "for several. [env: LOOPLINE_INFERENCE_MODELS as a JSON list]",
        ),
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="gRPC port (OIP). [env: LOOPLINE_INFERENCE_PORT]")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus port; 0 = off.")] = None,
    max_batch_size: Annotated[int | None, typer.Option(help="Texts per batch.")] = None,
    max_queue_delay_ms: Annotated[float | None, typer.Option(help="Batching delay.")] = None,
    cpu_variant: Annotated[str | None, typer.Option(help="int8 or fp32 on CPU.")] = None,
) -> None:
    """An inference worker: the Open Inference Protocol over model packages."""
    from services.inference.main import main

    main(
        **_overrides(
            models=model,
            port=port,
            host=host,
            metrics_port=metrics_port,
            max_batch_size=max_batch_size,
            max_queue_delay_ms=max_queue_delay_ms,
            cpu_variant=cpu_variant,
        )
    )


@app.command()
@reports_errors
def router(
    port: Annotated[
        int | None, typer.Option(help="Public gRPC port. [env: LOOPLINE_ROUTER_PORT]")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus port; 0 = off.")] = None,
    worker: Annotated[
        list[str] | None,
        typer.Option(
            "--worker",
            help="host:port of an Open Inference Protocol server (ours, Triton, MLServer); "
            "repeat for several. [env: LOOPLINE_ROUTER_WORKERS as a JSON list]",
        ),
    ] = None,
    default_model: Annotated[
        str | None, typer.Option(help="Model for requests that name none.")
    ] = None,
) -> None:
    """The router: the public loopline.v1.Router API, experiments and forwarding to workers."""
    from services.router.main import main

    main(
        **_overrides(
            port=port,
            host=host,
            metrics_port=metrics_port,
            workers=worker,
            default_model=default_model,
        )
    )


@app.command()
@reports_errors
def trainer(
    port: Annotated[
        int | None, typer.Option(help="gRPC port. [env: LOOPLINE_TRAINER_PORT]")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus port; 0 = off.")] = None,
    slots: Annotated[int | None, typer.Option(help="Jobs run at once (one per device).")] = None,
) -> None:
    """The trainer service: training jobs over gRPC, one child process per job."""
    from services.trainer.main import main

    main(**_overrides(port=port, host=host, metrics_port=metrics_port, slots=slots))


@app.command()
@reports_errors
def monitor(
    port: Annotated[
        int | None, typer.Option(help="gRPC port. [env: LOOPLINE_MONITOR_PORT]")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus port; 0 = off.")] = None,
    trainer: Annotated[
        str | None, typer.Option(help="Trainer host:port for retraining triggers.")
    ] = None,
) -> None:
    """The monitor: consumes records and feedback, statistics, drift, alerts, triggers."""
    from services.monitor.main import main

    main(**_overrides(port=port, host=host, metrics_port=metrics_port, trainer_address=trainer))
