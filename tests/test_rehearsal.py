"""The rehearsal's parts that decide what a pod gets (`task cluster:rehearse` itself runs in
.ci/run: pods, probes, jobs, Prometheus; about 3 minutes): the staged image, a pod's
environment, args and volumes, and the targets the monitors select."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from manifests.cluster_verify import OVERLAYS, render
from manifests.monitoring_verify import MONITORING
from rehearsal.cluster_secrets import make_secrets
from rehearsal.image_stage import stage_image
from rehearsal.pods import Pod, make_pod
from rehearsal.prometheus import scrape_targets
from rehearsal.run import Report, _verdict

DOCS = render(OVERLAYS["kind"])
MONITORS = [d for d in render(MONITORING["kind"]) if d["kind"] in ("ServiceMonitor", "PodMonitor")]


def _workload(kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    return make_secrets(tmp_path_factory.mktemp("secrets") / "s", "kind", ("admin", "pw"))


def _pod(tmp_path: Path, kind: str, name: str, secrets: dict[str, dict[str, str]], address: str) -> Pod:
    config_maps = {d["metadata"]["name"]: dict(d.get("data", {})) for d in DOCS if d["kind"] == "ConfigMap"}
    image = (tmp_path / "app", tmp_path / "python", {"HOME": "/tmp", "HF_HUB_OFFLINE": "1"})
    return make_pod(
        _workload(kind, name),
        address,
        tmp_path / name,
        [],
        image=image,
        config_maps=config_maps,
        secrets=secrets,
    )


def test_the_staged_image_imports_what_the_dockerfile_copies_and_nothing_from_the_checkout(
    tmp_path: Path,
) -> None:
    image = stage_image(tmp_path / "image")

    def imports(module: str) -> subprocess.CompletedProcess[str]:
        code = f"import {module}; print({module}.__file__)"
        return subprocess.run(
            [str(image.python), "-c", code], cwd="/", capture_output=True, text=True, timeout=60
        )

    copied = imports("broker_access")
    assert copied.returncode == 0 and copied.stdout.startswith(str(image.app)), copied.stderr
    left_out = imports("bench")  # the benchmarks are not in the image
    assert left_out.returncode != 0 and "No module named 'bench'" in left_out.stderr
    assert image.env["HF_HUB_OFFLINE"] == "1"


def test_a_pod_gets_its_env_from_the_downward_api_secrets_and_config_map(
    tmp_path: Path, secrets: dict[str, dict[str, str]]
) -> None:
    pod = _pod(tmp_path, "Deployment", "worker-echo", secrets, "198.18.77.20")

    assert pod.env["RAY_NODE_IP"] == "198.18.77.20"
    assert pod.env["AMQP_URL"] == secrets["inferq-broker-worker-echo"]["AMQP_URL"]
    assert pod.env["QUEUE_TYPE"] == "quorum"
    assert pod.env["HOME"] == str(tmp_path / "worker-echo" / "v" / "tmp")  # /tmp is its emptyDir
    assert pod.command == [str(tmp_path / "python"), "-m", "ray_workers.pod", "worker", "echo"]
    assert pod.ports == {"health": 8080, "metrics": 9102}


def test_a_pods_args_expand_its_variables_and_see_its_volumes_where_they_are_mounted(
    tmp_path: Path, secrets: dict[str, dict[str, str]]
) -> None:
    redis = _pod(tmp_path, "StatefulSet", "redis", secrets, "198.18.77.21")
    job = _pod(tmp_path, "Job", "broker-access", secrets, "198.18.77.22")

    node, sentinel, exporter = redis.containers
    assert node.command[:2] == ["/bin/sh", str(tmp_path / "redis" / "v" / "scripts" / "redis.sh")]
    assert Path(node.command[1]).read_text().startswith("set -eu")  # the ConfigMap's key, as a file
    assert node.command[node.command.index("--requirepass") + 1] == secrets["inferq-redis"]["password"]
    assert node.command[node.command.index("--dir") + 1] == str(tmp_path / "redis" / "v" / "data")
    assert sentinel.env["SENTINEL_CONFIG"] == str(tmp_path / "redis" / "v" / "sentinel" / "sentinel.conf")
    assert sentinel.cwd == tmp_path / "redis" / "v" / "sentinel"
    assert exporter.command == ["/usr/bin/prometheus-redis-exporter"]
    assert redis.ports == {"redis": 6379, "sentinel": 26379, "metrics": 9121}
    passwords = Path(job.command[job.command.index("--passwords-dir") + 1])
    assert (passwords / "ingress").read_text() == secrets["inferq-broker-users"]["ingress"]


def test_the_monitors_select_ready_pods_on_their_named_ports_and_the_broker_for_the_operator_service(
    tmp_path: Path, secrets: dict[str, dict[str, str]]
) -> None:
    pods = [
        _pod(tmp_path, "Deployment", name, secrets, f"198.18.77.{30 + i}")
        for i, name in enumerate(["ingress", "callbacks", "worker-echo", "push-scaler"])
    ]
    for pod in pods[:3]:
        pod.ready = True

    targets = {
        (t.job, t.address) for t in scrape_targets(MONITORS, DOCS, pods, {"prometheus": "127.0.0.1:15692"})
    }

    assert targets == {
        ("ServiceMonitor/ingress", "198.18.77.30:8000"),
        ("PodMonitor/ray-replicas", "198.18.77.31:9102"),
        ("PodMonitor/ray-replicas", "198.18.77.32:9102"),
        ("ServiceMonitor/rabbitmq", "127.0.0.1:15692"),
    }


def test_an_alert_that_holds_on_the_healthy_rehearsal_fails_it() -> None:
    """The records' Redis without replicas in sync (InferqRecordsDegraded holding) is caught,
    not reported as merely evaluated."""
    report = Report(
        alerts=[
            {"name": "InferqRecordsDegraded", "error": None, "series": 1},
            {"name": "InferqJobsParked", "error": None, "series": 0},
        ]
    )

    _verdict(report)

    assert report.failures == ["alert InferqRecordsDegraded holds on the healthy rehearsal (1 series)"]


def test_a_records_failover_that_does_not_complete_fails_the_rehearsal() -> None:
    report = Report(
        records_failover={"primary_lost": "redis-0", "error": "a replica promoted: not within 60 s"}
    )

    _verdict(report)

    assert report.failures == ["the records' primary lost: a replica promoted: not within 60 s"]
