"""Checks of `cluster/monitoring` (ServiceMonitors, PodMonitors, the PrometheusRule and the
Grafana dashboard) that need no cluster.

Their kinds have no CRD in ../shared/schemas, so instead of a schema: each monitor must
select objects the platform renders and name a port they have; the rules must pass
`promtool check rules` (Debian's `prometheus` package); every metric name in the rules'
and the dashboard's PromQL must be one the code exports (`manifests.exported_metrics`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from manifests.exported_metrics import unknown_labels, unknown_metrics
from settings.environment import Environment

Manifest = dict[str, Any]
MONITORING_BASE = Path(__file__).resolve().parent.parent / "cluster" / "monitoring"
# What `task cluster-up` applies per provider: GKE's broker speaks TLS only, so its
# metrics are scraped over HTTPS on `prometheus-tls`.
MONITORING = {"kind": MONITORING_BASE, "gke": MONITORING_BASE / "tls"}


def _name(doc: Manifest) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def selector_matches(selector: Manifest, labels: Mapping[str, str]) -> bool:
    """A label selector (matchLabels, matchExpressions In / Exists) against labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        value = labels.get(expression["key"])
        if expression["operator"] == "In" and value not in expression["values"]:
            return False
        if expression["operator"] == "Exists" and value is None:
            return False
    return True


def operator_services(platform: list[Manifest]) -> list[Manifest]:
    """The client Service the RabbitMQ cluster operator (v2.14.0) makes for each
    RabbitmqCluster, as `internal/resource/service.go` builds it: labelled as
    `internal/metadata/label.go` labels it, with `amqp`, `management` and `prometheus`
    (15692) unless TLS is on, where it has `amqps`, `management-tls` and `prometheus-tls`
    (15691) instead of the metrics port ("either 15692 or 15691, not both"), and the plain
    listeners only while `disableNonTLSListeners` is off."""
    services = []
    for cluster in (d for d in platform if d["kind"] == "RabbitmqCluster"):
        name = cluster["metadata"]["name"]
        tls = cluster["spec"].get("tls", {})
        tls_on = bool(tls.get("secretName"))
        ports = [] if tls.get("disableNonTLSListeners") else ["amqp", "management"]
        ports += ["amqps", "management-tls", "prometheus-tls"] if tls_on else ["prometheus"]
        labels = {
            "app.kubernetes.io/name": name,
            "app.kubernetes.io/component": "rabbitmq",
            "app.kubernetes.io/part-of": "rabbitmq",
        }
        services.append(
            {
                "kind": "Service",
                "metadata": {"name": name, "labels": labels},
                "spec": {"ports": [{"name": port} for port in ports]},
            }
        )
    return services


def _targets(monitors: list[Manifest], platform: list[Manifest]) -> Iterator[tuple[str, str]]:
    """Each monitor selects something, and what it selects has the port it scrapes."""
    services = [d for d in platform if d["kind"] == "Service"] + operator_services(platform)
    pods = [d["spec"]["template"] for d in platform if d["kind"] in ("Deployment", "StatefulSet")]
    for monitor in monitors:
        if monitor["kind"] == "ServiceMonitor":
            ports = {p["port"] for p in monitor["spec"]["endpoints"]}
            chosen = [
                s
                for s in services
                if selector_matches(monitor["spec"]["selector"], s["metadata"].get("labels", {}))
            ]
            named = [{p.get("name") for p in s["spec"]["ports"]} for s in chosen]
        else:
            ports = {p["port"] for p in monitor["spec"]["podMetricsEndpoints"]}
            chosen = [
                p
                for p in pods
                if selector_matches(monitor["spec"]["selector"], p["metadata"].get("labels", {}))
            ]
            named = [
                {port.get("name") for c in p["spec"]["containers"] for port in c.get("ports", [])}
                for p in chosen
            ]
        if not chosen:
            yield _name(monitor), "selects nothing the platform renders"
        for object_ports in named:
            if not ports & object_ports:
                yield _name(monitor), f"a selected object has none of the ports {sorted(ports)}"


def _ray_exporters(monitors: list[Manifest], platform: list[Manifest]) -> Iterator[tuple[str, str]]:
    """A scraped pod that runs Ray (`python -m ray_workers.pod`) starts it on its pod IP
    (RAY_NODE_IP from status.podIP): on a loopback node address Ray's reporter agent binds
    the metrics exporter to loopback, where the PodMonitor's scrape of the pod IP fails."""
    pod_ip = {"fieldRef": {"fieldPath": "status.podIP"}}
    for monitor in (m for m in monitors if m["kind"] == "PodMonitor"):
        for workload in (d for d in platform if d["kind"] in ("Deployment", "StatefulSet")):
            template = workload["spec"]["template"]
            if not selector_matches(monitor["spec"]["selector"], template["metadata"].get("labels", {})):
                continue
            for container in template["spec"]["containers"]:
                runs_ray = "ray_workers.pod" in " ".join(
                    container.get("command", []) + container.get("args", [])
                )
                env = {e["name"]: e.get("valueFrom") for e in container.get("env", [])}
                if runs_ray and env.get("RAY_NODE_IP") != pod_ip:
                    yield (
                        f"{workload['kind']}/{workload['metadata']['name']}",
                        f"scraped by {_name(monitor)} but Ray's node address is not the pod's: "
                        "set RAY_NODE_IP from fieldRef status.podIP (on loopback its exporter binds there)",
                    )


# Each store the platform keeps state in, and what an alert must read for it: whether it
# answers, and how near it is to refusing writes.
STORE_SERIES = {
    "redis": ("redis_up", "redis_instance_info", "redis_connected_slaves", "redis_memory_max_bytes")
}


def _watched_stores(
    monitors: list[Manifest], docs: list[Manifest], platform: list[Manifest]
) -> Iterator[tuple[str, str]]:
    """Redis (the job records) is scraped through an exporter in its pods that a monitor
    selects, and the alerts read whether it has a primary, its replicas and how full it is."""
    rules = " ".join(_rule_exprs(docs))
    for store in (
        d for d in platform if d["kind"] == "StatefulSet" and d["metadata"]["name"] in STORE_SERIES
    ):
        template = store["spec"]["template"]
        exported = any("redis_exporter" in c["image"] for c in template["spec"]["containers"])
        scraped = any(
            selector_matches(m["spec"]["selector"], template["metadata"].get("labels", {}))
            for m in monitors
            if m["kind"] == "PodMonitor"
        )
        if not (exported and scraped):
            yield _name(store), "no monitor scrapes an exporter of it"
        for name in STORE_SERIES[store["metadata"]["name"]]:
            if name not in rules:
                yield _name(store), f"no alert reads {name}"


def _rule_exprs(docs: list[Manifest]) -> list[str]:
    return [
        str(rule["expr"])
        for doc in docs
        if doc["kind"] == "PrometheusRule"
        for group in doc["spec"]["groups"]
        for rule in group["rules"]
    ]


def _dashboard_exprs(docs: list[Manifest]) -> list[str]:
    exprs = []
    for doc in docs:
        if doc["kind"] == "ConfigMap" and doc["metadata"].get("labels", {}).get("grafana_dashboard") == "1":
            for text in doc["data"].values():
                dashboard = json.loads(text)
                exprs += [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    return exprs


def _promtool(docs: list[Manifest]) -> Iterator[tuple[str, str]]:
    promtool = shutil.which("promtool")
    rules = [doc for doc in docs if doc["kind"] == "PrometheusRule"]
    if rules and promtool is None:
        yield "PrometheusRule", "promtool not found: install Debian's `prometheus` package to check the rules"
        return
    for doc in rules:
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as rules_file:
            yaml.safe_dump({"groups": doc["spec"]["groups"]}, rules_file)
            rules_file.flush()
            checked = subprocess.run(
                [str(promtool), "check", "rules", rules_file.name], capture_output=True, text=True, timeout=60
            )
        if checked.returncode != 0:
            yield _name(doc), f"promtool check rules: {checked.stdout.strip()} {checked.stderr.strip()}"


_QUEUE_MATCHER = re.compile(r'queue\s*(=~|=)\s*"((?:[^"\\]|\\.)*)"')


def overlay_queues(platform: list[Manifest]) -> list[str]:
    """Every queue the overlay's processes declare: the topology its ConfigMap `inferq`
    (QUEUE_TYPE, MODELS, QUEUE_PREFIX) describes."""
    (config,) = [d for d in platform if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "inferq"]
    environment = Environment.read({k: str(v) for k, v in config.get("data", {}).items()})
    return [spec.name for spec in environment.topology().queues(environment.served_models)]


def _queue_selectors(exprs: list[str], queues: list[str]) -> Iterator[tuple[str, str]]:
    """Each `queue=` / `queue=~` matcher in the PromQL selects at least one queue the
    overlay has (a regex matches whole names, as Prometheus anchors it)."""
    for expr in exprs:
        for operator, literal in _QUEUE_MATCHER.findall(expr):
            value = re.sub(r"\\(.)", r"\1", literal)
            if operator == "=":
                selected = [queue for queue in queues if queue == value]
            else:
                selected = [queue for queue in queues if re.fullmatch(value, queue)]
            if not selected:
                yield "PromQL", f"queue{operator}{value!r} selects none of the overlay's queues (in: {expr})"


def monitoring_violations(docs: list[Manifest], platform: list[Manifest]) -> list[tuple[str, str]]:
    """(subject, rule broken) for the monitoring objects `docs`, checked against `platform`
    (an overlay's rendered objects)."""
    monitors = [d for d in docs if d["kind"] in ("ServiceMonitor", "PodMonitor")]
    found = list(_targets(monitors, platform))
    found += list(_ray_exporters(monitors, platform))
    found += list(_watched_stores(monitors, docs, platform))
    found += list(_promtool(docs))
    found += list(_queue_selectors(_rule_exprs(docs) + _dashboard_exprs(docs), overlay_queues(platform)))
    for expr, names in unknown_metrics(_rule_exprs(docs) + _dashboard_exprs(docs)).items():
        found.append(("PromQL", f"{sorted(names)} exported by nothing (in: {expr})"))
    for expr, labels in unknown_labels(_rule_exprs(docs) + _dashboard_exprs(docs)).items():
        found.append(("PromQL", f"labels {sorted(labels)} are on none of its series (in: {expr})"))
    if not _rule_exprs(docs) or not _dashboard_exprs(docs):
        found.append(("monitoring", "expected alerting rules and a dashboard"))
    return found
