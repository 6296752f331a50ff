"""The Kubernetes manifests in cluster/: valid core objects (kubernetes-validate, offline),
a RabbitmqCluster valid against the operator's CRD, and what KEDA's ScaledObjects need:
each scale target exists, leaves its replica count to KEDA, and outlives its drain on SIGTERM."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CRD_DIR = Path(os.environ.get("RABBITMQ_CRD_DIR", ROOT.parent / "shared" / "schemas" / "rabbitmq"))
KUBERNETES_VERSION = "1.30"


def _documents(folder: str) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted((ROOT / folder).glob("*.yaml")):
        docs.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return docs


CORE = [d for d in _documents("cluster") if d["apiVersion"] in ("v1", "apps/v1", "networking.k8s.io/v1")]
DEPLOYMENTS = {d["metadata"]["name"]: d for d in CORE if d["kind"] == "Deployment"}


@pytest.mark.parametrize("doc", CORE, ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_core_objects_validate_against_the_kubernetes_schemas(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_rabbitmq_cluster_validates_against_the_operator_crd() -> None:
    crd_path = CRD_DIR / "rabbitmq.com_rabbitmqclusters.yaml"
    if not crd_path.exists():
        pytest.skip(f"RabbitMQ operator CRD not found at {CRD_DIR}; set RABBITMQ_CRD_DIR")
    crd = yaml.safe_load(crd_path.read_text())
    (cluster,) = [d for d in _documents("cluster") if d["kind"] == "RabbitmqCluster"]
    version = cluster["apiVersion"].split("/")[1]
    schema = next(v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == version)
    jsonschema.validate(cluster, schema)
    assert "rabbitmq_management" in cluster["spec"]["rabbitmq"]["additionalPlugins"], (
        "KEDA reads the management API"
    )


@pytest.mark.parametrize(
    "scaled",
    [d for d in _documents("keda") if d["kind"] == "ScaledObject"],
    ids=lambda d: d["metadata"]["name"],
)
def test_each_scale_target_exists_is_left_to_keda_and_outlives_its_drain(scaled: dict[str, Any]) -> None:
    (config,) = [d for d in CORE if d["kind"] == "ConfigMap"]
    drain_s = float(config["data"]["DRAIN_TIMEOUT_S"])
    target = DEPLOYMENTS[scaled["spec"]["scaleTargetRef"]["name"]]
    pod = target["spec"]["template"]["spec"]
    assert "replicas" not in target["spec"], "KEDA owns the count: an apply must not reset it"
    assert pod["terminationGracePeriodSeconds"] > drain_s
    model = scaled["spec"]["triggers"][0]["metadata"]["queueName"].removeprefix("jobs.")
    assert pod["containers"][0]["command"][-2:] == ["worker", model]


def test_the_job_records_redis_keeps_its_data_and_every_pod_points_at_it() -> None:
    (config,) = [d for d in CORE if d["kind"] == "ConfigMap"]
    (redis,) = [d for d in CORE if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "redis"]
    (service,) = [d for d in CORE if d["kind"] == "Service" and d["metadata"]["name"] == "redis"]
    container = redis["spec"]["template"]["spec"]["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}

    assert config["data"]["REDIS_URL"] == f"redis://redis.{service['metadata']['namespace']}.svc:6379/0"
    assert service["spec"]["selector"] == redis["spec"]["selector"]["matchLabels"]
    assert container["args"][:2] == ["--appendonly", "yes"]  # every write reaches the volume
    assert [t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]] == ["data"]
    assert mounts["data"] == container["args"][container["args"].index("--dir") + 1]


def test_only_keda_reaches_the_push_scaler_and_its_service_fronts_its_pods() -> None:
    (deployment,) = [d for d in CORE if d["kind"] == "Deployment" and d["metadata"]["name"] == "push-scaler"]
    (service,) = [d for d in CORE if d["kind"] == "Service" and d["metadata"]["name"] == "push-scaler"]
    (policy,) = [d for d in CORE if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "push-scaler"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    (rule,) = policy["spec"]["ingress"]

    assert container["command"] == ["python", "-m", "push_scaler"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert [p["port"] for p in rule["ports"]] == [p["containerPort"] for p in container["ports"]]
    assert rule["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "keda"}


def test_every_container_image_is_used_as_built_never_pulled_for_a_moving_tag() -> None:
    for doc in CORE:
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            name = f"{doc['kind']}/{doc['metadata']['name']}/{container['name']}"
            assert container.get("imagePullPolicy") == "IfNotPresent", name
