"""`loopline classify` and `loopline feedback`: the router's public API from the command line."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from loopline.errors import InvalidInput
from services.cli.common import out
from services.cli.router_client import (
    DEFAULT_ADDRESS,
    DEFAULT_TIMEOUT_SECONDS,
    AsJson,
    CaFile,
    RouterAddress,
    RouterClient,
    Target,
    Timeout,
    Token,
    print_message_json,
    ref_text,
    reports_rpc_errors,
)

if TYPE_CHECKING:
    from google.protobuf.duration_pb2 import Duration

    from loopline.v1.router_pb2 import ClassifyRequest, ClassifyResponse

BAR_WIDTH = 20


@reports_rpc_errors
def classify(
    text: Annotated[str, typer.Argument(help="Text to classify; '-' reads standard input.")],
    model: Annotated[
        str | None, typer.Option(help="Model name; default: the router's default model.")
    ] = None,
    version: Annotated[
        str | None, typer.Option(help="Model version; bypasses experiments.")
    ] = None,
    alias: Annotated[
        str | None, typer.Option(help="Model alias, e.g. challenger; bypasses experiments.")
    ] = None,
    user: Annotated[
        str | None, typer.Option(help="User id: the same user keeps the same variant.")
    ] = None,
    request_id: Annotated[
        str | None, typer.Option(help="Request id for feedback; generated when absent.")
    ] = None,
    as_json: AsJson = False,
    router: RouterAddress = DEFAULT_ADDRESS,
    ca_file: CaFile = None,
    token: Token = None,
    timeout: Timeout = DEFAULT_TIMEOUT_SECONDS,
) -> None:
    """Classify one text: label, probabilities, and which model and variant answered."""
    request = _classify_request(text, model, version, alias, user, request_id)
    with RouterClient(Target(router, ca_file, token, timeout)) as client:
        response = client.call(client.stub.Classify, request)
    if as_json:
        print_message_json(response)
    else:
        _print_classification(response)


@reports_rpc_errors
def feedback(
    request_id: Annotated[str, typer.Argument(help="Request id of the classification.")],
    label: Annotated[str, typer.Argument(help="The true label.")],
    user: Annotated[str | None, typer.Option(help="User giving the feedback.")] = None,
    source: Annotated[
        str | None, typer.Option(help="Where the label comes from: user, annotator, ...")
    ] = None,
    as_json: AsJson = False,
    router: RouterAddress = DEFAULT_ADDRESS,
    ca_file: CaFile = None,
    token: Token = None,
    timeout: Timeout = DEFAULT_TIMEOUT_SECONDS,
) -> None:
    """Report the true label of an earlier classification (live accuracy, retraining data)."""
    from loopline.v1.router_pb2 import FeedbackRequest

    request = FeedbackRequest(
        request_id=request_id, label=label, user_id=user or "", source=source or ""
    )
    with RouterClient(Target(router, ca_file, token, timeout)) as client:
        response = client.call(client.stub.Feedback, request)
    if as_json:
        print_message_json(response)
    else:
        out.print(f"feedback {response.feedback_id} recorded: {request_id} is {label!r}")


def _classify_request(
    text: str,
    model: str | None,
    version: str | None,
    alias: str | None,
    user: str | None,
    request_id: str | None,
) -> ClassifyRequest:
    """The request, refusing what the router would refuse before any call."""
    from loopline.v1.common_pb2 import ModelRef
    from loopline.v1.router_pb2 import ClassifyRequest

    if version and alias:
        raise InvalidInput("give --version or --alias, not both")
    if text == "-":
        text = sys.stdin.read()
    if not text.strip():
        raise InvalidInput("the text is empty")
    return ClassifyRequest(
        text=text,
        model=ModelRef(name=model or "", version=version or "", alias=alias or ""),
        user_id=user or "",
        request_id=request_id or "",
    )


def _print_classification(response: ClassifyResponse) -> None:
    """The label, a probability table with bars, then where the answer came from."""
    out.print(f"[bold]{response.label}[/]", highlight=False)
    scores = Table("label", "probability", "", box=None, pad_edge=False)
    for item in response.probabilities:
        bar = "█" * round(item.score * BAR_WIDTH)
        style = "bold" if item.label == response.label else None
        scores.add_row(item.label, f"{item.score:.4f}", bar, style=style)
    out.print(scores)
    out.print(_origin_table(response))


def _origin_table(response: ClassifyResponse) -> Table:
    """Key/value rows: model, experiment and variant, request id, language, truncation, timings."""
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="dim")
    table.add_column(overflow="fold")
    experiment = response.experiment_id or "-"
    if response.variant:
        experiment += f" (variant {response.variant})"
    rows = [
        ("model", ref_text(response.model)),
        ("experiment", experiment),
        ("request id", response.request_id),
        ("language", response.language or "-"),
        ("truncated", "yes" if response.truncated else "no"),
        ("timings", _timings_text(response)),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table


def _timings_text(response: ClassifyResponse) -> str:
    timings = response.timings
    stages = (
        ("total", timings.HasField("total"), timings.total),
        ("queue", timings.HasField("queue"), timings.queue),
        ("inference", timings.HasField("inference"), timings.inference),
    )
    return ", ".join(f"{name} {_ms(value)}" for name, present, value in stages if present) or "-"


def _ms(duration: Duration) -> str:
    return f"{(duration.seconds + duration.nanos / 1e9) * 1000:.1f} ms"
