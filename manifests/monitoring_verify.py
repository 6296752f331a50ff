"""Checks of `cluster/monitoring` (ServiceMonitors, PodMonitors, the PrometheusRule and the
Grafana dashboard) that need no cluster.

Their kinds have no CRD in ../shared/schemas, so instead of a schema: each monitor must
select objects the platform renders and name a port they have; the rules must pass
`promtool check rules` (Debian's `prometheus` package); every metric name in the rules'
and the dashboard's PromQL must be one the code exports (`manifests.exported_metrics`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from manifests.exported_metrics import unknown_metrics

Manifest = dict[str, Any]
MONITORING = Path(__file__).resolve().parent.parent / "cluster" / "monitoring"


def _name(doc: Manifest) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def _matches(selector: Manifest, labels: dict[str, str]) -> bool:
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        value = labels.get(expression["key"])
        if expression["operator"] == "In" and value not in expression["values"]:
            return False
        if expression["operator"] == "Exists" and value is None:
            return False
    return True


def _targets(monitors: list[Manifest], platform: list[Manifest]) -> Iterator[tuple[str, str]]:
    """Each monitor selects something, and what it selects has the port it scrapes."""
    services = [d for d in platform if d["kind"] == "Service"]
    pods = [d["spec"]["template"] for d in platform if d["kind"] in ("Deployment", "StatefulSet")]
    for monitor in monitors:
        if monitor["kind"] == "ServiceMonitor":
            ports = {p["port"] for p in monitor["spec"]["endpoints"]}
            chosen = [
                s for s in services if _matches(monitor["spec"]["selector"], s["metadata"].get("labels", {}))
            ]
            named = [{p.get("name") for p in s["spec"]["ports"]} for s in chosen]
        else:
            ports = {p["port"] for p in monitor["spec"]["podMetricsEndpoints"]}
            chosen = [
                p for p in pods if _matches(monitor["spec"]["selector"], p["metadata"].get("labels", {}))
            ]
            named = [
                {port.get("name") for c in p["spec"]["containers"] for port in c.get("ports", [])}
                for p in chosen
            ]
        if not chosen and not _selects_operator_objects(monitor):
            yield _name(monitor), "selects nothing the platform renders"
        for object_ports in named:
            if not ports & object_ports:
                yield _name(monitor), f"a selected object has none of the ports {sorted(ports)}"


def _selects_operator_objects(monitor: Manifest) -> bool:
    """RabbitMQ's Service is made by its operator, not rendered here: the operator labels it
    app.kubernetes.io/name=rabbitmq and names its metrics port `prometheus`."""
    labels = monitor["spec"]["selector"].get("matchLabels", {})
    return labels == {"app.kubernetes.io/name": "rabbitmq"} and [
        e["port"] for e in monitor["spec"].get("endpoints", [])
    ] == ["prometheus"]


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


def monitoring_violations(docs: list[Manifest], platform: list[Manifest]) -> list[tuple[str, str]]:
    """(subject, rule broken) for the monitoring objects `docs`, checked against `platform`
    (an overlay's rendered objects)."""
    found = list(_targets([d for d in docs if d["kind"] in ("ServiceMonitor", "PodMonitor")], platform))
    found += list(_promtool(docs))
    for expr, names in unknown_metrics(_rule_exprs(docs) + _dashboard_exprs(docs)).items():
        found.append(("PromQL", f"{sorted(names)} exported by nothing (in: {expr})"))
    if not _rule_exprs(docs) or not _dashboard_exprs(docs):
        found.append(("monitoring", "expected alerting rules and a dashboard"))
    return found
