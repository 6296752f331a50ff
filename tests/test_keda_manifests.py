"""Every manifest in keda/ validates against the real KEDA CRDs and keeps its invariants.

The CRDs are the upstream files at their pinned commit (`manifests.upstream_crds`: KEDA_CRD_DIR,
../shared/schemas or the cache). Where none can be found or fetched the schema test
skips and says why (fails under CI), as every CRD-dependent test does; the invariants
are checked regardless.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from autoscaler.scaling_policy import InvalidScaledObject, policy_from_scaled_object
from manifests import upstream_crds
from ray_workers.settings import WorkerSettings
from tests.conftest import require_upstream_crds
from wire.job_chunk import CHUNK_JOBS

ROOT = Path(__file__).resolve().parent.parent
KEDA_DIR = ROOT / "keda"
SERVED_MODELS = ("echo", "embed-minilm")


def _documents() -> list[tuple[Path, dict[str, Any]]]:
    docs: list[tuple[Path, dict[str, Any]]] = []
    for path in sorted(KEDA_DIR.glob("*.yaml")):
        docs.extend(
            (path, doc)
            for doc in yaml.safe_load_all(path.read_text())
            if doc and doc["kind"] != "Kustomization"
        )
    return docs


def _with_chunk_trigger(pattern: str) -> dict[str, Any]:
    """A regex trigger on echo's queues, and a chunk-backlog one on `pattern`."""
    chunks = _regex_trigger(pattern)["triggers"][0] | {"name": "chunk-backlog"}
    return {"triggers": [*_regex_trigger("^(jobs\\.echo)$")["triggers"], chunks]}


def _with_high_trigger(pattern: str) -> dict[str, Any]:
    """A regex trigger on echo's queues, and a high-backlog one on `pattern`."""
    high = _regex_trigger(pattern)["triggers"][0] | {"name": "high-backlog"}
    return {"triggers": [*_regex_trigger("^(jobs\\.echo)$")["triggers"], high]}


def _scaled_objects() -> list[dict[str, Any]]:
    return [doc for _path, doc in _documents() if doc["kind"] == "ScaledObject"]


def _regex_trigger(pattern: str, operation: str = "sum") -> dict[str, Any]:
    metadata = {"protocol": "http", "mode": "QueueLength", "value": "5", "useRegex": "true"}
    return {
        "triggers": [
            {"type": "rabbitmq", "metadata": {**metadata, "queueName": pattern, "operation": operation}}
        ]
    }


def _schema(kind: str, api_version: str) -> dict[str, Any]:
    require_upstream_crds()
    upstream = upstream_crds.crd_for("keda.sh", kind)
    crd_path = upstream_crds.locate(upstream) if upstream is not None else None
    if crd_path is None:
        raise AssertionError(f"{kind} is not an upstream KEDA CRD this project pins")
    crd = yaml.safe_load(crd_path.read_text())
    version = api_version.split("/")[1]
    for served in crd["spec"]["versions"]:
        if served["name"] == version:
            schema: dict[str, Any] = served["schema"]["openAPIV3Schema"]
            return schema
    raise AssertionError(f"{kind} {api_version} is not a version in {crd_path}")


@pytest.mark.parametrize(("path", "doc"), _documents(), ids=lambda v: v.name if isinstance(v, Path) else "")
def test_manifest_validates_against_the_keda_crd(path: Path, doc: dict[str, Any]) -> None:
    assert doc["apiVersion"].startswith("keda.sh/"), path
    jsonschema.validate(doc, _schema(doc["kind"], doc["apiVersion"]))


@pytest.mark.parametrize("doc", _scaled_objects(), ids=lambda d: d["metadata"]["name"])
def test_each_scaled_object_says_the_behaviour_its_fields_produce(doc: dict[str, Any]) -> None:
    """The first line is what an operator reads; its figures must be the manifest's own."""
    policy = policy_from_scaled_object(doc)
    path = KEDA_DIR / f"scaledobject-{policy.model}.yaml"
    said = re.fullmatch(
        r"# Behaviour: .* one replica per (\d+) jobs of backlog \(per (\d+) high-priority ones\) up to (\d+)"
        r".* back to 0 after (\d+) (min|s) .*",
        path.read_text().splitlines()[0],
    )
    assert said is not None, f"{path.name}: first line must say the per-replica backlog, maximum and cooldown"
    per_replica, per_high_replica, maximum, idle = map(int, said.groups()[:4])
    assert per_replica == policy.target_per_replica
    assert per_high_replica == policy.high_target_per_replica
    assert policy.chunk_target_per_replica == per_replica / CHUNK_JOBS  # a chunk is CHUNK_JOBS jobs
    assert maximum == policy.max_replicas
    assert idle * (60 if said.group(5) == "min" else 1) == policy.cooldown_s


def test_every_served_model_has_exactly_one_scaled_object() -> None:
    models = sorted(policy_from_scaled_object(doc).model for doc in _scaled_objects())
    assert models == sorted(SERVED_MODELS)


@pytest.mark.parametrize("doc", _scaled_objects(), ids=lambda d: d["metadata"]["name"])
def test_scaled_object_invariants(doc: dict[str, Any]) -> None:
    spec = doc["spec"]
    trigger = spec["triggers"][0]
    policy = policy_from_scaled_object(doc)
    drain_timeout_s = WorkerSettings().drain_timeout_s
    assert spec["minReplicaCount"] == 0, "scale to zero"
    assert trigger["metadata"]["protocol"] == "http", "unacked jobs must count as load"
    assert policy.polling_interval_s <= 10, "scale-from-zero detection must be quick"
    assert policy.cooldown_s > drain_timeout_s + 30, "cooldown must outlast the worst batch plus the drain"
    assert policy.max_replicas >= 2 and spec["fallback"]["replicas"] >= 1
    assert spec["scaleTargetRef"]["name"] == f"worker-{policy.model}"
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 0, "scale up fast on a spike"
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 60, "scale down gently"
    # Credentials only through a TriggerAuthentication: nothing secret inline.
    assert not {"host", "hostFromEnv", "password", "username"} & set(trigger["metadata"])
    auth_names = {d["metadata"]["name"] for _p, d in _documents() if d["kind"] == "TriggerAuthentication"}
    assert trigger["authenticationRef"]["name"] in auth_names


@pytest.mark.parametrize("doc", _scaled_objects(), ids=lambda d: d["metadata"]["name"])
def test_each_scaled_object_is_woken_by_the_push_scaler_in_cluster(doc: dict[str, Any]) -> None:
    policy = policy_from_scaled_object(doc)
    (push,) = [t for t in doc["spec"]["triggers"] if t["type"] == "external-push"]
    base = sorted((ROOT / "cluster" / "base").glob("*.yaml"))
    cluster_docs = [d for p in base for d in yaml.safe_load_all(p.read_text()) if d]
    (service,) = [
        d for d in cluster_docs if d["kind"] == "Service" and d["metadata"]["name"] == "push-scaler"
    ]
    (port,) = [p["port"] for p in service["spec"]["ports"]]

    assert push["metadata"]["model"] == policy.model
    expected = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc:{port}"
    assert push["metadata"]["scalerAddress"] == expected


def test_trigger_authentication_reads_a_secret() -> None:
    auths = [doc for _path, doc in _documents() if doc["kind"] == "TriggerAuthentication"]
    assert auths
    for auth in auths:
        refs = auth["spec"]["secretTargetRef"]
        assert {ref["parameter"] for ref in refs} == {"host"}
        assert all(ref["name"] and ref["key"] for ref in refs)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"minReplicaCount": 5, "maxReplicaCount": 2}, "minReplicaCount=5"),
        ({"pollingInterval": 0}, "pollingInterval=0"),
        (
            {
                "triggers": [
                    {
                        "type": "rabbitmq",
                        "metadata": {
                            "protocol": "amqp",
                            "mode": "QueueLength",
                            "queueName": "jobs.echo",
                            "value": "5",
                        },
                    }
                ]
            },
            "protocol='amqp'",
        ),
        (
            {
                "triggers": [
                    {
                        "type": "rabbitmq",
                        "metadata": {
                            "protocol": "http",
                            "mode": "QueueLength",
                            "queueName": "jobs.echo",
                            "value": "0",
                        },
                    }
                ]
            },
            "value=0",
        ),
        (
            {
                "triggers": [
                    {
                        "type": "rabbitmq",
                        "metadata": {
                            "protocol": "http",
                            "mode": "QueueLength",
                            "queueName": "jobs.echo",
                            "value": "5",
                        },
                    },
                    {"type": "external-push", "metadata": {"scalerAddress": "x:1", "model": "other"}},
                ]
            },
            "external-push trigger model='other'",
        ),
        ({"triggers": [{"type": "cpu", "metadata": {}}]}, "expected one rabbitmq trigger"),
        (_regex_trigger("^(jobs\\.other)$"), "does not match jobs.echo"),
        (_regex_trigger("^(jobs\\.echo$"), "is not a regex"),
        (_regex_trigger("^(jobs\\.echo)$", operation="max"), "operation='max'; expected sum"),
        (_with_high_trigger("^(jobs\\.echo.*)$"), "must match jobs.echo.high and not jobs.echo"),
        (_with_high_trigger("^(jobs\\.echo\\.low)$"), "must match jobs.echo.high and not jobs.echo"),
        (_with_chunk_trigger("^(jobs\\.echo.*)$"), "must match jobs.echo.chunks and not jobs.echo"),
    ],
)
def test_a_broken_scaled_object_is_refused_naming_the_value(change: dict[str, Any], message: str) -> None:
    from autoscaler.scaling_policy import InvalidScaledObject

    doc = _scaled_objects()[0]
    broken = {**doc, "spec": {**doc["spec"], **change}}
    with pytest.raises(InvalidScaledObject, match=message.replace("(", r"\(")):
        policy_from_scaled_object(broken)


def test_a_regex_trigger_names_its_model_by_label_and_sums_the_topologys_queues() -> None:
    (doc,) = [d for d in _scaled_objects() if d["metadata"]["name"] == "worker-echo"]
    unlabelled = {**doc, "metadata": {"name": "worker-echo"}}

    assert policy_from_scaled_object(doc).model == "echo"
    with pytest.raises(InvalidScaledObject, match=r"useRegex needs the inferq\.dev/model label"):
        policy_from_scaled_object(unlabelled)
