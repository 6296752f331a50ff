"""A real Prometheus (Debian's `prometheus`) scraping exactly what the ServiceMonitors and
PodMonitors select, on the ports they name, with their paths and params; then every
dashboard panel's queries and every alert expression asked of it.

Targets are resolved as the Prometheus operator would: a ServiceMonitor's endpoint port
names a port of each selected Service, whose targetPort names a container port of each
ready pod the Service selects; a PodMonitor's port names a container port of each pod it
selects. The operator's RabbitMQ Service stands for the broker outside the overlay.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from manifests.exported_metrics import metric_names
from manifests.monitoring_verify import operator_services, selector_matches
from rehearsal.pods import Pod

Manifest = dict[str, Any]
SCRAPE_INTERVAL_S = 5
# What exports these runs only in a real cluster: kube-state-metrics (KEDA's HPAs) and KEDA.
NOT_REHEARSED = {
    "kube_horizontalpodautoscaler_status_current_replicas": "kube-state-metrics (the HPAs KEDA makes)",
    "kube_horizontalpodautoscaler_spec_max_replicas": "kube-state-metrics (the HPAs KEDA makes)",
    "keda_scaled_object_errors_total": "KEDA's operator",
    "keda_scaler_detail_errors_total": "KEDA's operator",
}


@dataclass(frozen=True)
class Target:
    job: str
    address: str
    path: str
    params: dict[str, list[str]]
    labels: dict[str, str]


def _service_targets(
    monitor: Manifest,
    services: list[Manifest],
    operator: dict[str, Manifest],
    pods: list[Pod],
    broker_ports: Mapping[str, str],
) -> Iterator[Target]:
    job = f"ServiceMonitor/{monitor['metadata']['name']}"
    for endpoint in monitor["spec"]["endpoints"]:
        path, params = endpoint.get("path", "/metrics"), endpoint.get("params", {})
        for service in services + list(operator.values()):
            if not selector_matches(monitor["spec"]["selector"], service["metadata"].get("labels", {})):
                continue
            port = next((p for p in service["spec"]["ports"] if p.get("name") == endpoint["port"]), None)
            if port is None:
                continue
            if service["metadata"]["name"] in operator:
                yield Target(job, broker_ports[endpoint["port"]], path, params, {"service": "rabbitmq"})
                continue
            selector = {"matchLabels": service["spec"]["selector"]}
            for pod in (p for p in pods if p.ready and selector_matches(selector, p.labels)):
                target_port = port["targetPort"]
                number = pod.ports[target_port] if isinstance(target_port, str) else int(target_port)
                labels = {"service": service["metadata"]["name"], "pod": pod.name}
                yield Target(job, f"{pod.address}:{number}", path, params, labels)


def scrape_targets(
    monitors: list[Manifest], platform: list[Manifest], pods: list[Pod], broker_ports: Mapping[str, str]
) -> Iterator[Target]:
    """Every target the monitors select; `broker_ports` maps the operator Service's port
    names to where the broker serves them here."""
    services = [d for d in platform if d["kind"] == "Service"]
    operator = {s["metadata"]["name"]: s for s in operator_services(platform)}
    for monitor in monitors:
        if monitor["kind"] == "ServiceMonitor":
            yield from _service_targets(monitor, services, operator, pods, broker_ports)
            continue
        job = f"PodMonitor/{monitor['metadata']['name']}"
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            for pod in pods:
                if (
                    selector_matches(monitor["spec"]["selector"], pod.labels)
                    and endpoint["port"] in pod.ports
                ):
                    address = f"{pod.address}:{pod.ports[endpoint['port']]}"
                    path, params = endpoint.get("path", "/metrics"), endpoint.get("params", {})
                    yield Target(job, address, path, params, {"pod": pod.name})


def prometheus_config(targets: list[Target]) -> dict[str, Any]:
    jobs = []
    for index, target in enumerate(targets):
        jobs.append(
            {
                "job_name": f"{target.job}-{index}",
                "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
                "metrics_path": target.path,
                "params": target.params,
                "static_configs": [
                    {
                        "targets": [target.address],
                        "labels": {"namespace": "inferq", "monitor": target.job, **target.labels},
                    }
                ],
            }
        )
    return {"global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s"}, "scrape_configs": jobs}


class Prometheus:
    """`prometheus` on 127.0.0.1:port with the given targets; `query` asks it PromQL."""

    def __init__(self, folder: Path, port: int) -> None:
        self._folder = folder
        self.port = port
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, targets: list[Target]) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError(
                "the rehearsal needs Debian's `prometheus` package (apt-get install prometheus)"
            )
        self._folder.mkdir(parents=True, exist_ok=True)
        config = self._folder / "prometheus.yml"
        config.write_text(yaml.safe_dump(prometheus_config(targets)))
        log = (self._folder / "log").open("ab")
        self._process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={self._folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    async def query(self, expr: str) -> tuple[int, str | None]:
        """(series returned, error) for `expr` evaluated now."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query"
        timeout = aiohttp.ClientTimeout(total=10)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url, params={"query": expr}) as answer,
        ):
            body = json.loads(await answer.text())
        if body.get("status") != "success":
            return 0, str(body.get("error", body))
        return len(body["data"]["result"]), None

    async def targets_up(self) -> dict[str, str]:
        url = f"http://127.0.0.1:{self.port}/api/v1/targets"
        async with aiohttp.ClientSession() as session, session.get(url) as answer:
            body = json.loads(await answer.text())
        return {t["scrapeUrl"]: t["health"] for t in body["data"]["activeTargets"]}

    async def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            try:
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(f"http://127.0.0.1:{self.port}/-/ready") as r,
                ):
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(
                    f"prometheus did not get ready within {timeout_s} s; see {self._folder / 'log'}"
                )
            await asyncio.sleep(0.5)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(20)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(10)


def unrehearsed_sources(expr: str) -> set[str]:
    """What exports the series `expr` reads that the rehearsal does not run."""
    return {NOT_REHEARSED[name] for name in metric_names(expr) if name in NOT_REHEARSED}
