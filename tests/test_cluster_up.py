"""`task cluster-up` and `task cluster-down` as they run, against stand-in tools.

No Kubernetes API, container engine or cloud answers on our machines, so `cluster/provision.sh`
runs here with `docker`, `kind`, `gcloud`, `gke-gcloud-auth-plugin`, `helm` and `kubectl`
replaced on PATH by one script that records every call (and what is applied) and answers
as a fresh project would: no cluster, no repository yet. `kubectl kustomize` is the real one.
Each test is a finding of the cluster review that the script got wrong before.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
REGISTRY = "europe-west4-docker.pkg.dev/acme/inferq"
STAND_IN = r"""#!/usr/bin/env bash
name="$(basename "$0")"
printf '%s %s\n' "$name" "$*" >> "$TOOLS_LOG"
case "$name" in
  kubectl)
    if [ "$1" = "-n" ]; then shift 2; fi
    case "$1" in
      kustomize) exec "$REAL_KUBECTL" "$@" ;;
      create)
        if [ "$2" = "-f" ]; then { cat "$3"; echo "---"; } >> "$TOOLS_CREATED"
        else echo "kind: Secret"; fi ;;
      get)
        case "$2" in
          deployment/*) case " ${FAKE_DEPLOYMENTS:-} " in *" ${2#deployment/} "*) ;; *) exit 1 ;; esac ;;
        esac ;;
      apply) if [ "$2 $3" = "-f -" ]; then cat >> "$TOOLS_APPLIED"; fi ;;
    esac ;;
  gcloud)
    case "$*" in
      "container clusters describe"*|"artifacts repositories describe"*) exit 1 ;;
      "storage buckets describe"*) [ -n "${FAKE_BUCKET:-}" ] || exit 1 ;;
      "iam service-accounts describe"*) exit 1 ;;
      "storage hmac create"*) printf 'GOOG1EXAMPLEACCESSID\tan-hmac-secret\n' ;;
      "projects describe"*) echo 123456 ;;
      "compute zones list"*) printf '%s\n' ${FAKE_ZONES-europe-west4-c europe-west4-a europe-west4-b} ;;
    esac ;;
  kind)
    case "$1" in
      version) echo "kind ${FAKE_KIND_VERSION:-v0.32.0} go1.24.2 linux/amd64" ;;
      load) cat > /dev/null ;;
    esac ;;
  docker) if [ "$1" = save ]; then echo "an image archive"; fi ;;
esac
exit 0
"""
TOOLS = ("docker", "kind", "gcloud", "gke-gcloud-auth-plugin", "helm", "kubectl")


class StandInIngress(http.server.BaseHTTPRequestHandler):
    """What `kubectl port-forward service/ingress` reaches, for the smoke jobs: every job
    accepted, and then in the status the test sets."""

    status: ClassVar[str] = "succeeded"
    submitted: ClassVar[list[str]] = []

    def _answer(self, code: int, body: dict[str, str]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._answer(
            200, {"status": "ok"} if self.path == "/healthz" else {"id": "j1", "status": self.status}
        )

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        StandInIngress.submitted.append(self.path)
        self._answer(202, {"id": "j1", "status": "queued"})

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def ingress() -> Iterator[int]:
    StandInIngress.status, StandInIngress.submitted = "succeeded", []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StandInIngress)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def tools(tmp_path: Path, ingress: int) -> dict[str, str]:
    real_kubectl = shutil.which("kubectl")
    if real_kubectl is None:
        pytest.skip("kubectl renders the overlays (`kubectl kustomize`)")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        (bin_dir / tool).write_text(STAND_IN)
        (bin_dir / tool).chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "REAL_KUBECTL": real_kubectl,
        "TOOLS_LOG": str(tmp_path / "calls.log"),
        "TOOLS_APPLIED": str(tmp_path / "applied.yaml"),
        "TOOLS_CREATED": str(tmp_path / "created.yaml"),
        "PROJECT": "acme",
        "ZONE": "europe-west4-a",
        "REGISTRY": REGISTRY,
        "SMOKE_PORT": str(ingress),
        "SMOKE_TIMEOUT_S": "3",
    }


def _provision(env: dict[str, str], *args: str) -> tuple[list[str], str]:
    """Run `cluster/provision.sh ARGS`; the calls it made, and what it applied."""
    done = subprocess.run(
        ["bash", "cluster/provision.sh", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    applied = Path(env["TOOLS_APPLIED"])
    return Path(env["TOOLS_LOG"]).read_text().splitlines(), applied.read_text() if applied.exists() else ""


def _index(calls: list[str], start: str) -> int:
    found = [i for i, call in enumerate(calls) if call.startswith(start)]
    assert found, f"no call starting {start!r} in {calls}"
    return found[0]


def _head_tag() -> str:
    sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return sha.stdout.strip()


def test_given_a_fresh_project_then_gke_up_enables_the_apis_makes_the_registry_and_may_pull_from_it(
    tools: dict[str, str],
) -> None:
    """Finding 2: the APIs, the repository, docker's credentials and the nodes' reader role
    were assumed, so the first push was denied or the pods sat in ImagePullBackOff."""
    calls, _applied = _provision(tools, "up", "gke")

    first_push = _index(calls, "docker push")
    steps = [
        "gcloud services enable container.googleapis.com artifactregistry.googleapis.com",
        "gcloud artifacts repositories create inferq --repository-format docker --location europe-west4",
        "gcloud auth configure-docker europe-west4-docker.pkg.dev",
        "gcloud artifacts repositories add-iam-policy-binding inferq --location europe-west4",
    ]
    assert all(_index(calls, step) < first_push for step in steps)
    binding = calls[_index(calls, steps[-1])]
    assert "--role roles/artifactregistry.reader" in binding
    assert "serviceAccount:123456-compute@developer.gserviceaccount.com" in binding


def test_given_gke_then_the_nodes_spread_over_three_zones_and_the_gpus_stay_in_zone(
    tools: dict[str, str],
) -> None:
    """Finding 14: every node in one zone, so a zone's loss took the whole broker."""
    calls, _applied = _provision(tools, "up", "gke")

    create = calls[_index(calls, "gcloud container clusters create")]
    assert "--node-locations europe-west4-a,europe-west4-b,europe-west4-c" in create
    assert "--enable-autoscaling --min-nodes 1" in create
    gpu_pool = calls[_index(calls, "gcloud container node-pools create gpu")]
    assert "--node-locations europe-west4-a " in gpu_pool


def test_given_a_region_with_fewer_than_three_zones_then_gke_up_stops_asking_for_node_zones(
    tools: dict[str, str],
) -> None:
    done = subprocess.run(
        ["bash", "cluster/provision.sh", "up", "gke"],
        cwd=ROOT,
        env={**tools, "FAKE_ZONES": "europe-west4-a europe-west4-b"},
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert done.returncode == 2
    assert "set NODE_ZONES" in done.stderr
    assert "clusters create" not in Path(tools["TOOLS_LOG"]).read_text()


def test_given_gke_then_the_images_are_amd64_and_tagged_by_the_commit(tools: dict[str, str]) -> None:
    """Findings 3 and 15: an arm64 laptop built arm64 images (exec format error on GKE's
    nodes), and the mutable tag 0.1.0 with IfNotPresent kept stale images on a re-run."""
    calls, applied = _provision(tools, "up", "gke")

    builds = [call for call in calls if call.startswith("docker build")]
    assert len(builds) == 2 and all("--platform linux/amd64" in build for build in builds)
    tag = _head_tag()
    assert f"docker push {REGISTRY}/inferq:{tag}" in " ".join(calls)
    assert f"image: {REGISTRY}/inferq:{tag}" in applied
    assert f"image: {REGISTRY}/inferq:{tag}" in applied and ":0.1.0" not in applied


def test_given_kind_then_the_image_goes_in_as_an_archive_with_the_pinned_kind(tools: dict[str, str]) -> None:
    """Findings 6 and 17: `kind load docker-image` fails on Docker's containerd image store,
    and the node image was Kubernetes 1.30 (end of life, outside KEDA 2.20's range)."""
    calls, applied = _provision(tools, "up", "kind")

    assert not any(call.startswith("kind load docker-image") for call in calls)
    assert any(call.startswith("kind load image-archive") for call in calls)
    create = calls[_index(calls, "kind create cluster")]
    assert "kindest/node:v1.36.1@sha256:" in create
    assert f"image: inferq:{_head_tag()}" in applied
    assert not any("cert-manager" in call for call in calls)


def test_given_another_kind_cli_then_up_stops_naming_the_one_it_needs(tools: dict[str, str]) -> None:
    env = {**tools, "FAKE_KIND_VERSION": "v0.20.0"}
    done = subprocess.run(
        ["bash", "cluster/provision.sh", "up", "kind"], cwd=ROOT, env=env, capture_output=True, text=True
    )

    assert done.returncode == 2
    assert "needs kind v0.32.0" in done.stderr and "found 'v0.20.0'" in done.stderr


def test_given_no_gke_auth_plugin_then_up_stops_before_touching_the_project(
    tools: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "bin" / "gke-gcloud-auth-plugin").unlink()
    # This machine has the real plugin in /usr/bin: a PATH with every system tool but it.
    system = tmp_path / "system"
    system.mkdir()
    for folder in (Path("/usr/bin"), Path("/bin")):
        for tool in folder.iterdir():
            if tool.name != "gke-gcloud-auth-plugin" and not (system / tool.name).exists():
                (system / tool.name).symlink_to(tool)
    tools = {**tools, "PATH": f"{tmp_path / 'bin'}:{system}"}
    done = subprocess.run(
        ["bash", "cluster/provision.sh", "up", "gke"], cwd=ROOT, env=tools, capture_output=True, text=True
    )

    assert done.returncode == 2
    assert "needs gke-gcloud-auth-plugin" in done.stderr
    assert not Path(tools["TOOLS_LOG"]).exists() or "gcloud" not in Path(tools["TOOLS_LOG"]).read_text()


def test_given_gke_down_then_the_disks_go_before_the_cluster_and_the_images_with_it(
    tools: dict[str, str],
) -> None:
    """Finding 16: the PVCs' disks (3 x 20 Gi + 5 Gi) and the registry's images outlived the cluster."""
    calls, _applied = _provision(tools, "down", "gke")

    assert _index(calls, "kubectl delete namespace inferq") < _index(
        calls, "gcloud container clusters delete"
    )
    assert any(call.startswith(f"gcloud artifacts docker images delete {REGISTRY}/inferq") for call in calls)


def test_given_a_fresh_project_then_gke_up_makes_the_bucket_and_a_key_allowed_on_it_alone(
    tools: dict[str, str],
) -> None:
    """Uploads and outputs by reference need a store: a Cloud Storage bucket in the cluster's
    region, a service account bound on that bucket only, and its HMAC key in the Secret
    the ingress and the workers read; `down` deletes the bucket with the cluster."""
    calls, _applied = _provision(tools, "up", "gke")
    down_calls, _ = _provision({**tools, "FAKE_BUCKET": "exists"}, "down", "gke")

    made = "gcloud storage buckets create gs://acme-inferq --project acme --location europe-west4 "
    bucket = _index(calls, made)
    account = _index(calls, "gcloud iam service-accounts create inferq-store --project acme")
    binding = _index(calls, "gcloud storage buckets add-iam-policy-binding gs://acme-inferq")
    key = _index(calls, "gcloud storage hmac create inferq-store@acme.iam.gserviceaccount.com")
    secret = _index(calls, "kubectl -n inferq create secret generic inferq-object-store")
    assert bucket < binding and account < binding < key < secret
    assert not any("add-iam-policy-binding" in call and "projects" in call.split()[:3] for call in calls)
    assert _index(down_calls, "gcloud container clusters delete") < _index(
        down_calls, "gcloud storage rm --recursive gs://acme-inferq"
    )


@pytest.mark.parametrize("roles_file", [None, "# no roles\n"], ids=["missing", "empty"])
def test_given_no_role_list_then_no_empty_secret_is_applied(
    tools: dict[str, str], tmp_path: Path, roles_file: str | None
) -> None:
    """Finding 18: a failure inside `done < <(...)` is invisible to `set -e`: the broker's
    Secrets were applied empty and the run went on. The roles now come from
    cluster/broker-roles.yaml (`task manifests`), so cluster-up needs no Python (nor torch)."""
    script = (ROOT / "cluster/provision.sh").read_text()
    functions = "".join(
        script[script.index(f"{name}() {{") : script.index("\n}\n", script.index(f"{name}() {{")) + 3]
        for name in ("secret_value", "apply_secret", "broker_secrets")
    )
    workdir = tmp_path / "checkout"
    (workdir / "cluster").mkdir(parents=True)
    if roles_file is not None:
        (workdir / "cluster" / "broker-roles.yaml").write_text(roles_file)

    done = subprocess.run(
        [
            "bash",
            "-euo",
            "pipefail",
            "-c",
            f"{functions}\nNAMESPACE=inferq VHOST=inferq\nbroker_secrets kind",
        ],
        cwd=workdir,
        env=tools,
        capture_output=True,
        text=True,
    )

    assert done.returncode != 0
    applied = Path(tools["TOOLS_APPLIED"])
    assert "inferq-broker-users" not in (applied.read_text() if applied.exists() else "")
    assert "broker-roles.yaml" in done.stderr


def _documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def _workers(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        doc["metadata"]["name"]: doc
        for doc in docs
        if doc["kind"] == "Deployment" and doc["metadata"]["name"].startswith("worker-")
    }


def test_given_a_new_cluster_then_each_models_workers_are_created_at_zero_and_applied_without_a_count(
    tools: dict[str, str], tmp_path: Path
) -> None:
    """Finding 12: a worker Deployment without a count started one pod (on GKE, a GPU node)
    before KEDA's first decision; a count in the applied manifest would take KEDA's back
    on every re-run."""
    calls, applied = _provision(tools, "up", "kind")

    created = _workers(_documents((tmp_path / "created.yaml").read_text()))
    assert sorted(created) == ["worker-echo", "worker-embed-minilm"]
    assert all(doc["spec"]["replicas"] == 0 for doc in created.values())
    applied_workers = _workers(_documents(applied))
    assert sorted(applied_workers) == sorted(created)
    assert all("replicas" not in doc["spec"] for doc in applied_workers.values())
    # Created as applied otherwise: the same pod template.
    assert all(
        created[name]["spec"]["template"] == doc["spec"]["template"] for name, doc in applied_workers.items()
    )
    assert _index(calls, "kubectl create -f") < _index(calls, "kubectl apply -f -")


def test_given_workers_already_running_then_a_re_run_leaves_their_count_to_keda(
    tools: dict[str, str], tmp_path: Path
) -> None:
    _provision({**tools, "FAKE_DEPLOYMENTS": "worker-echo worker-embed-minilm"}, "up", "kind")

    assert not (tmp_path / "created.yaml").exists()


def test_given_cluster_up_then_it_ends_with_a_job_on_every_model(tools: dict[str, str]) -> None:
    """Finding 7: nothing ran a job through a model at the end, so a pool that could never
    scale reported success."""
    calls, _applied = _provision(tools, "up", "kind")

    assert StandInIngress.submitted == ["/v1/models/echo/jobs", "/v1/models/embed-minilm/jobs"]
    assert any(call.startswith("kubectl -n inferq port-forward service/ingress") for call in calls)


def test_given_a_model_whose_pod_is_never_placed_then_gke_up_fails_saying_where_to_look(
    tools: dict[str, str],
) -> None:
    StandInIngress.status = "queued"
    done = subprocess.run(
        ["bash", "cluster/provision.sh", "up", "gke"],
        cwd=ROOT,
        env=tools,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert done.returncode == 1
    assert "smoke job j1 on echo ended 'queued'" in done.stderr
    assert "GPU quota" in done.stderr and "europe-west4" in done.stderr
