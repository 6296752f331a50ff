"""Which metric names exist, and the labels their series carry, for checking the
dashboard's and the alerts' PromQL: those the code exports (read from the code's own
declarations, so a renamed series or label fails the check) and the few that other
systems export, each named with its source.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram

from callbacks.delivery_metrics import CALLBACK_SERIES
from ingress.metrics import IngressMetrics
from metrics.series import SeriesTable
from ray_workers.worker_metrics import SERIES

# Exported by other systems the cluster runs, with their labels.
EXTERNAL_METRICS: dict[str, frozenset[str]] = {
    # rabbitmq_prometheus, /metrics/detailed?family=queue_coarse_metrics: ready + unacked per queue.
    "rabbitmq_detailed_queue_messages": frozenset({"queue", "vhost"}),
    # KEDA's operator (its chart's ServiceMonitor), as KEDA 2.20.1 names them
    # (pkg/metricscollector/prommetrics.go; `keda_scaler_errors_total` is gone since 2.17):
    # errors per scaler and per ScaledObject.
    "keda_scaler_detail_errors_total": frozenset(
        {"namespace", "metric", "scaledObject", "scaler", "triggerIndex", "type"}
    ),
    "keda_scaled_object_errors_total": frozenset({"namespace", "scaledObject"}),
    # kube-state-metrics (kube-prometheus-stack): the HPAs KEDA manages.
    "kube_horizontalpodautoscaler_status_current_replicas": frozenset(
        {"namespace", "horizontalpodautoscaler"}
    ),
    "kube_horizontalpodautoscaler_spec_max_replicas": frozenset({"namespace", "horizontalpodautoscaler"}),
    # oliver006/redis_exporter (cluster/base/redis.yaml), the job records' Redis.
    "redis_up": frozenset(),
    "redis_instance_info": frozenset({"role", "redis_mode", "redis_version", "maxmemory_policy", "tcp_port"}),
    "redis_connected_slaves": frozenset(),
    "redis_memory_used_bytes": frozenset(),
    "redis_memory_max_bytes": frozenset(),
    "redis_commands_processed_total": frozenset(),
    "redis_connected_clients": frozenset(),
}
# What Prometheus adds to every series it scrapes through a ServiceMonitor or PodMonitor.
TARGET_LABELS = frozenset({"instance", "job", "namespace", "pod", "container", "service", "endpoint"})
# What Ray's exporter adds to every series of a replica.
RAY_LABELS = frozenset({"Component", "NodeAddress", "SessionName", "Version", "WorkerId"})
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
_PROMQL_WORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right"}
    | {"inf", "nan"}
)
_IDENTIFIER = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def _names(base: str, kind: str) -> set[str]:
    return {base + suffix for suffix in _SUFFIXES[kind]}


def _with_labels(base: str, kind: str, labels: Iterable[str]) -> dict[str, frozenset[str]]:
    """Each name a series is exported under, with its labels (`le` on a histogram's buckets)."""
    own = frozenset(labels) | TARGET_LABELS
    return {name: own | ({"le"} if name.endswith("_bucket") else set()) for name in _names(base, kind)}


def _ray_series(table: SeriesTable) -> dict[str, frozenset[str]]:
    """Ray's exporter names a series `ray_<name>`, with Prometheus's suffixes and its own labels."""
    exported: dict[str, frozenset[str]] = {}
    for series in table.values():
        exported.update(_with_labels(f"ray_{series.name}", series.kind, {*series.labels, *RAY_LABELS}))
    return exported


def exported_series() -> dict[str, frozenset[str]]:
    """Every metric name the cluster's Prometheus can hold, with the labels its series carry."""
    exported: dict[str, frozenset[str]] = {}
    for metric in vars(IngressMetrics()).values():
        if isinstance(metric, Counter | Gauge | Histogram):
            # prometheus_client keeps a metric's name, type and label names without a public
            # reader; were they renamed, every label here would be reported unknown (loudly).
            exported.update(_with_labels(metric._name, metric._type, metric._labelnames))
    exported.update(_ray_series(SERIES))
    exported.update(_ray_series(CALLBACK_SERIES))
    exported.update({name: labels | TARGET_LABELS for name, labels in EXTERNAL_METRICS.items()})
    return exported


def exported_metrics() -> frozenset[str]:
    return frozenset(exported_series())


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


_MATCHER_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_CLAUSE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def label_names(expr: str) -> set[str]:
    """The label names a PromQL expression reads: in matchers and in grouping clauses."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    names = {label for body in re.findall(r"\{([^}]*)\}", text) for label in _MATCHER_LABEL.findall(body)}
    for body in _CLAUSE.findall(text):
        names |= {label.strip() for label in body.split(",") if label.strip()}
    return names


def unknown_labels(exprs: Iterable[str]) -> dict[str, set[str]]:
    """expr -> the labels in it that none of its metrics carries (empty when all are known):
    a misspelt `by (modle)` or a label a series never had returns nothing, silently."""
    series = exported_series()
    found = {}
    for expr in exprs:
        carried = set().union(*(series.get(name, frozenset()) for name in metric_names(expr)))
        unknown = label_names(expr) - carried
        if unknown:
            found[expr] = unknown
    return found
