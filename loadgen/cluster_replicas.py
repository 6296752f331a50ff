"""Replicas per model in a cluster, for `task loadgen --target ... --kube-namespace NS`.

Reads each worker Deployment (`worker-{model}`: replicas ready to serve) and the HPA
KEDA made for its ScaledObject (`keda-hpa-worker-{model}`: the replicas it wants) with
the kubernetes Python client, its one home. The client is synchronous: each read runs in
a thread so the load generator's arrivals keep their schedule.
"""

from __future__ import annotations

import asyncio

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError


class ClusterReplicas:
    def __init__(self, namespace: str, models: tuple[str, ...], api: client.ApiClient | None = None) -> None:
        if api is None:
            try:
                config.load_incluster_config()  # type: ignore[no-untyped-call]
            except config.ConfigException:
                config.load_kube_config()  # type: ignore[no-untyped-call]
            api = client.ApiClient()
        self._apps = client.AppsV1Api(api)
        self._autoscaling = client.AutoscalingV2Api(api)
        self._namespace = namespace
        self._models = models

    async def read(self) -> dict[str, int]:
        """`{model}`: ready replicas; `{model} desired`: what the HPA asks for (when it exists)."""
        return await asyncio.to_thread(self._read)

    def _read(self) -> dict[str, int]:
        replicas: dict[str, int] = {}
        for model in self._models:
            try:
                deployment = self._apps.read_namespaced_deployment_status(f"worker-{model}", self._namespace)
                replicas[model] = int(deployment.status.ready_replicas or 0) if deployment.status else 0
                hpa = self._autoscaling.read_namespaced_horizontal_pod_autoscaler_status(
                    f"keda-hpa-worker-{model}", self._namespace
                )
                if hpa.status is not None:
                    replicas[f"{model} desired"] = int(hpa.status.desired_replicas or 0)
            except (ApiException, HTTPError):
                continue  # not there (yet), or the API is away: this second has no figure
        return replicas
