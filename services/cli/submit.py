"""`loopline train --spec SPEC.yaml --submit [--wait]`: hand a job to the trainer service and,
with --wait, follow it to the end with a progress bar. What a cron entry or a Kubernetes CronJob
runs: the exit status is 0 only when the job succeeded.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from loopline.errors import InvalidInput
from services.cli.common import console, out
from services.cli.router_client import EXIT_BY_STATUS


def _spec_message(path: Path) -> Any:
    from loopline.jobspec import anchor_files, parse_spec, spec_pb
    from services.cli.train import load_spec_file

    data = load_spec_file(path)
    anchor_files(data, path.parent)
    return spec_pb(parse_spec(data))


def submit(
    spec_path: Path,
    trainer: str,
    token: str | None,
    idempotency_key: str | None,
    wait: bool,
    as_json: bool,
) -> None:
    """Submit, then (with `wait`) follow; exits non-zero with the reason unless it succeeded."""
    import grpc

    from loopline.v1 import trainer_pb2 as pb
    from loopline.v1 import trainer_pb2_grpc as pb_grpc

    message = _spec_message(spec_path)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(trainer) as channel:
        stub = pb_grpc.TrainerStub(channel)
        try:
            request = pb.SubmitJobRequest(spec=message, request_id=idempotency_key or "")
            job = stub.SubmitJob(request, metadata=metadata, timeout=30)
            console.print(f"job [bold]{job.id}[/] queued on {trainer}", highlight=False)
            if wait:
                job = _follow(stub.WatchJob(pb.WatchJobRequest(id=job.id), metadata=metadata))
        except grpc.RpcError as err:
            _rpc_error(err, trainer)
    _report(job, as_json)


def _rpc_error(err: Any, trainer: str) -> None:
    code = err.code().name
    hint = f" (is a trainer running at {trainer}? --trainer)" if code == "UNAVAILABLE" else ""
    console.print(f"[bold red]error:[/] {escape(str(err.details()))}{hint}", highlight=False)
    raise typer.Exit(EXIT_BY_STATUS.get(code, 1))


def _follow(events: Iterator[Any]) -> Any:
    """Print state changes and metrics, draw training progress; return the final job."""
    from loopline.v1 import trainer_pb2 as pb

    final = None
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*columns, TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("training", total=None, info="")
        for event in events:
            kind = event.WhichOneof("event")
            if kind == "state_change":
                state = pb.JobState.Name(event.state_change.state).removeprefix("JOB_STATE_")
                note = event.state_change.message
                bar.console.print(f"[cyan]{state.lower()}[/] {escape(note)}", highlight=False)
            elif kind == "progress":
                p = event.progress
                bar.update(
                    task,
                    total=p.total_steps or None,
                    completed=p.step,
                    info=f"epoch {p.epoch}/{p.epochs} loss {p.loss:.4f}",
                )
            elif kind == "metrics" and event.metrics.split:
                figures = " ".join(f"{k}={v:.4f}" for k, v in sorted(event.metrics.metrics.items()))
                bar.console.print(f"[dim]{event.metrics.split}[/] {figures}", highlight=False)
            elif kind == "job":
                final = event.job
    if final is None:
        raise InvalidInput("the trainer ended the stream without the job's final state")
    return final


def _report(job: Any, as_json: bool) -> None:
    from google.protobuf.json_format import MessageToJson

    from loopline.v1 import trainer_pb2 as pb

    state = pb.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()
    if as_json:
        out.print_json(MessageToJson(job, preserving_proto_field_name=True))
    elif job.model.version:
        alias = f" as {job.model.alias}" if job.model.alias else ""
        out.print(
            f"{state}: {job.model.name} version {job.model.version}{alias}; "
            f"{escape(job.gate_reason)}",
            highlight=False,
        )
    else:
        out.print(f"{state}: job {job.id}", highlight=False)
    if job.state not in (pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED, pb.JOB_STATE_INTERRUPTED):
        return
    reason = job.error or state
    console.print(f"[bold red]job {job.id} {state}:[/] {escape(reason)}", highlight=False)
    raise typer.Exit(1)
