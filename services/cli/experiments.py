"""`loopline experiments create | list | get | update | stop`: A/B experiments on the router.

Variants are written as NAME=MODEL@ALIAS:WEIGHT or NAME=MODEL/VERSION:WEIGHT (an optional
`models:/` prefix is accepted, as in `loopline serve inference --model`), shadows as
NAME=MODEL@ALIAS or NAME=MODEL/VERSION with an optional :RATE. The tables print variants back in
the same syntax, so a line from `list` can be pasted into `create`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
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
    from google.protobuf.timestamp_pb2 import Timestamp

    from loopline.v1.common_pb2 import Experiment, ExperimentStatus, ModelRef, Stickiness

app = typer.Typer(
    help="A/B experiments: split a model's traffic between versions.", no_args_is_help=True
)

VARIANT_FORM = (
    "NAME=MODEL@ALIAS:WEIGHT or NAME=MODEL/VERSION:WEIGHT, "
    "e.g. control=sentiment@champion:50 or candidate=sentiment/7:50"
)
SHADOW_FORM = (
    "NAME=MODEL@ALIAS or NAME=MODEL/VERSION with an optional :RATE in (0, 1], "
    "e.g. shadow=sentiment@challenger:0.5"
)
_NAME = r"(?P<name>[A-Za-z0-9][\w.-]*)"
# A model name holds none of the separators; an alias follows MLflow's rules; versions count from 1.
_REF = r"(?:models:/)?(?P<model>[^\s=@/:]+)(?:@(?P<alias>[A-Za-z_][\w-]*)|/(?P<version>[1-9]\d*))"
_VARIANT = re.compile(rf"{_NAME}={_REF}:(?P<number>[^:]*)")
_SHADOW = re.compile(rf"{_NAME}={_REF}(?::(?P<number>[^:]*))?")
_PAIR = re.compile(r"(?P<key>[^=\s]+)=(?P<value>[^=\s]+)")


class StatusName(StrEnum):
    """Experiment statuses as typed on the command line."""

    DRAFT = "draft"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


class NewStatus(StrEnum):
    """Statuses `update` may set; `stop` ends an experiment."""

    RUNNING = "running"
    PAUSED = "paused"


class Sticky(StrEnum):
    """What keeps a caller on one variant."""

    USER = "user"
    REQUEST = "request"


@dataclass(frozen=True)
class ModelSpec:
    """A model reference: a name and exactly one of version and alias."""

    name: str
    version: str = ""
    alias: str = ""

    def __str__(self) -> str:
        return f"{self.name}/{self.version}" if self.version else f"{self.name}@{self.alias}"


@dataclass(frozen=True)
class VariantSpec:
    """A served variant parsed from NAME=MODEL@ALIAS:WEIGHT or NAME=MODEL/VERSION:WEIGHT."""

    name: str
    model: ModelSpec
    weight: float


@dataclass(frozen=True)
class ShadowSpec:
    """A shadow variant parsed from NAME=MODEL@ALIAS[:RATE] or NAME=MODEL/VERSION[:RATE]."""

    name: str
    model: ModelSpec
    sample_rate: float = 1.0


def parse_variant(spec: str) -> VariantSpec:
    """Parse one `--variant`; InvalidInput shows the expected form."""
    match = _VARIANT.fullmatch(spec.strip())
    if match is None:
        raise InvalidInput(f"bad --variant {spec!r}: expected {VARIANT_FORM}", spec=spec)
    weight = _number(match["number"])
    if weight is None or weight < 0:
        raise InvalidInput(
            f"bad --variant {spec!r}: the weight must be a number >= 0; expected {VARIANT_FORM}",
            spec=spec,
        )
    return VariantSpec(match["name"], _model_spec(match), weight)


def parse_shadow(spec: str) -> ShadowSpec:
    """Parse one `--shadow`; the rate defaults to 1 (every request is mirrored)."""
    match = _SHADOW.fullmatch(spec.strip())
    if match is None:
        raise InvalidInput(f"bad --shadow {spec!r}: expected {SHADOW_FORM}", spec=spec)
    if match["number"] is None:
        return ShadowSpec(match["name"], _model_spec(match))
    rate = _number(match["number"])
    if rate is None or not 0 < rate <= 1:
        raise InvalidInput(
            f"bad --shadow {spec!r}: the rate must be in (0, 1]; expected {SHADOW_FORM}",
            spec=spec,
        )
    return ShadowSpec(match["name"], _model_spec(match), rate)


def parse_pair(option: str, spec: str, form: str) -> tuple[str, str]:
    """Parse KEY=VALUE for `option`; InvalidInput shows `form`."""
    match = _PAIR.fullmatch(spec.strip())
    if match is None:
        raise InvalidInput(f"bad {option} {spec!r}: expected {form}", spec=spec)
    return match["key"], match["value"]


def parse_weight(spec: str) -> tuple[str, float]:
    """Parse one `--weight NAME=WEIGHT`."""
    name, text = parse_pair("--weight", spec, "NAME=WEIGHT, e.g. candidate=20")
    weight = _number(text)
    if weight is None or weight < 0:
        raise InvalidInput(f"bad --weight {spec!r}: the weight must be a number >= 0", spec=spec)
    return name, weight


def parse_time(option: str, text: str) -> datetime:
    """An ISO 8601 time; one without an offset is read as UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(
            f"bad {option} {text!r}: expected an ISO 8601 time, e.g. 2025-02-01T12:00:00Z",
            value=text,
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _model_spec(match: re.Match[str]) -> ModelSpec:
    return ModelSpec(match["model"], match["version"] or "", match["alias"] or "")


def check_names(
    variants: list[VariantSpec], shadows: list[ShadowSpec], pins: dict[str, str]
) -> None:
    """Names unique across variants and shadows; pins name a served variant."""
    names = [v.name for v in variants] + [s.name for s in shadows]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InvalidInput(f"variant names must be unique; repeated: {', '.join(duplicates)}")
    served = {v.name for v in variants}
    for user, variant in pins.items():
        if variant not in served:
            raise InvalidInput(
                f"--pin {user}={variant}: no served variant {variant!r} "
                f"(variants: {', '.join(sorted(served))})"
            )


@app.command()
@reports_rpc_errors
def create(
    name: Annotated[str, typer.Argument(help="Experiment name, unique among live experiments.")],
    variant: Annotated[
        list[str],
        typer.Option(help=f"A served variant, repeat for each: {VARIANT_FORM}. First = control."),
    ],
    model: Annotated[
        str | None,
        typer.Option(
            help="Public model name whose traffic is split; default: the first variant's model."
        ),
    ] = None,
    shadow: Annotated[
        list[str] | None, typer.Option(help=f"A shadow variant, repeatable: {SHADOW_FORM}.")
    ] = None,
    salt: Annotated[str | None, typer.Option(help="Hash salt; default: the experiment id.")] = None,
    pin: Annotated[
        list[str] | None, typer.Option(help="USER=VARIANT: pin a user to a variant; repeatable.")
    ] = None,
    sticky: Annotated[
        Sticky | None, typer.Option(help="Keep callers on one variant by user, or not at all.")
    ] = None,
    start: Annotated[
        bool, typer.Option("--start", help="Create it RUNNING instead of DRAFT.")
    ] = False,
    description: Annotated[str | None, typer.Option(help="The hypothesis tested.")] = None,
    as_json: AsJson = False,
    router: RouterAddress = DEFAULT_ADDRESS,
    ca_file: CaFile = None,
    token: Token = None,
    timeout: Timeout = DEFAULT_TIMEOUT_SECONDS,
) -> None:
    """Create an experiment (admin); `--start` makes it take traffic at once."""
    from loopline.v1.router_pb2 import CreateExperimentRequest

    variants = [parse_variant(spec) for spec in variant]
    shadows = [parse_shadow(spec) for spec in shadow or []]
    pins = dict(
        parse_pair("--pin", spec, "USER=VARIANT, e.g. qa-1=candidate") for spec in pin or []
    )
    check_names(variants, shadows, pins)
    experiment = _new_experiment(name, model or variants[0].model.name, variants, shadows)
    experiment.pinned_users.update(pins)
    experiment.salt = salt or ""
    experiment.description = description or ""
    experiment.status = _status_value(StatusName.RUNNING if start else StatusName.DRAFT)
    if sticky is not None:
        experiment.sticky_by = _sticky_value(sticky)
    with RouterClient(Target(router, ca_file, token, timeout)) as client:
        created = client.call(
            client.stub.CreateExperiment, CreateExperimentRequest(experiment=experiment)
        )
    _print_experiment(created, as_json)


@app.command("list")
@reports_rpc_errors
def list_experiments(
    model: Annotated[str | None, typer.Option(help="Only experiments on this model.")] = None,
    status: Annotated[StatusName | None, typer.Option(help="Only this status.")] = None,
    as_json: AsJson = False,
    router: RouterAddress = DEFAULT_ADDRESS,
    ca_file: CaFile = None,
    token: Token = None,
    timeout: Timeout = DEFAULT_TIMEOUT_SECONDS,
) -> None:
    """Experiments, newest first, with their variants and weights."""
    from loopline.v1.router_pb2 import ListExperimentsResponse

    with RouterClient(Target(router, ca_file, token, timeout)) as client:
        experiments = _all_experiments(client, model or "", status)
    if as_json:
        print_message_json(ListExperimentsResponse(experiments=experiments))
        return
    table = Table("id", "name", "model", "status", "variants", "created")
    for exp in experiments:
        table.add_row(
            exp.id,
            exp.name,
            exp.model,
            _status_text(exp),
            "\n".join(_variant_lines(exp)),
            _time_text(exp.create_time, exp.HasField("create_time"), "%Y-%m-%d %H:%M"),
        )
    out.print(table)


@app.command()
@reports_rpc_errors
def get(
    experiment_id: Annotated[str, typer.Argument(metavar="ID", help="Experiment id.")],
    as_json: AsJson = False,
    router: RouterAddress = DEFAULT_ADDRESS,
    ca_file: CaFile = None,
    token: Token = None,
    timeout: Timeout = DEFAULT_TIMEOUT_SECONDS,
) -> None:
    """One experiment in detail: variants, shares, pins, times."""
    from loopline.v1.router_pb2 import GetExperimentRequest

    with RouterClient(Target(router, ca_file, token, timeout)) as client:
        exp = client.call(client.stub.GetExperiment, GetExperimentRequest(id=experiment_id))
    _print_experiment(exp, as_json)


@app.command()
@reports_rpc_errors
def update(
    experiment_id: Annotated[str, typer.Argument(metavar="ID", help="Experiment id.")],
    weight: Annotated[
        list[str] | None, typer.Option(help="NAME=WEIGHT: a variant's new weight; repeatable.")
    ] = None,
    status: Annotated[NewStatus | None, typer.Option(help="Start, pause or resume.")] = None,
    end_time: Annotated[
        str | None, typer.Option(help="ISO 8601 time to stop taking traffic (UTC if no offset).")
    ] = None,
    description: Annotated[str | None, typer.Option(help="New description.")] = None,
    as_json: AsJson = False,
    router: RouterAddress = DEFAULT_ADDRESS,
    ca_file: CaFile = None,
    token: Token = None,
    timeout: Timeout = DEFAULT_TIMEOUT_SECONDS,
) -> None:
    """Change weights, status, end time or description (admin); the rest stays as it is."""
    from loopline.v1.router_pb2 import UpdateExperimentRequest

    if not (weight or status or end_time or description):
        raise InvalidInput(
            "nothing to update: give --weight, --status, --end-time or --description"
        )
    request = UpdateExperimentRequest(id=experiment_id, description=description or "")
    request.weights.update(dict(parse_weight(spec) for spec in weight or []))
    if status is not None:
        request.status = _status_value(StatusName(status.value))
    if end_time is not None:
        request.end_time.FromDatetime(parse_time("--end-time", end_time))
    with RouterClient(Target(router, ca_file, token, timeout)) as client:
        exp = client.call(client.stub.UpdateExperiment, request)
    _print_experiment(exp, as_json)


@app.command()
@reports_rpc_errors
def stop(
    experiment_id: Annotated[str, typer.Argument(metavar="ID", help="Experiment id.")],
    winner: Annotated[
        str | None, typer.Option(help="Variant to promote; none: stop without promoting.")
    ] = None,
    alias: Annotated[
        str | None,
        typer.Option(help="Alias the winner's version gets.", show_default="champion"),
    ] = None,
    reason: Annotated[str | None, typer.Option(help="Why it was stopped, for the record.")] = None,
    as_json: AsJson = False,
    router: RouterAddress = DEFAULT_ADDRESS,
    ca_file: CaFile = None,
    token: Token = None,
    timeout: Timeout = DEFAULT_TIMEOUT_SECONDS,
) -> None:
    """Stop an experiment for good (admin), optionally promoting its winning variant."""
    from loopline.v1.router_pb2 import StopExperimentRequest

    if alias and not winner:
        raise InvalidInput("--alias needs --winner: only a winner is promoted")
    request = StopExperimentRequest(
        id=experiment_id, winner=winner or "", alias=alias or "", reason=reason or ""
    )
    with RouterClient(Target(router, ca_file, token, timeout)) as client:
        response = client.call(client.stub.StopExperiment, request)
    if as_json:
        print_message_json(response)
        return
    _print_experiment(response.experiment, as_json=False)
    if response.HasField("promoted"):
        promoted = response.promoted
        out.print(f"promoted {promoted.name}/{promoted.version} to @{promoted.alias or 'champion'}")


def _all_experiments(
    client: RouterClient, model: str, status: StatusName | None
) -> list[Experiment]:
    """Every page of ListExperiments."""
    from loopline.v1.common_pb2 import PageRequest
    from loopline.v1.router_pb2 import ListExperimentsRequest

    experiments: list[Experiment] = []
    token = ""
    seen: set[str] = set()
    while True:
        request = ListExperimentsRequest(page=PageRequest(page_token=token), model=model)
        if status is not None:
            request.status = _status_value(status)
        page = client.call(client.stub.ListExperiments, request)
        experiments.extend(page.experiments)
        token = page.next_page_token
        if not token or token in seen:  # a repeated token would loop for ever
            return experiments
        seen.add(token)


def _new_experiment(
    name: str, model: str, variants: list[VariantSpec], shadows: list[ShadowSpec]
) -> Experiment:
    from loopline.v1.common_pb2 import Experiment, ShadowVariant, Variant

    return Experiment(
        name=name,
        model=model,
        variants=[Variant(name=v.name, model=_ref(v.model), weight=v.weight) for v in variants],
        shadows=[
            ShadowVariant(name=s.name, model=_ref(s.model), sample_rate=s.sample_rate)
            for s in shadows
        ],
    )


def _ref(spec: ModelSpec) -> ModelRef:
    from loopline.v1.common_pb2 import ModelRef

    return ModelRef(name=spec.name, version=spec.version, alias=spec.alias)


def _status_value(status: StatusName) -> ExperimentStatus.ValueType:
    from loopline.v1.common_pb2 import ExperimentStatus

    return ExperimentStatus.Value(f"EXPERIMENT_STATUS_{status.name}")


def _sticky_value(sticky: Sticky) -> Stickiness.ValueType:
    from loopline.v1.common_pb2 import Stickiness

    return Stickiness.Value(f"STICKINESS_{sticky.name}")


def _status_text(exp: Experiment) -> str:
    from loopline.v1.common_pb2 import ExperimentStatus

    return ExperimentStatus.Name(exp.status).removeprefix("EXPERIMENT_STATUS_").lower()


def _sticky_text(exp: Experiment) -> str:
    from loopline.v1.common_pb2 import Stickiness

    text = Stickiness.Name(exp.sticky_by).removeprefix("STICKINESS_").lower()
    return "server default (user)" if text == "unspecified" else text


def _time_text(stamp: Timestamp, present: bool, fmt: str = "%Y-%m-%d %H:%M:%S UTC") -> str:
    return stamp.ToDatetime(tzinfo=UTC).strftime(fmt) if present else "-"


def _variant_lines(exp: Experiment) -> list[str]:
    """Variants in the syntax `create` takes; shadows marked as such."""
    lines = [f"{v.name}={ref_text(v.model)}:{v.weight:g}" for v in exp.variants]
    lines += [f"{s.name}={ref_text(s.model)}:{s.sample_rate or 1:g} (shadow)" for s in exp.shadows]
    return lines


def _print_experiment(exp: Experiment, as_json: bool) -> None:
    if as_json:
        print_message_json(exp)
        return
    out.print(_details_table(exp))
    out.print(_variants_table(exp))


def _details_table(exp: Experiment) -> Table:
    """Key/value rows of everything but the variants."""
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="dim")
    table.add_column(overflow="fold")
    pins = ", ".join(f"{user}={variant}" for user, variant in sorted(exp.pinned_users.items()))
    rows = [
        ("id", exp.id),
        ("name", exp.name),
        ("model", exp.model),
        ("status", _status_text(exp)),
        ("description", exp.description or "-"),
        ("sticky by", _sticky_text(exp)),
        ("salt", exp.salt or "-"),
        ("pinned users", pins or "-"),
        ("start", _time_text(exp.start_time, exp.HasField("start_time"))),
        ("end", _time_text(exp.end_time, exp.HasField("end_time"))),
        ("created", _time_text(exp.create_time, exp.HasField("create_time"))),
        ("updated", _time_text(exp.update_time, exp.HasField("update_time"))),
        ("winner", exp.winner or "-"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table


def _variants_table(exp: Experiment) -> Table:
    """Served variants with weight and share of traffic, then shadows with their sample rate."""
    table = Table("variant", "model", "weight", "share", "mode")
    total = sum(v.weight for v in exp.variants)
    for v in exp.variants:
        share = f"{100 * v.weight / total:.1f}%" if total > 0 else "-"
        table.add_row(v.name, ref_text(v.model), f"{v.weight:g}", share, "serve")
    for s in exp.shadows:
        rate = f"{100 * (s.sample_rate or 1):g}% mirrored"
        table.add_row(s.name, ref_text(s.model), "-", rate, "shadow")
    return table
