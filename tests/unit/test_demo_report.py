"""The demo report: one self-contained HTML page that shows the figures of a run, escaped."""

from __future__ import annotations

import base64
import html
import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from services.demo.figures import (
    AlertEvent,
    DemoFigures,
    DriftPoint,
    Marker,
    RequestSample,
    StepResult,
    VariantFigures,
)
from services.demo.report import render_report

PNG = b"\x89PNG\r\n\x1a\n"
IMG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
FAILED_AT = {160, 161, 162}  # three failures during the swap, in the promotion phase


def sample_figures() -> DemoFigures:
    """300 requests over 60 s: "experiment" then "promotion", with known latencies."""
    requests = []
    for i in range(300):
        phase = "experiment" if i < 150 else "promotion"
        latency = 10 + (i % 5) * 2.5 if i < 150 else 40 + (i % 5) * 5.0
        ok = i not in FAILED_AT
        requests.append(
            RequestSample(
                t=i * 0.2,
                latency_ms=latency,
                ok=ok,
                phase=phase,
                version="v2" if ok else "",
                variant="a" if ok else "",
                code="OK" if ok else "UNAVAILABLE",
            )
        )
    drift = [
        DriftPoint(
            t=5.0 * k,
            version="v2",
            samples=50 * (k + 1),
            drifted=k >= 8,
            scores={"length": 0.02 * k, "confidence": 0.01 * k},
            thresholds={"length": 0.15, "confidence": 0.2},
        )
        for k in range(12)
    ]
    return DemoFigures(
        model="sentiment",
        started_at="2025-01-01T10:00:00+00:00",
        profile="quick",
        base_model="prajjwal1/bert-tiny",
        finished_at="2025-01-01T10:01:00+00:00",
        seconds=60.0,
        steps=[
            StepResult(1, "Train the champion", 12.5, "v1 registered"),
            StepResult(2, "Promote", 1.0, "<script>alert(1)</script> & done"),
        ],
        requests=requests,
        variants=[
            VariantFigures("a", "v1", False, 120, 100, 0.853, 0.82, 0.884, 11.0, 19.5),
            VariantFigures("b", "v2", False, 118, 98, 0.884, 0.85, 0.91, 12.0, 21.0),
            VariantFigures("shadow", "v3", True, 119, 97, 0.71, 0.66, 0.76, 13.0, 25.0),
        ],
        p_value=0.0123,
        difference=0.031,
        recommendation="promote b",
        rationale="b beats a at the 95 % level",
        drift=drift,
        alerts=[
            AlertEvent(41.0, "DRIFT", "FIRING", "length drifted <fast>"),
            AlertEvent(55.0, "DRIFT", "RESOLVED", "back to normal"),
        ],
        markers=[Marker(30.0, "promote v2"), Marker(50.0, "roll back")],
        versions={"v1": {"stage": "champion", "accuracy": 0.853}, "v2": {"parent": "v1"}},
        gate="accuracy 0.884 >= 0.853 - 0.01: pass",
        failed_during_swaps=3,
        requests_during_swaps=40,
    )


def text_of(page: str) -> str:
    """The page as a reader sees it: tags removed, entities decoded, whitespace collapsed."""
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page)))


def sections(page: str) -> dict[str, str]:
    found = re.findall(r"<section><h2>([^<]+)</h2>(.*?)</section>", page, re.DOTALL)
    return {title: body for title, body in found}


def red_pixels(section: str) -> int:
    """Pixels of the report's red (#d62728: failures, drift flags) in the section's one plot."""
    (data,) = IMG.findall(section)
    rgb = imread(io.BytesIO(base64.b64decode(data)), format="png")[..., :3]
    return int(np.all(np.abs(rgb - np.array([214, 39, 40]) / 255) < 0.03, axis=-1).sum())


def test_report_is_self_contained_with_one_decodable_png_per_plot(tmp_path: Path) -> None:
    out = render_report(sample_figures(), tmp_path / "out" / "report.html")

    assert out == tmp_path / "out" / "report.html"
    page = out.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page, re.IGNORECASE)
    assert "<link" not in page
    assert "url(" not in page
    images = IMG.findall(page)
    assert len(images) == 4
    for data in images:
        png = base64.b64decode(data, validate=True)
        assert png.startswith(PNG)
        width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
        assert width > 300
        assert height > 200
    per_section = {title: body.count("<img ") for title, body in sections(page).items()}
    assert per_section == {
        "1. Summary": 0,
        "2. Steps": 0,
        "3. Throughput": 1,
        "4. Latency": 1,
        "5. Accuracy per variant": 1,
        "6. Drift": 1,
        "7. Versions": 0,
    }


def test_report_shows_the_numbers(tmp_path: Path) -> None:
    text = text_of(render_report(sample_figures(), tmp_path / "report.html").read_text())

    assert "Failed requests 3 (1.0 %)" in text
    assert "Requests 300 " in text
    assert "Failed during promote/rollback swaps 3 of 40 requests" in text
    assert "Duration 1 min 00 s" in text
    assert "Base model prajjwal1/bert-tiny" in text
    assert "a v1 no 120 100 85.3 % [82.0 %, 88.4 %] 11.0 19.5" in text
    assert "shadow v3 yes 119 97 71.0 % [66.0 %, 76.0 %] 13.0 25.0" in text
    assert "p-value 0.012" in text
    assert "Difference +3.1 pp" in text
    assert "Recommendation promote b" in text
    assert "1 Train the champion 12.5 v1 registered" in text
    # Per phase: experiment latencies are 10..20 ms, promotion 40..60 ms (failures excluded).
    assert "experiment 150 0 15.0 20.0 20.0" in text
    assert "promotion 150 3 50.0 60.0 60.0" in text
    assert "41.0 DRIFT FIRING length drifted <fast>" in text
    assert "12 readings; drift flagged: first flagged at 40.0 s, version v2." in text
    assert "v1 stage : champion accuracy : 0.853 v2 parent : v1" in text
    assert "accuracy 0.884 >= 0.853 - 0.01: pass" in text


def test_text_from_the_figures_is_escaped(tmp_path: Path) -> None:
    page = render_report(sample_figures(), tmp_path / "report.html").read_text()

    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; done" in page
    assert "length drifted &lt;fast&gt;" in page
    assert "&gt;= 0.853" in page


def test_figures_json_beside_the_report_round_trips(tmp_path: Path) -> None:
    figures = sample_figures()
    render_report(figures, tmp_path / "report.html")

    loaded = DemoFigures.from_json((tmp_path / "figures.json").read_text(encoding="utf-8"))
    assert loaded == figures


def test_an_empty_run_renders_and_says_what_is_missing(tmp_path: Path) -> None:
    figures = DemoFigures(model="m", started_at="2025-01-01T10:00:00+00:00", profile="quick")

    page = render_report(figures, tmp_path / "report.html").read_text()

    text = text_of(page)
    assert "<img" not in page
    assert "No drift data was recorded." in text
    assert "No requests were recorded." in text
    assert "No experiment figures were recorded." in text
    assert "Finished not finished" in text
    assert "Failed requests 0 " in text
    assert DemoFigures.from_json((tmp_path / "figures.json").read_text()) == figures


def test_a_run_that_stopped_half_way_renders_what_it_has(tmp_path: Path) -> None:
    full = sample_figures()
    figures = DemoFigures(
        model=full.model,
        started_at=full.started_at,
        profile=full.profile,
        steps=full.steps[:1],
        requests=full.requests[:100],
        markers=full.markers,  # a marker beyond the last request must not break the plots
        drift=[DriftPoint(t=3.0, version="v1", samples=0, drifted=False)],  # no scores yet
        error="demo: timed out waiting for <the drift alert>",
    )

    page = render_report(figures, tmp_path / "report.html").read_text()

    per_section = {title: body.count("<img ") for title, body in sections(page).items()}
    assert per_section["3. Throughput"] == 1
    assert per_section["4. Latency"] == 1
    assert per_section["5. Accuracy per variant"] == 0
    assert per_section["6. Drift"] == 0
    text = text_of(page)
    assert "Finished not finished" in text
    assert "No drift data was recorded." in text
    assert "Failed requests 0 (0.0 %)" in text
    assert "Stopped by demo: timed out waiting for <the drift alert>" in text
    assert "&lt;the drift alert&gt;" in page


@pytest.mark.parametrize("variant_count", [1, 8])
def test_variant_counts_at_the_edges_render(tmp_path: Path, variant_count: int) -> None:
    variants = [
        VariantFigures(f"arm{i}", f"v{i}", i % 3 == 2, 10, 10, 1.0, 0.7, 1.0)
        for i in range(variant_count)
    ]
    figures = DemoFigures(model="m", started_at="t", profile="quick", variants=variants)

    text = text_of(render_report(figures, tmp_path / "report.html").read_text())

    assert f"arm{variant_count - 1} v{variant_count - 1}" in text
    assert "100.0 % [70.0 %, 100.0 %]" in text


def test_rendering_leaves_pyplot_alone(tmp_path: Path) -> None:
    """The report draws on Figure objects: importing and rendering never loads pyplot."""
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from services.demo.report import render_report\n"
        "from tests.unit.test_demo_report import sample_figures\n"
        f"render_report(sample_figures(), Path({str(tmp_path / 'r.html')!r}))\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'\n"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "r.html").exists()


def test_failures_and_drift_flags_are_drawn_in_red(tmp_path: Path) -> None:
    figures = sample_figures()
    figures.alerts = []  # FIRING alerts are red lines too
    flagged = sections(render_report(figures, tmp_path / "a.html").read_text())
    for r in figures.requests:
        r.ok = True
    for d in figures.drift:
        d.drifted = False
    clean = sections(render_report(figures, tmp_path / "b.html").read_text())

    assert red_pixels(flagged["3. Throughput"]) > 20
    assert red_pixels(clean["3. Throughput"]) == 0
    assert red_pixels(flagged["6. Drift"]) > 20
    assert red_pixels(clean["6. Drift"]) == 0


def test_drift_on_very_different_scales_renders(tmp_path: Path) -> None:
    """PSI near 1 beside MMD near 0.004 (the monitor's real figures) switches to a log scale."""
    drift = [
        DriftPoint(t, "v1", 100, t > 20, {"token_length": 1.3 * (t > 20), "embedding": 0.004},
                   {"token_length": 0.1, "embedding": 0.015})
        for t in (0.0, 10.0, 20.0, 30.0)
    ]  # fmt: skip
    figures = DemoFigures(model="m", started_at="t", profile="quick", drift=drift)

    page = render_report(figures, tmp_path / "report.html").read_text()

    assert sections(page)["6. Drift"].count("<img ") == 1
    assert "first flagged at 30.0 s, version v1" in text_of(page)
