"""The HTML report of `loopline demo`: one self-contained page and `figures.json` beside it.

Plots are drawn on `matplotlib.figure.Figure` objects with the Agg canvas (no pyplot, so no global
state, no display, safe from any thread) and inlined as base64 PNG data URIs: the page opens
offline. Every string that comes from the figures is HTML-escaped. Each section renders what it
has, so a run that stopped half way still gets a report.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from services.demo.figures import DemoFigures, DriftPoint, RequestSample

__all__ = ["render_report"]

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; color: #222; margin: 0; background: #f4f4f4; }
main { max-width: 1100px; margin: 0 auto; padding: 1.5em 2em; background: #fff; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .6em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } .pairs th { width: 15em; } .bad { color: #c62828; font-weight: 600; }
img { max-width: 100%; display: block; margin: .6em 0; }
pre { background: #f6f6f6; padding: .6em; white-space: pre-wrap; }
"""
_SERIES = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
_PHASES = ["#dbe8f7", "#fde9d2", "#dff2dc", "#ece1f5", "#f7dede", "#dff3f5"]
_FAIL = "#d62728"
_ALERTS = {"FIRING": _FAIL, "RESOLVED": "#2e7d32"}
_VLABEL: dict[str, Any] = {
    "rotation": 90, "va": "top", "ha": "right", "fontsize": 8,
    "bbox": {"facecolor": "white", "alpha": 0.8, "lw": 0, "pad": 1},
}  # fmt: skip
_HOT: dict[str, Any] = {"s": 70, "facecolors": "none", "edgecolors": _FAIL, "lw": 1.8, "zorder": 3}


class _Raw(str):
    """A table cell that is already HTML (built here from escaped parts)."""


def render_report(figures: DemoFigures, path: Path) -> Path:
    """Write the report to `path` and `figures.json` beside it; return `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    title = _e(f"Loopline demo: {figures.model}")
    sections = [
        f"<h1>{title}</h1>",
        _section("1. Summary", _summary(figures)),
        _section("2. Steps", _steps(figures)),
        _section("3. Throughput", _throughput(figures)),
        _section("4. Latency", _latency(figures)),
        _section("5. Accuracy per variant", _experiment(figures)),
        _section("6. Drift", _drift(figures)),
        _section("7. Versions", _versions(figures)),
    ]
    page = (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_CSS}</style></head>\n<body><main>\n"
        + "\n".join(sections)
        + "\n</main></body></html>\n"
    )
    path.write_text(page, encoding="utf-8")
    (path.parent / "figures.json").write_text(figures.to_json(), encoding="utf-8")
    return path


# -- formatting --------------------------------------------------------------------------------


def _e(value: object) -> str:
    return html.escape(str(value))


def _section(title: str, body: str) -> str:
    return f"<section><h2>{_e(title)}</h2>\n{body}</section>"


def _pct(x: float) -> str:
    return f"{x * 100:.1f} %"


def _ms(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.1f}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict | list):
        return json.dumps(v, sort_keys=True)
    return str(v)


def _cell(v: object) -> str:
    return v if isinstance(v, _Raw) else _e(v)


def _table(head: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>\n"


def _pairs(rows: Iterable[tuple[str, object]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_cell(v)}</td></tr>" for k, v in rows)
    return f'<table class="pairs"><tbody>{body}</tbody></table>\n'


def _percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


# -- plotting ----------------------------------------------------------------------------------


def _img(fig: Figure, alt: str) -> str:
    FigureCanvasAgg(fig)  # the Agg canvas, attached explicitly: no backend switch, no pyplot
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">\n'


def _time_range(f: DemoFigures) -> tuple[float, float]:
    """One x range for every time plot, so markers and alerts line up between them."""
    times = [r.t for r in f.requests] + [m.t for m in f.markers]
    times += [d.t for d in f.drift] + [a.t for a in f.alerts]
    start = min([0.0, *times])
    return start, max([start + 1.0, f.seconds, *times])


def _time_axes(f: DemoFigures, ylabel: str, *, phases: bool = True) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(11, 3.4))
    ax = fig.add_subplot()
    if phases:
        _shade_phases(ax, f.requests)
        _vlines(ax, [(m.t, m.label, "#444") for m in f.markers], "--")
    ax.set_xlim(*_time_range(f))
    ax.set_xlabel("seconds since start")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _shade_phases(ax: Axes, requests: Sequence[RequestSample]) -> None:
    """Shade each run of consecutive samples in one phase, up to where the next phase starts."""
    spans: list[tuple[str, float, float]] = []
    for r in sorted(requests, key=lambda r: r.t):
        if spans and spans[-1][0] == r.phase:
            spans[-1] = (r.phase, spans[-1][1], r.t)
        else:
            spans.append((r.phase, r.t, r.t))
    colours: dict[str, str] = {}
    for i, (phase, start, end) in enumerate(spans):
        stop = spans[i + 1][1] if i + 1 < len(spans) else end
        label = None if phase in colours else f"phase: {phase}"
        colour = colours.setdefault(phase, _PHASES[len(colours) % len(_PHASES)])
        ax.axvspan(start, max(stop, start + 0.5), color=colour, lw=0, label=label)


def _vlines(ax: Axes, lines: Iterable[tuple[float, str, str]], style: str) -> None:
    for t, label, colour in lines:
        ax.axvline(t, color=colour, linestyle=style, linewidth=1.2)
        ax.text(t, 0.98, f"{label} ", transform=ax.get_xaxis_transform(), color=colour, **_VLABEL)


def _legend(ax: Axes) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


# -- sections ----------------------------------------------------------------------------------


def _summary(f: DemoFigures) -> str:
    total, failed = len(f.requests), f.failed
    share = f" ({_pct(failed / total)})" if total else ""
    failed_cell = _Raw(f'<span class="{"bad" if failed else ""}">{failed}{share}</span>')
    swaps = f"{f.failed_during_swaps} of {f.requests_during_swaps} requests"
    return _pairs(
        [
            ("Model", f.model),
            ("Base model", f.base_model or "-"),
            ("Profile", f.profile),
            ("Started", f.started_at),
            ("Finished", f.finished_at or "not finished"),
            ("Duration", _duration(f.seconds) if f.seconds else "-"),
            ("Requests", total),
            ("Failed requests", failed_cell),
            ("Failed during promote/rollback swaps", swaps),
            ("Experiment recommendation", f.recommendation or "-"),
            *([("Stopped by", _Raw(f'<span class="bad">{_e(f.error)}</span>'))] if f.error else []),
        ]
    )


def _steps(f: DemoFigures) -> str:
    if not f.steps:
        return "<p>No steps were recorded.</p>"
    rows = [(s.number, s.title, f"{s.seconds:.1f}", s.outcome) for s in f.steps]
    return _table(["#", "Step", "Seconds", "Outcome"], rows)


def _throughput(f: DemoFigures) -> str:
    if not f.requests:
        return "<p>No requests were recorded.</p>"
    start, end = _time_range(f)
    edges = np.arange(math.floor(start), math.ceil(end) + 1.0, 1.0)
    ok, _ = np.histogram([r.t for r in f.requests if r.ok], bins=edges)
    fig, ax = _time_axes(f, "requests / s")
    ax.step(edges[:-1], ok, where="post", color=_SERIES[0], lw=1.5, label="successful / s")
    if f.failed:
        bad, _ = np.histogram([r.t for r in f.requests if not r.ok], bins=edges)
        ax.bar(edges[:-1], bad, width=1.0, align="edge", color=_FAIL, label="failed / s")
    ax.set_ylim(bottom=0)
    _legend(ax)
    return _img(fig, "successful and failed requests per second")


def _latency(f: DemoFigures) -> str:
    ok = [r for r in f.requests if r.ok]
    if not ok:
        return "<p>No successful requests, so no latency figures.</p>"
    bins: dict[int, list[float]] = {}
    for r in ok:
        bins.setdefault(math.floor(r.t / 5.0), []).append(r.latency_ms)
    keys = sorted(bins)
    fig, ax = _time_axes(f, "latency (ms)")
    for q, marker, colour in ((50, "o", _SERIES[0]), (99, "s", _SERIES[1])):
        ys = [float(np.percentile(bins[k], q)) for k in keys]
        xs = [(k + 0.5) * 5.0 for k in keys]
        ax.plot(xs, ys, marker=marker, ms=4, color=colour, label=f"p{q} per 5 s")
    ax.set_ylim(bottom=0)
    _legend(ax)
    phases: dict[str, list[RequestSample]] = {}
    for r in f.requests:
        phases.setdefault(r.phase, []).append(r)
    rows = []
    for phase, samples in phases.items():
        latencies = [r.latency_ms for r in samples if r.ok]
        figures = [_ms(_percentile(latencies, q)) for q in (50, 95, 99)]
        rows.append((phase, len(samples), sum(not r.ok for r in samples), *figures))
    table = _table(["Phase", "Requests", "Failed", "p50 ms", "p95 ms", "p99 ms"], rows)
    note = "<p>Latency of successful requests only.</p>"
    return _img(fig, "latency p50 and p99 over time") + table + note


def _experiment(f: DemoFigures) -> str:
    if not f.variants:
        return "<p>No experiment figures were recorded.</p>"
    fig = Figure(figsize=(max(5.0, 1.6 * len(f.variants) + 2), 3.6))
    ax = fig.add_subplot()
    for i, v in enumerate(f.variants):
        colour = "#888888" if v.shadow else _SERIES[i % len(_SERIES)]
        y = v.accuracy * 100
        err = [[max(y - v.ci_low * 100, 0.0)], [max(v.ci_high * 100 - y, 0.0)]]
        face = "white" if v.shadow else colour
        ax.errorbar([i], [y], yerr=err, fmt="o", ms=8, capsize=6, mew=2, color=colour, mfc=face)
        ax.annotate(_pct(v.accuracy), (i, y), xytext=(10, -3), textcoords="offset points")
    labels = [f"{v.variant}\n{v.version}" + ("\n(shadow)" if v.shadow else "") for v in f.variants]
    ax.set_xticks(range(len(f.variants)), labels, fontsize=8)
    ax.set_xlim(-0.6, len(f.variants) - 0.4)
    ax.set_ylabel("accuracy (%) with interval")
    ax.grid(axis="y", alpha=0.3)
    head = ["Variant", "Version", "Shadow", "Requests", "Labelled"]
    head += ["Accuracy [interval]", "p50 ms", "p99 ms"]
    rows = [
        (
            v.variant,
            v.version,
            "yes" if v.shadow else "no",
            v.requests,
            v.labelled,
            f"{_pct(v.accuracy)} [{_pct(v.ci_low)}, {_pct(v.ci_high)}]",
            _ms(v.p50_ms),
            _ms(v.p99_ms),
        )
        for v in f.variants
    ]
    p = f.p_value
    stats = _pairs(
        [
            ("p-value", "-" if p is None else "< 0.001" if p < 0.001 else f"{p:.3f}"),
            ("Difference", "-" if f.difference is None else f"{f.difference * 100:+.1f} pp"),
            ("Recommendation", f.recommendation or "-"),
            ("Rationale", f.rationale or "-"),
        ]
    )
    return _img(fig, "accuracy per variant") + _table(head, rows) + stats


def _drift(f: DemoFigures) -> str:
    parts = []
    points = sorted(f.drift, key=lambda d: d.t)
    if not any(d.scores for d in points):
        parts.append("<p>No drift data was recorded.</p>")
    else:
        parts.append(_drift_plot(f, points))
        first = next((d for d in points if d.drifted), None)
        when = f"first flagged at {first.t:.1f} s, version {first.version}" if first else "never"
        parts.append(f"<p>{len(points)} readings; drift flagged: {_e(when)}.</p>\n")
    if f.alerts:
        alerts_by_time = sorted(f.alerts, key=lambda a: a.t)
        rows = [(f"{a.t:.1f}", a.kind, a.state, a.message) for a in alerts_by_time]
        parts.append(_table(["Time (s)", "Kind", "State", "Message"], rows))
    else:
        parts.append("<p>No alerts fired.</p>")
    return "".join(parts)


def _drift_plot(f: DemoFigures, points: Sequence[DriftPoint]) -> str:
    fig, ax = _time_axes(f, "drift statistic", phases=False)
    ts = [d.t for d in points]
    for i, name in enumerate(dict.fromkeys(k for d in points for k in d.scores)):
        colour = _SERIES[i % len(_SERIES)]
        ax.plot(ts, [d.scores.get(name, math.nan) for d in points], marker="o", ms=3,
                color=colour, label=name)  # fmt: skip
        limits = [d.thresholds.get(name, math.nan) for d in points]
        if not all(math.isnan(x) for x in limits):
            ax.plot(ts, limits, linestyle=":", lw=1.5, color=colour, label=f"{name} threshold")
    hot = [(d.t, y) for d in points if d.drifted for y in _over_threshold(d)]
    if hot:  # an empty scatter would still put a red ring in the legend
        ax.scatter([t for t, _ in hot], [y for _, y in hot], label="drift flagged", **_HOT)
    floor = min((x for d in points for x in d.thresholds.values() if x > 0), default=0.0)
    top = max(y for d in points for y in d.scores.values())
    if floor and top > 20 * floor:  # PSI ~1 beside MMD ~0.015: keep both readable
        ax.set_yscale("symlog", linthresh=floor / 10)
    alerts = [(a.t, f"{a.kind} {a.state}", _ALERTS.get(a.state, "#555")) for a in f.alerts]
    _vlines(ax, alerts, "-.")
    _legend(ax)
    return _img(fig, "drift scores over time")


def _over_threshold(d: DriftPoint) -> list[float]:
    """The scores to ring on a drifted reading: those at or over their threshold (the monitor's
    statistics all drift at `value >= threshold`), or every score when none is."""
    over = [y for k, y in d.scores.items() if y >= d.thresholds.get(k, -math.inf)]
    return over or list(d.scores.values())


def _versions(f: DemoFigures) -> str:
    rows = [
        (name, _Raw("<br>".join(f"<b>{_e(k)}</b>: {_e(_value(v))}" for k, v in info.items())))
        for name, info in f.versions.items()
    ]
    body = _table(["Version", "Tags and figures"], rows) if rows else "<p>No versions recorded.</p>"
    if f.gate:
        return body + f"<h3>Gate decision</h3>\n<pre>{_e(f.gate)}</pre>"
    return body + "<p>No gate decision was recorded.</p>"
