"""`task cluster:verify`: render each overlay (`kubectl kustomize`) and check every object
offline, as a cluster would and as our rules require.

- Core kinds validate with kubernetes-validate, strict, at KUBERNETES_VERSION.
- Custom resources validate against the upstream CRDs at their pinned commits
  (`manifests.upstream_crds`: a variable's folder, ../shared/schemas, or the cache,
  fetched when missing): kubernetes-validate passes an unknown kind silently, so a kind
  with no CRD here is itself a violation.
- The rules (`POLICIES`): pinned images pulled IfNotPresent, no `replicas` on a
  Deployment KEDA scales, every scale target and TriggerAuthentication present,
  hardened pods (non-root, seccomp RuntimeDefault, no service-account token) and
  containers (no privilege escalation, read-only root, every capability dropped),
  probes, requests and a memory limit on every container, a default-deny
  NetworkPolicy per namespace, a PodDisruptionBudget over every workload; every broker
  client connects as its own user (`inferq-broker-<role>`, named by its
  `inferq.dev/broker-role` label), the components may not declare the topology, and only
  the broker-access Job reads the administrator's credentials; each model's ScaledObject
  counts exactly the queues its jobs wait in for the overlay's QUEUE_TYPE.

The monitoring component (`cluster/monitoring`, applied once kube-prometheus-stack runs)
is checked by `manifests.monitoring_verify` against each overlay.

Each violation names the overlay, the object and the rule; the exit status is 1 when
there is any.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

from autoscaler.scaling_policy import CHUNK_BACKLOG_TRIGGER, HIGH_BACKLOG_TRIGGER
from manifests import upstream_crds
from manifests.image_contents import image_violations, torch_violations
from manifests.monitoring_verify import MONITORING, monitoring_violations
from manifests.worker_deployments import (
    BROKER_ROLE_LABEL,
    OBJECT_STORE_SECRET,
    RECORDS_CLIENT_LABEL,
    REDIS_SECRET,
    STORE_CLIENT_LABEL,
)
from settings.environment import Environment

ROOT = Path(__file__).resolve().parent.parent
OVERLAYS = {"kind": ROOT / "cluster" / "overlays" / "kind", "gke": ROOT / "cluster" / "overlays" / "gke"}
KUBERNETES_VERSION = "1.36"  # the kind node image cluster/provision.sh pins
WORKLOADS = ("Deployment", "StatefulSet")
ADMIN_SECRETS = ("inferq-broker-admin", "inferq-broker-users", "rabbitmq-default-user")

Manifest = dict[str, Any]


@dataclass(frozen=True)
class Violation:
    overlay: str
    subject: str
    rule: str

    def __str__(self) -> str:
        return f"{self.overlay}: {self.subject}: {self.rule}"


class RenderFailed(RuntimeError):
    """kubectl is missing, or it could not render a kustomization; the message says which."""


def render(overlay: Path) -> list[Manifest]:
    """`kubectl kustomize overlay`, parsed."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise RenderFailed("kubectl not found on PATH: it renders the kustomizations (`kubectl kustomize`)")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60, check=False
    )
    if rendered.returncode != 0:
        raise RenderFailed(f"kubectl kustomize {overlay}: {rendered.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]


def _name(doc: Manifest) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def _pods(docs: list[Manifest]) -> Iterator[tuple[Manifest, Manifest]]:
    """(workload, pod spec) for every Deployment and StatefulSet."""
    for doc in docs:
        if doc["kind"] in WORKLOADS:
            yield doc, doc["spec"]["template"]["spec"]


def _every_pod(docs: list[Manifest]) -> Iterator[tuple[Manifest, Manifest]]:
    """(owner, pod spec) for the workloads and the Jobs (which run once: no probes, no PDB)."""
    yield from _pods(docs)
    for doc in docs:
        if doc["kind"] == "Job":
            yield doc, doc["spec"]["template"]["spec"]


def _containers(
    docs: list[Manifest], pods: Callable[[list[Manifest]], Iterator[tuple[Manifest, Manifest]]] = _pods
) -> Iterator[tuple[Manifest, Manifest]]:
    for workload, pod in pods(docs):
        for container in pod.get("initContainers", []) + pod["containers"]:
            yield workload, container


def schema_violations(docs: list[Manifest]) -> Iterator[tuple[str, str]]:
    for doc in docs:
        group = doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else ""
        if "." not in group or group.endswith(".k8s.io"):  # built-in: apps, policy, networking.k8s.io
            problem = _core_problem(json.dumps(doc, sort_keys=True))
            if problem is not None:
                yield _name(doc), f"invalid {doc['apiVersion']} {doc['kind']}: {problem}"
            continue
        validator = _crd_validator(group, doc["kind"], doc["apiVersion"].split("/")[1])
        if validator is None:
            yield _name(doc), _no_crd(group, doc["kind"], doc["apiVersion"])
            continue
        error = jsonschema.exceptions.best_match(validator.iter_errors(doc))
        if error is not None:
            yield _name(doc), f"invalid against its CRD: {error.message} at {list(error.absolute_path)}"


@functools.lru_cache(maxsize=1024)
def _core_problem(doc_json: str) -> str | None:
    """kubernetes-validate's verdict on one object (cached: it reads a schema file per call)."""
    try:
        kubernetes_validate.validate(json.loads(doc_json), KUBERNETES_VERSION, strict=True)
    except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as exc:
        return str(exc)
    return None


def _no_crd(group: str, kind: str, api_version: str) -> str:
    crd = upstream_crds.crd_for(group, kind)
    if crd is None:
        known = sorted(crd.kind for crd in upstream_crds.CRDS + upstream_crds.VENDORED_CRDS)
        return f"no CRD for {api_version} {kind} to validate it against (known: {known})"
    looked = ", ".join(str(path) for path in upstream_crds.candidates(crd))
    if crd.vendored:
        return f"the CRD of {kind} is missing from {looked}, where the repository keeps it"
    return (
        f"the CRD of {kind} was not found (looked in {looked}): run `task crds` where there is "
        f"a network, or set {crd.variable} to a folder of the upstream CRD files"
    )


@functools.lru_cache(maxsize=16)
def _crd_validator(group: str, kind: str, version: str) -> jsonschema.protocols.Validator | None:
    """The CRD's schema for `version`, compiled once (the files are large)."""
    crd = upstream_crds.crd_for(group, kind)
    path = upstream_crds.locate(crd) if crd is not None else None
    if path is None:
        return None
    crd = yaml.load(path.read_text(), Loader=yaml.CSafeLoader)
    for served in crd["spec"]["versions"]:
        if served["name"] == version:
            schema: Manifest = served["schema"]["openAPIV3Schema"]
            return jsonschema.validators.validator_for(schema)(schema)
    return None


def _images(docs: list[Manifest]) -> Iterator[tuple[str, str]]:
    for workload, container in _containers(docs, _every_pod):
        image = container["image"]
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        if "@sha256:" not in image and (not tag or tag == "latest"):
            yield _name(workload), f"image {image!r} is not pinned (a version tag or a digest)"
        if container.get("imagePullPolicy") != "IfNotPresent":
            yield _name(workload), f"container {container['name']}: imagePullPolicy must be IfNotPresent"


def _scaling(docs: list[Manifest]) -> Iterator[tuple[str, str]]:
    workloads = {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == "Deployment"}
    auths = {doc["metadata"]["name"] for doc in docs if doc["kind"] == "TriggerAuthentication"}
    for scaled in (doc for doc in docs if doc["kind"] == "ScaledObject"):
        target = workloads.get(scaled["spec"]["scaleTargetRef"]["name"])
        if target is None:
            yield _name(scaled), "its scale target is not a Deployment here"
        elif "replicas" in target["spec"]:
            yield _name(target), "KEDA scales it: a replicas field would reset it on every apply"
        for trigger in scaled["spec"]["triggers"]:
            auth = (trigger.get("authenticationRef") or {}).get("name")
            if auth is not None and auth not in auths:
                yield _name(scaled), f"authenticationRef {auth!r} is not a TriggerAuthentication here"


def _hardening(docs: list[Manifest]) -> Iterator[tuple[str, str]]:
    for workload, pod in _every_pod(docs):
        context = pod.get("securityContext") or {}
        if context.get("runAsNonRoot") is not True:
            yield _name(workload), "pod securityContext.runAsNonRoot must be true"
        if (context.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            yield _name(workload), "pod securityContext.seccompProfile must be RuntimeDefault"
        if pod.get("automountServiceAccountToken") is not False:
            yield _name(workload), "automountServiceAccountToken must be false (no pod here calls the API)"
    for workload, container in _containers(docs, _every_pod):
        context = container.get("securityContext") or {}
        where = f"container {container['name']}"
        if context.get("allowPrivilegeEscalation") is not False:
            yield _name(workload), f"{where}: allowPrivilegeEscalation must be false"
        if context.get("readOnlyRootFilesystem") is not True:
            yield _name(workload), f"{where}: readOnlyRootFilesystem must be true"
        if (context.get("capabilities") or {}).get("drop") != ["ALL"]:
            yield _name(workload), f"{where}: capabilities must drop ALL"


def _operations(docs: list[Manifest]) -> Iterator[tuple[str, str]]:
    for workload, container in _containers(docs):
        where = f"container {container['name']}"
        for probe in ("readinessProbe", "livenessProbe"):
            if probe not in container:
                yield _name(workload), f"{where}: no {probe}"
        resources = container.get("resources") or {}
        if not resources.get("requests") or "memory" not in (resources.get("limits") or {}):
            yield _name(workload), f"{where}: needs resource requests and a memory limit"


def _isolation(docs: list[Manifest]) -> Iterator[tuple[str, str]]:
    namespaces = {doc["metadata"]["name"] for doc in docs if doc["kind"] == "Namespace"}
    denied = {
        doc["metadata"]["namespace"]
        for doc in docs
        if doc["kind"] == "NetworkPolicy"
        and doc["spec"].get("podSelector") == {}
        and set(doc["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
        and not doc["spec"].get("ingress")
        and not doc["spec"].get("egress")
    }
    for namespace in sorted(namespaces - denied):
        yield (
            f"Namespace/{namespace}",
            "no default-deny NetworkPolicy (empty podSelector, Ingress and Egress)",
        )
    budgets = [doc for doc in docs if doc["kind"] == "PodDisruptionBudget"]
    for workload, _pod in _pods(docs):
        labels = _pod_labels(workload)
        covered = any(
            budget["metadata"]["namespace"] == workload["metadata"]["namespace"]
            and budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
            for budget in budgets
        )
        if not covered:
            yield _name(workload), "no PodDisruptionBudget selects its pods"


def _push_scalers(docs: list[Manifest]) -> Iterator[tuple[str, str]]:
    """The Deployment behind every `external-push` trigger runs two replicas or more, each
    on a queue of its own (PUSH_SCALER_INSTANCE from its pod's name): KEDA scales nothing to
    zero while a trigger errors, so a lone push scaler's outage pins every model at one."""
    services = {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == "Service"}
    deployments = [doc for doc in docs if doc["kind"] == "Deployment"]
    addresses = {
        trigger["metadata"]["scalerAddress"].split(".")[0]
        for doc in docs
        if doc["kind"] == "ScaledObject"
        for trigger in doc["spec"]["triggers"]
        if trigger["type"] == "external-push"
    }
    own_name = {"fieldRef": {"fieldPath": "metadata.name"}}
    for service in (services[name] for name in sorted(addresses) if name in services):
        selector = service["spec"]["selector"].items()
        for deployment in (d for d in deployments if selector <= _pod_labels(d).items()):
            if deployment["spec"].get("replicas", 1) < 2:
                yield (
                    _name(deployment),
                    "one replica behind KEDA's external-push triggers: its outage pins every model",
                )
            env = {
                e["name"]: e.get("valueFrom")
                for e in deployment["spec"]["template"]["spec"]["containers"][0].get("env", [])
            }
            if env.get("PUSH_SCALER_INSTANCE") != own_name:
                yield (
                    _name(deployment),
                    "PUSH_SCALER_INSTANCE not from metadata.name: its replicas would share one queue",
                )


def _availability(docs: list[Manifest]) -> Iterator[tuple[str, str]]:
    """What keeps the stateful parts up through drains and node losses, and the namespace's
    Pod Security Admission level."""
    headless = {
        doc["metadata"]["name"]
        for doc in docs
        if doc["kind"] == "Service" and doc["spec"].get("clusterIP") == "None"
    }
    for doc in docs:
        if doc["kind"] == "StatefulSet" and doc["spec"].get("serviceName") not in headless:
            yield _name(doc), f"serviceName {doc['spec'].get('serviceName')!r} is not a headless Service"
        if doc["kind"] == "Namespace" and "pod-security.kubernetes.io/enforce" not in doc["metadata"].get(
            "labels", {}
        ):
            yield _name(doc), "no Pod Security Admission level (pod-security.kubernetes.io/enforce)"
    yield from _push_scalers(docs)
    budgets = [doc for doc in docs if doc["kind"] == "PodDisruptionBudget"]
    for cluster in (doc for doc in docs if doc["kind"] == "RabbitmqCluster"):
        labels = {"app.kubernetes.io/name": cluster["metadata"]["name"]}
        if not any(b["spec"]["selector"].get("matchLabels", {}).items() <= labels.items() for b in budgets):
            yield _name(cluster), "no PodDisruptionBudget selects the broker's pods"
        if cluster["spec"].get("replicas", 1) > 1 and "podAntiAffinity" not in cluster["spec"].get(
            "affinity", {}
        ):
            yield (
                _name(cluster),
                "several broker nodes and no podAntiAffinity: they may share a Kubernetes node",
            )


# The RabbitMQ cluster operator's production example (docs/examples/production-ready):
# "the absolute minimum is 2 CPUs" per node of a production cluster.
BROKER_PRODUCTION_CPUS = 2.0
BROKER_STATED_CONFIG = ("vm_memory_high_watermark.relative", "disk_free_limit")


def _broker_sizing(docs: list[Manifest]) -> Iterator[tuple[str, str]]:
    """The broker sized and tuned as the operator's production example asks: its alarms
    stated, memory requested as limited, and a multi-node cluster on 2 CPUs per node,
    paused when partitioned, one node per zone."""
    for cluster in (doc for doc in docs if doc["kind"] == "RabbitmqCluster"):
        spec = cluster["spec"]
        resources = spec.get("resources", {})
        limit = resources.get("limits", {}).get("memory")
        if limit is None or resources.get("requests", {}).get("memory") != limit:
            yield (
                _name(cluster),
                "memory must be limited and requested as limited (the alarms derive from it)",
            )
        config = spec.get("rabbitmq", {}).get("additionalConfig", "")
        for key in BROKER_STATED_CONFIG:
            if key not in config:
                yield _name(cluster), f"{key} is not stated in additionalConfig"
        if spec.get("replicas", 1) < 3:
            continue
        if "cluster_partition_handling = pause_minority" not in config:
            yield _name(cluster), "several nodes without cluster_partition_handling = pause_minority"
        node_cpus = cpus(resources.get("requests", {}).get("cpu", "0"))
        if node_cpus < BROKER_PRODUCTION_CPUS:
            yield (
                _name(cluster),
                f"{node_cpus:g} CPUs per node; "
                f"the operator's production minimum is {BROKER_PRODUCTION_CPUS:g}",
            )
        pod = (
            spec.get("override", {})
            .get("statefulSet", {})
            .get("spec", {})
            .get("template", {})
            .get("spec", {})
        )
        if not any(
            c.get("topologyKey") == "topology.kubernetes.io/zone"
            and c.get("whenUnsatisfiable") == "DoNotSchedule"
            for c in pod.get("topologySpreadConstraints", [])
        ):
            yield (
                _name(cluster),
                "several nodes and no spread over zones: one zone's loss may take a majority",
            )


def cpus(quantity: str | int | float) -> float:
    """A Kubernetes CPU quantity ("250m", "2") in cores."""
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _settings(docs: list[Manifest]) -> dict[str, str]:
    """The ConfigMap every inferq pod reads its settings from (empty when missing)."""
    config = next((d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "inferq"), {})
    data: dict[str, str] = config.get("data") or {}
    return data


def _queue_counting(docs: list[Manifest]) -> Iterator[tuple[str, str]]:
    """Each model's ScaledObject counts exactly the queues its jobs wait in, for the
    overlay's QUEUE_TYPE and TENANT_LANES (a regex, summed), and its high-backlog trigger
    exactly the high-priority ones, its chunk-backlog trigger exactly the chunk queues."""
    environment = Environment.read(_settings(docs))
    topology, models = environment.topology(), environment.served_models
    every_queue = {spec.name for spec in topology.queues(models)}
    # The triggers that count some queues apart: which, and what their jobs are called.
    apart = {
        HIGH_BACKLOG_TRIGGER: (topology.high_queues, "high-priority "),
        CHUNK_BACKLOG_TRIGGER: (topology.chunk_queues, "chunked "),
    }
    for scaled in (doc for doc in docs if doc["kind"] == "ScaledObject"):
        model = scaled["metadata"].get("labels", {}).get("inferq.dev/model")
        if model is None:
            continue
        for trigger in (t for t in scaled["spec"]["triggers"] if t["type"] == "rabbitmq"):
            queues_of, part = apart.get(trigger.get("name", ""), (topology.job_queues, ""))
            expected = set(queues_of(model))
            meta = trigger["metadata"]
            if meta.get("useRegex") == "true":
                if meta.get("operation") != "sum":
                    yield _name(scaled), "a queueName regex must be summed (operation: sum)"
                counted = {queue for queue in every_queue if re.fullmatch(meta["queueName"], queue)}
            else:
                counted = {meta["queueName"]}
            if counted != expected:
                yield (
                    _name(scaled),
                    f"counts {sorted(counted)}, but {model}'s {part}jobs wait in "
                    f"{sorted(expected)} "
                    f"(QUEUE_TYPE={topology.queue_type})",
                )


def _secret_refs(container: Manifest) -> Iterator[tuple[str, str]]:
    """(variable or "*", Secret name) for each Secret a container's environment reads."""
    for variable in container.get("env", []):
        ref = (variable.get("valueFrom") or {}).get("secretKeyRef")
        if ref is not None:
            yield variable["name"], ref["name"]
    for source in container.get("envFrom", []):
        if "secretRef" in source:
            yield "*", source["secretRef"]["name"]


def _broker_access(docs: list[Manifest]) -> Iterator[tuple[str, str]]:
    """Each component connects as its own broker user and may not declare; only the
    broker-access Job holds the administrator's credentials."""
    if _settings(docs).get("DECLARE_TOPOLOGY") != "false":
        yield "ConfigMap/inferq", 'DECLARE_TOPOLOGY must be "false" (the broker-access Job declares)'
    for workload, _pod in _every_pod(docs):
        labels = _pod_labels(workload)
        if labels.get("inferq.dev/broker-client") == "true" and BROKER_ROLE_LABEL not in labels:
            yield _name(workload), f"a broker client without the label {BROKER_ROLE_LABEL} (its broker user)"
    for workload, container in _containers(docs, _every_pod):
        role = _pod_labels(workload).get(BROKER_ROLE_LABEL)
        for variable, secret in _secret_refs(container):
            if secret in ADMIN_SECRETS and role != "admin":
                yield _name(workload), f"reads {secret}, the administrator's: only the broker-access Job may"
            elif variable == "AMQP_URL" and role != "admin" and secret != f"inferq-broker-{role}":
                yield _name(workload), f"AMQP_URL from {secret}, not its own user's inferq-broker-{role}"
            elif variable == "*" and secret.startswith("inferq-broker-"):
                yield _name(workload), f"envFrom the whole Secret {secret}: name the variables it needs"


def _records_access(docs: list[Manifest]) -> Iterator[tuple[str, str]]:
    """Redis asks for a password and admits only the records' clients; each of them reads
    REDIS_URL (the password in it) from the Secret REDIS_SECRET, never from the ConfigMap."""
    if "REDIS_URL" in _settings(docs):
        yield (
            "ConfigMap/inferq",
            f"REDIS_URL carries Redis's password: it belongs in the Secret {REDIS_SECRET}",
        )
    for workload, container in _containers(docs, _every_pod):
        labels = _pod_labels(workload)
        if labels.get("app.kubernetes.io/name") == "redis":
            yield from _redis_auth(workload, container)
        if not any(variable["name"] == "REDIS_URL" for variable in container.get("env", [])):
            continue
        if dict(_secret_refs(container)).get("REDIS_URL") != REDIS_SECRET:
            yield _name(workload), f"REDIS_URL not from the Secret {REDIS_SECRET}"
        if labels.get(RECORDS_CLIENT_LABEL) != "true":
            yield _name(workload), f"reads the job records without the label {RECORDS_CLIENT_LABEL}"
    for policy in (d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "redis"):
        for rule in policy["spec"].get("ingress", []):
            for source in rule.get("from", []):
                if source.get("podSelector", {}).get("matchLabels") != {RECORDS_CLIENT_LABEL: "true"}:
                    yield _name(policy), f"Redis admits pods other than those labelled {RECORDS_CLIENT_LABEL}"


def _store_access(docs: list[Manifest]) -> Iterator[tuple[str, str]]:
    """The pods that read the object store's settings carry the label its NetworkPolicies
    name (else their requests to it are dropped), and take them all from its Secret."""
    if any(name.startswith("S3_") for name in _settings(docs)):
        yield "ConfigMap/inferq", f"S3_* settings carry the store's key: they belong in {OBJECT_STORE_SECRET}"
    for workload, container in _containers(docs, _every_pod):
        reads = any(
            variable == "*" and secret == OBJECT_STORE_SECRET for variable, secret in _secret_refs(container)
        )
        if reads and _pod_labels(workload).get(STORE_CLIENT_LABEL) != "true":
            yield _name(workload), f"reads {OBJECT_STORE_SECRET} without the label {STORE_CLIENT_LABEL}"


def _redis_auth(workload: Manifest, container: Manifest) -> Iterator[tuple[str, str]]:
    """Every container of a Redis pod reads the password from the Secret; the node itself
    asks for it (and gives it to its primary), so a sentinel or a client without it is refused."""
    password = dict(_secret_refs(container)).get("REDIS_PASSWORD")
    if password != REDIS_SECRET:
        yield (
            _name(workload),
            f"container {container['name']} has no REDIS_PASSWORD from the Secret {REDIS_SECRET}",
        )
    args = [str(arg) for arg in container.get("args", [])]
    if container["name"] == "redis" and not {"--requirepass", "--masterauth"} <= set(args):
        yield (
            _name(workload),
            f"Redis runs without --requirepass and --masterauth from the Secret {REDIS_SECRET}",
        )


def _pod_labels(workload: Manifest) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"].get("labels", {})
    return labels


POLICIES: dict[str, Callable[[list[Manifest]], Iterator[tuple[str, str]]]] = {
    "schemas": schema_violations,
    "images": _images,
    "scaling": _scaling,
    "hardening": _hardening,
    "operations": _operations,
    "isolation": _isolation,
    "broker access": _broker_access,
    "records access": _records_access,
    "store access": _store_access,
    "queue counting": _queue_counting,
    "image contents": image_violations,
    "availability": _availability,
    "broker sizing": _broker_sizing,
}


def chart_pin_violations(provision_script: str) -> list[tuple[str, str]]:
    """The kube-prometheus-stack that cluster-up installs must be the one whose CRDs the
    monitors are checked against (manifests/crds/): a bump brings its CRDs along."""
    pinned = re.search(r'^PROMETHEUS_STACK_CHART_VERSION="([^"]+)"', provision_script, re.MULTILINE)
    checked = upstream_crds.PROMETHEUS_STACK_CHART_VERSION
    if pinned is None:
        return [("cluster/provision.sh", "PROMETHEUS_STACK_CHART_VERSION is not set")]
    if pinned.group(1) != checked:
        return [
            (
                "cluster/provision.sh",
                f"installs kube-prometheus-stack {pinned.group(1)}, but the monitors are checked "
                f"against {checked}'s CRDs (manifests/crds/): bring that chart's CRDs along",
            )
        ]
    return []


def violations(overlay: str, docs: list[Manifest]) -> list[Violation]:
    return [Violation(overlay, subject, rule) for check in POLICIES.values() for subject, rule in check(docs)]


def main() -> int:
    parser = argparse.ArgumentParser(prog="task cluster:verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("overlays", nargs="*", metavar="OVERLAY", help=f"default: all of {list(OVERLAYS)}")
    args = parser.parse_args()
    unknown = [name for name in args.overlays if name not in OVERLAYS]
    if unknown:
        parser.error(f"unknown overlay(s) {unknown}; expected some of {list(OVERLAYS)}")
    for problem in upstream_crds.fetch_missing():
        print(f"CRD: {problem}", file=sys.stderr)
    found: list[Violation] = []
    try:
        chosen = args.overlays or list(OVERLAYS)
        rendered = {overlay: render(OVERLAYS[overlay]) for overlay in chosen}
        monitoring = {overlay: render(MONITORING[overlay]) for overlay in chosen}
    except RenderFailed as exc:
        print(f"cannot verify: {exc}", file=sys.stderr)
        return 2
    for overlay, docs in rendered.items():
        found += violations(overlay, docs)
        found += [Violation(overlay, s, r) for s, r in monitoring_violations(monitoring[overlay], docs)]
        found += [Violation(overlay, s, r) for s, r in schema_violations(monitoring[overlay])]
        checked = f"{len(docs)} objects and {len(monitoring[overlay])} monitoring objects"
        print(f"{overlay}: {checked} rendered and checked")
    provision = (ROOT / "cluster" / "provision.sh").read_text()
    found += [Violation("cluster-up", s, r) for s, r in chart_pin_violations(provision)]
    found += [Violation("image", s, r) for s, r in torch_violations()]
    for violation in found:
        print(violation, file=sys.stderr)
    print("cluster manifests: OK" if not found else f"cluster manifests: {len(found)} violation(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
