"""Metric series as data, and where they are recorded.

A component declares its series once, in a table of `Series` (the workers in
`ray_workers.worker_metrics`, the callback stage in `callbacks.delivery_metrics`), and
records through a `MetricSink` by key. `PrometheusSink` keeps a table in a
prometheus_client registry (tests, a component outside Ray); inside Ray Serve replicas
`ray_workers.deployment.RaySink` builds the same table with Ray's metrics API, which Ray
exports in Prometheus format (as `ray_<name>`) on the node's metrics port.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass(frozen=True)
class Series:
    name: str
    help: str
    kind: Literal["histogram", "counter", "gauge"]
    labels: tuple[str, ...] = ("model",)
    buckets: tuple[float, ...] = ()


SeriesTable = Mapping[str, Series]


class MetricSink(Protocol):
    """Records a value of one series of its table, by the series' key."""

    def record(self, key: str, value: float, labels: Mapping[str, str]) -> None: ...


class PrometheusSink:
    """A table's series in a prometheus_client registry: histograms observe, counters add
    the value, gauges are set to it."""

    def __init__(self, table: SeriesTable, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._series: dict[str, Histogram | Counter | Gauge] = {}
        for key, series in table.items():
            if series.kind == "histogram":
                self._series[key] = Histogram(
                    series.name, series.help, series.labels, buckets=series.buckets, registry=self.registry
                )
            elif series.kind == "counter":
                self._series[key] = Counter(series.name, series.help, series.labels, registry=self.registry)
            else:
                self._series[key] = Gauge(series.name, series.help, series.labels, registry=self.registry)

    def record(self, key: str, value: float, labels: Mapping[str, str]) -> None:
        series = self._series[key]
        metric = series.labels(**labels) if labels else series  # a series without labels has no children
        if isinstance(metric, Histogram):
            metric.observe(value)
        elif isinstance(metric, Counter):
            metric.inc(value)
        else:
            metric.set(value)
