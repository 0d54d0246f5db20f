"""`loopline monitor stats|drift|experiment|alerts`: the monitor's views as readable tables.

Every command takes `--monitor` (LOOPLINE_MONITOR_ADDRESS, default 127.0.0.1:8003) and `--json`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from services.cli.common import console, out
from services.cli.router_client import EXIT_BY_STATUS

app = typer.Typer(help="Statistics, drift, experiment reports and alerts.", no_args_is_help=True)


Monitor = Annotated[
    str,
    typer.Option(
        "--monitor", envvar="LOOPLINE_MONITOR_ADDRESS", help="Monitor address, host:port."
    ),
]
Last = Annotated[str, typer.Option("--last", help="Trailing window: 15m, 1h, 1d.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON, for scripts.")]
DEFAULT = "127.0.0.1:8003"


def _seconds(text: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)
    except (ValueError, IndexError, KeyError):
        console.print(f"[bold red]error:[/] --last {escape(text)}: use e.g. 90s, 15m, 1h, 1d")
        raise typer.Exit(2) from None


@contextmanager
def _stub(address: str) -> Iterator[Any]:
    import grpc

    from loopline.v1 import monitor_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            yield pb_grpc.MonitorStub(channel)
        except grpc.RpcError as err:
            code = err.code().name
            hint = (
                f" (is a monitor running at {address}? --monitor)" if code == "UNAVAILABLE" else ""
            )
            details = escape(str(err.details()))
            console.print(f"[bold red]error:[/] {details}{hint}", highlight=False)
            raise typer.Exit(EXIT_BY_STATUS.get(code, 1)) from None


def _window(last: str) -> Any:
    from google.protobuf.duration_pb2 import Duration

    from loopline.v1 import common_pb2

    return common_pb2.TimeWindow(last=Duration(seconds=_seconds(last)))


def _json(message: Any) -> None:
    from google.protobuf.json_format import MessageToJson

    out.print_json(MessageToJson(message, preserving_proto_field_name=True))


def _ms(duration: Any) -> str:
    return f"{duration.ToNanoseconds() / 1e6:.1f}"


def _table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column("figure", style="bold")
    table.add_column("value")
    for key, value in rows:
        table.add_row(key, value)
    return table


@app.command()
def stats(
    model: str,
    version: Annotated[str, typer.Option(help="Only this version.")] = "",
    experiment: Annotated[str, typer.Option(help="Only this experiment's traffic.")] = "",
    variant: Annotated[str, typer.Option(help="With --experiment: one variant.")] = "",
    last: Last = "1h",
    monitor: Monitor = DEFAULT,
    as_json: AsJson = False,
) -> None:
    """Traffic, labels, confidence, tokens, latency and live accuracy of a model."""
    from loopline.v1 import common_pb2
    from loopline.v1 import monitor_pb2 as pb

    request = pb.GetStatsRequest(
        model=common_pb2.ModelRef(name=model, version=version),
        window=_window(last),
        experiment_id=experiment,
        variant=variant,
    )
    with _stub(monitor) as stub:
        answer = stub.GetStats(request, timeout=30)
    if as_json:
        _json(answer)
        return
    acc = answer.accuracy
    rows = [
        ("requests", f"{answer.requests} ({answer.request_rate:.2f}/s), errors {answer.errors}"),
        ("labels", ", ".join(f"{s.label} {s.share:.1%}" for s in answer.labels) or "-"),
        ("confidence", f"mean {answer.confidence.mean:.3f}, p05 {answer.confidence.p05:.3f}"),
        ("tokens", f"mean {answer.tokens.mean:.1f}, p95 {answer.tokens.p95:.0f}"),
        ("unknown tokens", f"{answer.tokens.unknown_share:.2%}"),
        ("truncated", str(answer.truncated)),
        ("latency ms", f"p50 {_ms(answer.latency.p50)}, p99 {_ms(answer.latency.p99)}"),
        (
            "live accuracy",
            f"{acc.accuracy:.3f} [{acc.interval.lower:.3f}, {acc.interval.upper:.3f}] "
            f"on {acc.labelled} labels"
            if acc.labelled
            else "no labels yet",
        ),
    ]
    out.print(_table(f"{model} {version or '(all versions)'}, last {last}", rows))


@app.command()
def drift(
    model: str,
    version: Annotated[str, typer.Option(help="Version (default: champion).")] = "",
    last: Last = "1h",
    monitor: Monitor = DEFAULT,
    as_json: AsJson = False,
) -> None:
    """Drift of live traffic against the version's training-time reference."""
    from loopline.v1 import common_pb2
    from loopline.v1 import monitor_pb2 as pb

    request = pb.GetDriftRequest(
        model=common_pb2.ModelRef(name=model, version=version), window=_window(last)
    )
    with _stub(monitor) as stub:
        answer = stub.GetDrift(request, timeout=60)
    if as_json:
        _json(answer)
        return
    table = Table(title=f"{answer.model.name}/{answer.model.version}: {answer.summary}")
    for column in ("feature", "statistic", "value", "threshold", "p-value", "drifted"):
        table.add_column(column)
    for f in answer.features:
        p_value = f"{f.p_value:.3g}" if f.HasField("p_value") else "-"
        mark = "[red]yes[/]" if f.drifted else "no"
        table.add_row(f.feature, f.statistic, f"{f.value:.4g}", f"{f.threshold:.4g}", p_value, mark)
    out.print(table)


@app.command()
def experiment(
    experiment_id: str,
    monitor: Monitor = DEFAULT,
    as_json: AsJson = False,
) -> None:
    """Per-variant accuracy with intervals, tests against the baseline, a recommendation."""
    from loopline.v1 import monitor_pb2 as pb

    with _stub(monitor) as stub:
        answer = stub.GetExperimentReport(
            pb.GetExperimentReportRequest(experiment_id=experiment_id), timeout=30
        )
    if as_json:
        _json(answer)
        return
    table = Table(title=f"experiment {experiment_id}")
    for column in ("variant", "model", "requests", "labelled", "accuracy", "95% interval"):
        table.add_column(column)
    for v in answer.variants:
        name = f"{v.variant} (shadow)" if v.shadow else v.variant
        interval = f"[{v.accuracy_interval.lower:.3f}, {v.accuracy_interval.upper:.3f}]"
        table.add_row(
            name,
            f"{v.model.name}/{v.model.version}",
            str(v.requests),
            str(v.labelled),
            f"{v.accuracy:.3f}",
            interval,
        )
    out.print(table)
    for c in answer.comparisons:
        out.print(
            f"{c.candidate} vs {c.baseline}: {c.difference:+.3f} "
            f"({c.test}, p={c.p_value:.3g}{', significant' if c.significant else ''})"
        )
    verdict = pb.Recommendation.Name(answer.recommendation).removeprefix("RECOMMENDATION_")
    out.print(f"[bold]{verdict.lower()}[/] {escape(answer.rationale)}")


@app.command()
def alerts(
    last: Last = "1d",
    monitor: Monitor = DEFAULT,
    as_json: AsJson = False,
) -> None:
    """Alerts raised and resolved, newest first."""
    from loopline.v1 import monitor_pb2 as pb

    with _stub(monitor) as stub:
        answer = stub.ListAlerts(pb.ListAlertsRequest(window=_window(last)), timeout=30)
    if as_json:
        _json(answer)
        return
    table = Table(title=f"alerts, last {last}")
    for column in ("time", "state", "rule", "model", "message"):
        table.add_column(column)
    for a in answer.alerts:
        state = pb.AlertState.Name(a.state).removeprefix("ALERT_STATE_").lower()
        table.add_row(
            a.time.ToDatetime().strftime("%H:%M:%S"),
            state,
            a.rule,
            f"{a.model.name}/{a.model.version}",
            escape(a.message),
        )
    out.print(table)
