"""The Grafana dashboard and Prometheus config in monitoring/ query only what peers and trainers export."""

from __future__ import annotations

import json
import re
from pathlib import Path

from swarmlm.monitoring.metrics import PeerMetrics
from swarmlm.training.metrics import TrainerMetrics
from swarmlm.training.config import TrainConfig

MONITORING = Path(__file__).resolve().parents[1] / "monitoring"


def _exported_names() -> set[str]:
    """Every sample name a peer's and a trainer's /metrics can show (counters' _total, histograms' _bucket...)."""
    names = set()
    for registry in (PeerMetrics().registry, TrainerMetrics(TrainConfig(run_id="run", model="m"), dht=None).registry):
        for family in registry.collect():
            names.add(family.name)
            names.update(sample.name for sample in family.samples)
    return names


def _queries(dashboard: dict) -> list[str]:
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    return queries + [variable["definition"] for variable in dashboard["templating"]["list"] if "definition" in variable]


def test_every_metric_the_dashboard_queries_is_exported():
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    used = {name for query in _queries(dashboard) for name in re.findall(r"\bswarmlm_[a-z_]+", query)}
    exported = _exported_names()
    assert {"swarmlm_processed_tokens_total", "swarmlm_training_loss"} <= used  # peers' and trainers' panels
    assert used - exported == set(), f"queried but never exported: {sorted(used - exported)}"


def test_panels_have_unique_ids_and_every_variable_they_use_is_defined():
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    defined = {variable["name"] for variable in dashboard["templating"]["list"]} | {"__rate_interval"}
    used = {name for query in _queries(dashboard) for name in re.findall(r"\$(\w+)", query)}
    assert used <= defined, f"undefined variables: {sorted(used - defined)}"
