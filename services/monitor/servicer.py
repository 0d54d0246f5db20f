"""The thin gRPC adapter of `loopline.v1.Monitor`: convert, call the views, convert back."""

from __future__ import annotations

import math
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from loopline import paging, prototime
from loopline.errors import InvalidInput
from loopline.v1 import common_pb2 as common
from loopline.v1 import monitor_pb2 as pb
from loopline.v1 import monitor_pb2_grpc as pb_grpc
from services.monitor import stats as st
from services.monitor.alerts import Alert, AlertBook
from services.monitor.handlers import Views
from services.monitor.retrain import Retrainer
from services.monitor.state import Totals

KINDS = {
    "drift": pb.ALERT_KIND_DRIFT,
    "accuracy_drop": pb.ALERT_KIND_ACCURACY_DROP,
    "latency": pb.ALERT_KIND_LATENCY,
    "experiment": pb.ALERT_KIND_EXPERIMENT,
    "retraining": pb.ALERT_KIND_RETRAINING,
}
SEVERITIES = {
    "info": pb.SEVERITY_INFO,
    "warning": pb.SEVERITY_WARNING,
    "critical": pb.SEVERITY_CRITICAL,
}
RECOMMENDATIONS = {
    st.Recommendation.CONTINUE: pb.RECOMMENDATION_CONTINUE,
    st.Recommendation.PROMOTE_CANDIDATE: pb.RECOMMENDATION_PROMOTE_CANDIDATE,
    st.Recommendation.KEEP_BASELINE: pb.RECOMMENDATION_KEEP_BASELINE,
    st.Recommendation.NO_DIFFERENCE: pb.RECOMMENDATION_NO_DIFFERENCE,
}
DEFAULT_WINDOW_S = 3600
ALERT_ID = re.compile(r"\d+(-\d+)?")  # a Redis stream id: milliseconds[-sequence]


def window_range(window: common.TimeWindow, now: float) -> tuple[float | None, float]:
    """[start, end) of a request's window. Nothing set: the last hour; `last`: that trailing
    window; start and/or end: that range, an unset start meaning the oldest data kept (so
    `end_time` alone asks for the since-deploy totals)."""
    if window.HasField("last"):
        if window.HasField("start_time") or window.HasField("end_time"):
            raise InvalidInput("window: give `last` or start/end times, not both", field="window")
        last = prototime.seconds(window.last, "window.last")
        if last < 0:
            raise InvalidInput(
                f"window.last is {last:g} s; it must not be negative", field="window.last"
            )
        return now - last, now
    if not (window.HasField("start_time") or window.HasField("end_time")):
        return now - DEFAULT_WINDOW_S, now
    start = prototime.optional_seconds(window, "start_time", "window.start_time")
    end = prototime.optional_seconds(window, "end_time", "window.end_time")
    return start, now if end is None else end


def _stamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _window(start: float, end: float) -> common.TimeWindow:
    return common.TimeWindow(start_time=_stamp(start), end_time=_stamp(end))


def _ms(value: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(int((0.0 if math.isnan(value) else value) * 1e6))
    return duration


def _interval(interval: st.Interval) -> pb.ConfidenceInterval:
    return pb.ConfidenceInterval(
        lower=interval.lower, upper=interval.upper, level=interval.level, method=interval.method
    )


def _latency(totals: Totals) -> pb.LatencyStats:
    if not totals.requests:
        return pb.LatencyStats()
    return pb.LatencyStats(
        p50=_ms(totals.latency_percentile(0.5)),
        p90=_ms(totals.latency_percentile(0.9)),
        p95=_ms(totals.latency_percentile(0.95)),
        p99=_ms(totals.latency_percentile(0.99)),
        mean=_ms(totals.mean_latency_ms()),
    )


def _z(value: float) -> float:
    return 0.0 if math.isnan(value) else value


def stats_pb(
    totals: Totals, start: float | None, end: float, level: float = 0.95
) -> pb.GetStatsResponse:
    if start is None:  # since the first record
        start = totals.first if totals.first is not None else end
    accuracy = st.proportion(totals.correct, totals.labelled, level)
    n = totals.requests
    return pb.GetStatsResponse(
        window=_window(start, end),
        requests=n,
        errors=totals.errors,
        labels=[
            pb.LabelShare(label=k, count=totals.label_counts.get(k, 0), share=v)
            for k, v in sorted(totals.label_shares().items())
        ],
        confidence=pb.ConfidenceStats(
            mean=_z(totals.mean_confidence()),
            p05=_z(totals.confidence_percentile(0.05)) if n else 0.0,
            p50=_z(totals.confidence_percentile(0.5)) if n else 0.0,
            p95=_z(totals.confidence_percentile(0.95)) if n else 0.0,
            low_threshold=0.6,
            low_share=_z(totals.confidence_share_below(0.6)) if n else 0.0,
        ),
        latency=_latency(totals),
        accuracy=pb.LiveAccuracy(
            labelled=totals.labelled,
            correct=totals.correct,
            accuracy=accuracy.value,
            interval=_interval(accuracy.interval),
            coverage=_z(totals.coverage()),
        ),
        truncated=totals.truncated,
        tokens=pb.TokenStats(
            mean=_z(totals.mean_tokens()),
            p50=_z(totals.token_percentile(0.5)) if n else 0.0,
            p95=_z(totals.token_percentile(0.95)) if n else 0.0,
            unknown_share=_z(totals.mean_unknown_share()),
        ),
        request_rate=n / max(end - start, 1e-9),
    )


def alert_pb(alert: Alert) -> pb.Alert:
    message = pb.Alert(
        id=alert.id,
        kind=KINDS.get(alert.kind, pb.ALERT_KIND_UNSPECIFIED),
        severity=SEVERITIES.get(alert.severity, pb.SEVERITY_UNSPECIFIED),
        model=common.ModelRef(name=alert.model, version=alert.version),
        message=alert.message,
        time=_stamp(alert.time),
        fields=alert.fields,
        state=pb.ALERT_STATE_RESOLVED if alert.state == "resolved" else pb.ALERT_STATE_FIRING,
        rule=alert.rule,
    )
    if alert.resolve_time is not None:
        message.resolve_time.CopyFrom(_stamp(alert.resolve_time))
    return message


def _matches(alert: Alert, f: pb.AlertFilter) -> bool:
    if f.model.name and alert.model != f.model.name:
        return False
    if f.model.version and alert.version != f.model.version:
        return False
    if f.min_severity and SEVERITIES.get(alert.severity, 0) < f.min_severity:
        return False
    return not f.kinds or KINDS.get(alert.kind, 0) in f.kinds


class MonitorServicer(pb_grpc.MonitorServicer):
    """`loopline.v1.Monitor` over the views, the alert book and the retrainer."""

    def __init__(self, views: Views, book: AlertBook, retrainer: Retrainer) -> None:
        self.views = views
        self.book = book
        self.retrainer = retrainer

    async def GetStats(self, request: pb.GetStatsRequest, context: Any) -> pb.GetStatsResponse:
        start, end = window_range(request.window, time.time())
        totals = await self.views.stats(
            request.model.name.strip(),
            request.model.version.strip() or None,
            start,
            end,
            request.experiment_id.strip(),
            request.variant.strip(),
        )
        response = stats_pb(totals, start, end)
        response.model.CopyFrom(request.model)
        return response

    async def GetDrift(self, request: pb.GetDriftRequest, context: Any) -> pb.GetDriftResponse:
        start, end = window_range(request.window, time.time())
        model = request.model.name.strip()
        if not model:
            raise InvalidInput("a model name is required", field="model.name")
        version, result, path = await self.views.drift(
            model, request.model.version.strip(), start, end, list(request.features)
        )
        summary = result.summary + (f" (report: {path})" if path else "")
        return pb.GetDriftResponse(
            model=common.ModelRef(name=model, version=version),
            window=_window(end - DEFAULT_WINDOW_S if start is None else start, end),
            samples=result.samples,
            reference_samples=result.reference_samples,
            features=[
                pb.FeatureDrift(
                    feature=f.feature,
                    statistic=f.statistic,
                    value=f.value,
                    threshold=f.threshold,
                    drifted=f.drifted,
                    p_value=f.p_value,
                )
                for f in result.features
            ],
            drifted=result.drifted,
            summary=summary,
        )

    async def GetExperimentReport(
        self, request: pb.GetExperimentReportRequest, context: Any
    ) -> pb.GetExperimentReportResponse:
        level = request.confidence_level or 0.95
        has_window = request.HasField("window")
        start, end = window_range(request.window, time.time()) if has_window else (None, None)
        experiment = request.experiment_id.strip()
        report = await self.views.experiment_report(experiment, start, end, level)
        response = pb.GetExperimentReportResponse()
        response.experiment.id = report.experiment.id
        response.experiment.name = report.experiment.name
        response.experiment.model = report.experiment.model
        for v in report.variants:
            response.variants.append(
                pb.VariantReport(
                    variant=v.variant,
                    model=common.ModelRef(name=v.model, version=v.version),
                    shadow=v.shadow,
                    requests=v.totals.requests,
                    errors=v.totals.errors,
                    labelled=v.totals.labelled,
                    correct=v.totals.correct,
                    accuracy=v.accuracy.value,
                    accuracy_interval=_interval(v.accuracy.interval),
                    latency=_latency(v.totals),
                )
            )
        for c in report.comparisons:
            response.comparisons.append(
                pb.VariantComparison(
                    baseline=c.baseline,
                    candidate=c.candidate,
                    difference=_z(c.difference),
                    difference_interval=_interval(c.interval),
                    p_value=_z(c.p_value),
                    significant=c.significant,
                    test=c.test,
                )
            )
        if report.decision is not None:
            response.recommendation = RECOMMENDATIONS[report.decision.recommendation]
            response.recommended_variant = report.decision.variant
            response.rationale = report.decision.rationale
        if report.srm is not None and report.srm.mismatch:
            response.rationale += (
                f" Warning: sample-ratio mismatch (p={report.srm.p_value:.2g}): the shares do not "
                "match the weights; check assignment and logging before trusting the figures."
            )
        return response

    async def ListAlerts(
        self, request: pb.ListAlertsRequest, context: Any
    ) -> pb.ListAlertsResponse:
        start = end = None
        if request.HasField("window"):
            start, end = window_range(request.window, time.time())
        count = paging.page_size(request.page.page_size)
        alerts = await self.book.history(start, end, count=count)
        return pb.ListAlertsResponse(
            alerts=[alert_pb(a) for a in alerts if _matches(a, request.filter)]
        )

    async def WatchAlerts(
        self, request: pb.WatchAlertsRequest, context: Any
    ) -> AsyncIterator[pb.Alert]:
        after = request.after_id or "$"
        if after != "$" and not ALERT_ID.fullmatch(after):
            raise InvalidInput(
                f"after_id {after!r} is not an alert id (like 1732790000000-0) or '$' (new "
                "alerts only)",
                field="after_id",
            )
        async for alert in self.book.follow(after):
            if _matches(alert, request.filter):
                yield alert_pb(alert)

    async def TriggerRetraining(
        self, request: pb.TriggerRetrainingRequest, context: grpc.aio.ServicerContext
    ) -> pb.TriggerRetrainingResponse:
        from loopline.jobspec import parse_spec, spec_dict, spec_pb

        model = request.model.name.strip()
        if not model:
            raise InvalidInput("a model name is required", field="model.name")
        given = spec_dict(request.spec) if request.HasField("spec") else None
        trigger = await self.retrainer.trigger(
            model,
            request.reason or "requested",
            alert_id=request.alert_id,
            spec=given,
            dry_run=request.dry_run,
            force=request.force,
        )
        response = pb.TriggerRetrainingResponse(
            submitted=trigger.submitted, job_id=trigger.job_id, reason=trigger.why_not
        )
        if trigger.spec:
            response.spec.CopyFrom(spec_pb(parse_spec(trigger.spec)))
        return response


def service_name() -> str:
    return str(pb.DESCRIPTOR.services_by_name["Monitor"].full_name)


ADMIN_METHODS = (f"/{service_name()}/TriggerRetraining",)
