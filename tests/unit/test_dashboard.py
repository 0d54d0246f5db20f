"""The Grafana dashboard only charts metrics the services really export."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from services.inference.metrics import InferenceMetrics
from services.inference.records import RecordWriter
from services.monitor.metrics import MonitorMetrics
from services.router.metrics import RouterMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "loopline.json"


def exported(tmp_path: Path) -> set[str]:
    registry = CollectorRegistry()
    RouterMetrics(registry)
    InferenceMetrics(registry)
    MonitorMetrics(registry)
    RecordWriter("redis://127.0.0.1:1/0", "s", spool_path=tmp_path / "spool", registry=registry)
    names = set()
    for family in registry.collect():
        names |= {sample.name for sample in family.samples} | {family.name}
        # Labelled families have no samples until first used: name their series from the type.
        if family.type == "histogram":
            names |= {f"{family.name}_bucket"}
        if family.type == "counter":
            names |= {f"{family.name}_total"}
    return names


def test_every_expression_names_an_exported_metric(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in expressions for m in re.findall(r"loopline_[a-z_]+", e)}
    assert used, "the dashboard charts nothing"
    missing = used - exported(tmp_path)
    assert not missing, f"the dashboard charts metrics no service exports: {sorted(missing)}"
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
