"""Which metric names exist, for checking the dashboard's and the alerts' PromQL: those the
code exports (read from the code's own declarations, so a renamed series fails the check)
and the few that other systems export, each named with its source.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from callbacks.delivery_metrics import CALLBACK_SERIES
from ingress.metrics import IngressMetrics
from metrics.series import SeriesTable
from ray_workers.worker_metrics import SERIES

# Exported by other systems the cluster runs.
EXTERNAL_METRICS = frozenset(
    {
        # rabbitmq_prometheus, /metrics/detailed?family=queue_coarse_metrics: ready + unacked per queue.
        "rabbitmq_detailed_queue_messages",
        # KEDA's operator (its chart's ServiceMonitor), as KEDA 2.20.1 names them
        # (pkg/metricscollector/prommetrics.go; `keda_scaler_errors_total` is gone since 2.17):
        # errors per scaler (namespace, metric, scaledObject, scaler, triggerIndex, type) and
        # per ScaledObject (namespace, scaledObject).
        "keda_scaler_detail_errors_total",
        "keda_scaled_object_errors_total",
        # kube-state-metrics (kube-prometheus-stack): the HPAs KEDA manages.
        "kube_horizontalpodautoscaler_status_current_replicas",
        "kube_horizontalpodautoscaler_spec_max_replicas",
    }
)
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
_PROMQL_WORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right"}
    | {"inf", "nan"}
)
_IDENTIFIER = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def _names(base: str, kind: str) -> set[str]:
    return {base + suffix for suffix in _SUFFIXES[kind]}


def _ray_names(table: SeriesTable) -> set[str]:
    """Ray's exporter names a series `ray_<name>`, with Prometheus's suffixes."""
    return {name for series in table.values() for name in _names(f"ray_{series.name}", series.kind)}


def exported_metrics() -> frozenset[str]:
    ingress = {
        name for family in IngressMetrics().registry.collect() for name in _names(family.name, family.type)
    }
    return frozenset(ingress | _ray_names(SERIES) | _ray_names(CALLBACK_SERIES) | EXTERNAL_METRICS)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers left once label matchers,
    grouping clauses, strings and ranges are removed, that are not functions or keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\b\d+(?:\.\d+)?(?:[eE][+-]?\d+|ms|s|m|h|d|w|y)?\b", "", text)  # numbers, durations
    names = set()
    for match in _IDENTIFIER.finditer(text):
        rest = text[match.end() :].lstrip()
        word = match.group()
        if rest.startswith("(") or word.lower() in _PROMQL_WORDS:
            continue
        names.add(word)
    return names


def unknown_metrics(exprs: Iterable[str]) -> dict[str, set[str]]:
    """expr -> the names in it that nothing exports (empty when all are known)."""
    known = exported_metrics()
    found = {expr: metric_names(expr) - known for expr in exprs}
    return {expr: names for expr, names in found.items() if names}
