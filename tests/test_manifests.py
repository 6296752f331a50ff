"""`task manifests`: the committed ScaledObjects and worker Deployments are what the
catalogue implies, a changed catalogue shows as drift until they are rewritten, and what
is generated from any catalogue validates (KEDA's CRDs, kubernetes-validate) and carries
the catalogue's figures."""

from __future__ import annotations

import re
import shutil
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from autoscaler.scaling_policy import policy_from_scaled_object
from manifests.cluster_verify import schema_violations
from manifests.rendering import drifted, rendered_files, write
from manifests.scaled_objects import scaled_object
from manifests.worker_deployments import worker_deployment
from model_catalogue.catalogue import Catalogue, load_catalogue
from tests.conftest import require_upstream_crds
from wire.topology import Topology

ROOT = Path(__file__).resolve().parent.parent

USER_CATALOGUE = """
models:
  echo:
    class: ray_workers.models.echo:EchoModel
  vision:
    class: acme.vision:Model
    resources: {cpus: 0.5, memory: 3Gi, gpus: 2}
    scaling:
      {min_replicas: 1, max_replicas: 6, backlog_per_replica: 40, cooldown_s: 90, polling_interval_s: 2}
  probe:
    class: acme.probe:Model
    test_only: true
"""


def _catalogue(tmp_path: Path, text: str = USER_CATALOGUE) -> Catalogue:
    path = tmp_path / "models.yaml"
    path.write_text(textwrap.dedent(text))
    return load_catalogue(path)


def _copy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    for folder in ("keda", "cluster"):
        shutil.copytree(ROOT / folder, root / folder)
    return root


def test_the_committed_manifests_are_what_the_catalogue_implies() -> None:
    assert drifted(load_catalogue(), ROOT) == [], "the catalogue changed: run `task manifests` and commit"


def test_a_changed_catalogue_is_drift_until_the_manifests_are_rewritten(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    catalogue = _catalogue(tmp_path)

    before = drifted(catalogue, root)
    written = write(catalogue, root)
    after = drifted(catalogue, root)

    # vision is new, embed-minilm left the catalogue, echo's figures went back to the defaults.
    expected = [
        "cluster/base/workers.yaml",
        "cluster/broker-roles.yaml",
        "cluster/components/quorum/kustomization.yaml",
        "keda/kustomization.yaml",
        "keda/scaledobject-echo.yaml",
        "keda/scaledobject-embed-minilm.yaml",
        "keda/scaledobject-vision.yaml",
    ]
    assert before == written == expected
    assert after == []
    assert sorted(p.name for p in (root / "keda").glob("scaledobject-*.yaml")) == [
        "scaledobject-echo.yaml",
        "scaledobject-vision.yaml",
    ], "a test-only model gets no manifests, and a removed model's ScaledObject goes"
    assert (root / "keda" / "triggerauthentication.yaml").exists(), "only generated files are touched"


def test_generated_objects_validate_and_carry_the_catalogues_figures(tmp_path: Path) -> None:
    vision = _catalogue(tmp_path).entry("vision")
    scaled = scaled_object(vision)
    deployment = worker_deployment(vision)

    require_upstream_crds()
    assert list(schema_violations([scaled, deployment])) == []
    policy = policy_from_scaled_object(scaled)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}

    assert (policy.model, policy.target_per_replica, policy.high_target_per_replica) == ("vision", 40, 4)
    summed = [q for q in Topology().job_queues("vision") if re.fullmatch(policy.queue_name, q)]
    lanes = ("", ".lane1", ".lane2", ".lane3")
    assert (
        summed
        == list(Topology().job_queues("vision"))
        == [*(f"jobs.vision.high{lane}" for lane in lanes), *(f"jobs.vision{lane}" for lane in lanes)]
    )
    assert not re.fullmatch(policy.queue_name, "jobs.vision.parked")
    assert (policy.min_replicas, policy.max_replicas, policy.cooldown_s, policy.polling_interval_s) == (
        1,
        6,
        90,
        2,
    )
    assert (policy.fallback_replicas, policy.fallback_behavior) == (1, "currentReplicasIfHigher")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"] == "worker-vision"
    assert "replicas" not in deployment["spec"], "KEDA owns the count"
    assert container["resources"] == {
        "requests": {"cpu": "500m", "memory": "3Gi"},
        "limits": {"memory": "3Gi", "nvidia.com/gpu": "2"},
    }
    assert (env["WORKER_NUM_GPUS"], env["WORKER_PROCESSES_PER_GPU"]) == ("2", "1")
    assert env["MODEL_THREADS"] == "1", "half a CPU still runs one thread"
    assert container["command"][-2:] == ["worker", "vision"]


@pytest.mark.parametrize(
    ("resources", "threads"),
    [
        ("{cpus: 4}", "4"),
        ("{cpus: 6, gpus: 1, processes_per_gpu: 4}", "1"),
        ("{cpus: 8, gpus: 1, processes_per_gpu: 2}", "4"),
    ],
)
def test_a_worker_process_runs_as_many_model_threads_as_its_share_of_the_pods_cpus(
    tmp_path: Path, resources: str, threads: str
) -> None:
    text = f"models:\n  m:\n    class: acme.m:Model\n    resources: {resources}\n"
    (container,) = worker_deployment(_catalogue(tmp_path, text).entry("m"))["spec"]["template"]["spec"][
        "containers"
    ]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MODEL_THREADS"] == threads


def test_every_generated_file_says_what_it_does_and_where_it_comes_from(tmp_path: Path) -> None:
    for path, text in rendered_files(_catalogue(tmp_path), tmp_path).items():
        first, second = text.splitlines()[:2]
        docs: list[dict[str, Any]] = [d for d in yaml.safe_load_all(text) if d]

        assert first.startswith("# Behaviour: "), path
        assert "Generated by `task manifests` from models.yaml" in second, path
        assert docs, path


def test_the_cluster_serves_the_catalogues_models() -> None:
    (config,) = yaml.safe_load_all((ROOT / "cluster" / "base" / "config.yaml").read_text())
    catalogue = load_catalogue()

    served = config["data"]["MODELS"].split(",")
    assert served == [name for name in catalogue.names if name not in catalogue.test_only]
    assert not {k for k in config["data"] if k.startswith("BATCH_")}, "a BATCH_* here overrides every model's"
