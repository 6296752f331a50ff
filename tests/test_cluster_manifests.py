"""The cluster as `kubectl kustomize` renders each overlay (kind, gke): every object valid
and every rule of `task cluster:verify` kept; each rule fails on a manifest that breaks
it; and what KEDA, the broker and the job records need of the objects holds."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from local_stack.ha_cluster import ADVANCED_CONFIG
from manifests.cluster_verify import OVERLAYS, chart_pin_violations, render, schema_violations, violations
from manifests.exported_metrics import label_names, metric_names
from manifests.image_contents import DOCKERFILE, image_violations, torch_violations
from manifests.monitoring_verify import MONITORING, monitoring_violations
from settings.environment import Environment
from tests.conftest import require_upstream_crds

Manifest = dict[str, Any]
RENDERED = {overlay: render(path) for overlay, path in OVERLAYS.items()}


def _one(docs: list[Manifest], kind: str, name: str) -> Manifest:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _container(docs: list[Manifest], name: str) -> Manifest:
    container: Manifest = _one(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]
    return container


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_each_overlay_renders_valid_objects_that_keep_every_rule(overlay: str) -> None:
    require_upstream_crds()
    assert violations(overlay, RENDERED[overlay]) == []


def _set(path: list[Any], value: Any) -> Callable[[Manifest], None]:
    def change(doc: Any) -> None:
        for key in path[:-1]:
            doc = doc[key]
        doc[path[-1]] = value

    return change


def _drop(path: list[Any]) -> Callable[[Manifest], None]:
    def change(doc: Any) -> None:
        for key in path[:-1]:
            doc = doc[key]
        del doc[path[-1]]

    return change


CONTAINER: list[Any] = ["spec", "template", "spec", "containers", 0]
POD: list[Any] = ["spec", "template", "spec"]
# (rule broken, object changed, change, words of the violation)
BREAKS = [
    ("moving tag", ("Deployment", "ingress"), _set([*CONTAINER, "image"], "inferq:latest"), "is not pinned"),
    ("untagged", ("Deployment", "ingress"), _set([*CONTAINER, "image"], "inferq"), "is not pinned"),
    (
        "pull policy",
        ("Deployment", "ingress"),
        _set([*CONTAINER, "imagePullPolicy"], "Always"),
        "imagePullPolicy",
    ),
    (
        "replicas on a KEDA target",
        ("Deployment", "worker-echo"),
        _set(["spec", "replicas"], 0),
        "KEDA scales it",
    ),
    ("root", ("Deployment", "callbacks"), _drop([*POD, "securityContext", "runAsNonRoot"]), "runAsNonRoot"),
    ("token", ("Deployment", "worker-echo"), _drop([*POD, "automountServiceAccountToken"]), "automount"),
    (
        "writable root",
        ("Deployment", "push-scaler"),
        _set([*CONTAINER, "securityContext", "readOnlyRootFilesystem"], False),
        "readOnlyRootFilesystem",
    ),
    (
        "no probe",
        ("Deployment", "worker-embed-minilm"),
        _drop([*CONTAINER, "readinessProbe"]),
        "no readinessProbe",
    ),
    ("no limit", ("StatefulSet", "redis"), _drop([*CONTAINER, "resources", "limits"]), "memory limit"),
    ("invalid core field", ("Deployment", "ingress"), _set(["spec", "replica"], 2), "invalid apps/v1"),
    ("invalid CR field", ("ScaledObject", "worker-echo"), _set(["spec", "pollingInterval"], "5s"), "its CRD"),
    (
        "another role's broker user",
        ("Deployment", "worker-echo"),
        _set([*CONTAINER, "env", 0, "valueFrom", "secretKeyRef", "name"], "inferq-broker-ingress"),
        "not its own user's inferq-broker-worker-echo",
    ),
    (
        "the administrator's credentials",
        ("Deployment", "ingress"),
        _set([*CONTAINER, "envFrom"], [{"secretRef": {"name": "inferq-broker-admin"}}]),
        "the administrator's",
    ),
    (
        "a broker client with no user",
        ("Deployment", "callbacks"),
        _drop(["spec", "template", "metadata", "labels", "inferq.dev/broker-role"]),
        "without the label inferq.dev/broker-role",
    ),
    ("components declaring", ("ConfigMap", "inferq"), _set(["data", "DECLARE_TOPOLOGY"], "true"), "must be"),
    (
        "a queue the model's jobs are not in",
        ("ScaledObject", "worker-echo"),
        _set(["spec", "triggers", 0, "metadata", "queueName"], "jobs.echo.parked"),
        "counts ['jobs.echo.parked'], but echo's jobs wait in ['jobs.echo.high',",
    ),
    (
        "Redis without a password",
        ("StatefulSet", "redis"),
        _drop([*CONTAINER, "args", 0]),
        "without --requirepass",
    ),
    (
        "REDIS_URL in the ConfigMap",
        ("ConfigMap", "inferq"),
        _set(["data", "REDIS_URL"], "redis://redis.inferq.svc:6379/0"),
        "belongs in the Secret inferq-redis",
    ),
    (
        "REDIS_URL from another Secret",
        ("Deployment", "ingress"),
        _set([*CONTAINER, "env", 3, "valueFrom", "secretKeyRef", "name"], "inferq"),
        "REDIS_URL not from the Secret inferq-redis",
    ),
    (
        "a records client Redis would not admit",
        ("Deployment", "callbacks"),
        _drop(["spec", "template", "metadata", "labels", "inferq.dev/records-client"]),
        "without the label inferq.dev/records-client",
    ),
    (
        "a store client the store's policies would not let out",
        ("Deployment", "worker-echo"),
        _drop(["spec", "template", "metadata", "labels", "inferq.dev/store-client"]),
        "without the label inferq.dev/store-client",
    ),
    (
        "the store's key in the ConfigMap",
        ("ConfigMap", "inferq"),
        _set(["data", "S3_SECRET_ACCESS_KEY"], "minio-secret"),
        "belong in inferq-object-store",
    ),
    (
        "Redis open to every broker client",
        ("NetworkPolicy", "redis"),
        _set(
            ["spec", "ingress", 0, "from", 0, "podSelector", "matchLabels"],
            {"inferq.dev/broker-client": "true"},
        ),
        "admits pods other than",
    ),
    (
        "a root Job",
        ("Job", "broker-access"),
        _drop([*POD, "securityContext", "runAsNonRoot"]),
        "runAsNonRoot",
    ),
    # Cluster finding 12: one push scaler behind every model's external-push trigger.
    ("a lone push scaler", ("Deployment", "push-scaler"), _set(["spec", "replicas"], 1), "pins every model"),
    (
        "push scalers sharing a queue",
        ("Deployment", "push-scaler"),
        _drop([*CONTAINER, "env", 1]),
        "would share one queue",
    ),
    # Cluster finding 13: the StatefulSet governed by the ordinary Service `redis`.
    (
        "a non-headless governing Service",
        ("StatefulSet", "redis"),
        _set(["spec", "serviceName"], "redis"),
        "is not a headless Service",
    ),
    # Cluster finding 14: no Pod Security Admission labels; the broker's nodes free to share one.
    (
        "no pod security level",
        ("Namespace", "inferq"),
        _drop(["metadata", "labels", "pod-security.kubernetes.io/enforce"]),
        "Pod Security Admission",
    ),
]


@pytest.mark.parametrize(("rule", "target", "change", "words"), BREAKS, ids=[b[0] for b in BREAKS])
def test_each_rule_fails_on_a_manifest_that_breaks_it(
    rule: str, target: tuple[str, str], change: Callable[[Manifest], None], words: str
) -> None:
    require_upstream_crds()
    docs = copy.deepcopy(RENDERED["kind"])
    change(_one(docs, *target))

    found = [str(v) for v in violations("kind", docs)]
    assert any(f"{target[0]}/{target[1]}" in v and words in v for v in found), found


BROKER_GAPS = [
    ("one CPU", _set(["spec", "resources", "requests", "cpu"], "1"), "production minimum is 2"),
    ("one zone", _drop(["spec", "override"]), "no spread over zones"),
    ("alarms by default", _set(["spec", "rabbitmq", "additionalConfig"], ""), "is not stated"),
    (
        "partitions",
        _set(["spec", "rabbitmq", "additionalConfig"], "disk_free_limit.relative = 1.0"),
        "pause_minority",
    ),
    (
        "memory over-committed",
        _set(["spec", "resources", "requests", "memory"], "1Gi"),
        "requested as limited",
    ),
]


@pytest.mark.parametrize(("gap", "change", "words"), BROKER_GAPS, ids=[g[0] for g in BROKER_GAPS])
def test_given_gkes_brokers_below_the_operators_production_guidance_then_it_is_caught(
    gap: str, change: Callable[[Manifest], None], words: str
) -> None:
    """Finding 14: 1 CPU / 2 Gi per node, the alarms left to defaults, one zone."""
    docs = copy.deepcopy(RENDERED["gke"])
    change(_one(docs, "RabbitmqCluster", "rabbitmq"))

    found = [str(v) for v in violations("gke", docs)]
    assert any("RabbitmqCluster/rabbitmq" in v and words in v for v in found), found


@pytest.mark.parametrize(
    ("rule", "remove", "words"),
    [
        ("default deny", ("NetworkPolicy", "default-deny"), "no default-deny NetworkPolicy"),
        ("disruption budget", ("PodDisruptionBudget", "worker-echo"), "no PodDisruptionBudget"),
        ("scale target", ("Deployment", "worker-echo"), "its scale target is not a Deployment"),
        ("trigger auth", ("TriggerAuthentication", "rabbitmq-management"), "authenticationRef"),
    ],
)
def test_each_cross_object_rule_fails_when_its_object_is_missing(
    rule: str, remove: tuple[str, str], words: str
) -> None:
    docs = [d for d in RENDERED["kind"] if (d["kind"], d["metadata"]["name"]) != remove]
    assert any(words in str(v) for v in violations("kind", docs))


def test_a_kind_with_no_crd_to_check_it_against_is_a_violation() -> None:
    require_upstream_crds()
    probe = {"apiVersion": "monitoring.coreos.com/v1", "kind": "Probe", "metadata": {"name": "x"}}
    (found,) = violations("kind", [*RENDERED["kind"], probe])
    assert found.rule.startswith("no CRD for monitoring.coreos.com/v1 Probe to validate it against")


def test_kind_runs_every_model_on_cpu_with_one_small_broker() -> None:
    docs = RENDERED["kind"]
    minilm = _container(docs, "worker-embed-minilm")
    env = {e["name"]: e.get("value") for e in minilm["env"]}

    assert "nvidia.com/gpu" not in str(docs)
    assert env["WORKER_NUM_GPUS"] == "0" and minilm["image"] == "inferq:0.1.0"
    assert _one(docs, "RabbitmqCluster", "rabbitmq")["spec"]["replicas"] == 1


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_clusters_run_the_quorum_topology_and_each_model_scales_on_its_three_queues_summed(
    overlay: str,
) -> None:
    require_upstream_crds()
    docs = RENDERED[overlay]
    trigger = _one(docs, "ScaledObject", "worker-embed-minilm")["spec"]["triggers"][0]["metadata"]

    broker = _one(docs, "RabbitmqCluster", "rabbitmq")["spec"]["rabbitmq"]

    assert _one(docs, "ConfigMap", "inferq")["data"]["QUEUE_TYPE"] == "quorum"
    assert (trigger["useRegex"], trigger["operation"]) == ("true", "sum")
    # The dead-letter confirm timeout the local HA cluster is tested with (test_ha_cluster).
    assert broker["advancedConfig"] == ADVANCED_CONFIG
    assert violations(overlay, docs) == []


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (_set(["spec", "triggers", 0, "metadata", "operation"], "max"), "must be summed"),
        (_set(["spec", "triggers", 0, "metadata", "queueName"], "^jobs\\.echo\\..*$"), "jobs.echo.parked"),
        (_set(["spec", "triggers", 0, "metadata", "queueName"], "^jobs\\.echo\\.high$"), "counts ["),
    ],
)
def test_a_quorum_scaled_object_that_misses_or_overcounts_a_queue_is_caught(
    change: Callable[[Manifest], None], words: str
) -> None:
    docs = copy.deepcopy(RENDERED["gke"])
    change(_one(docs, "ScaledObject", "worker-echo"))

    assert any(words in str(v) for v in violations("gke", docs)), violations("gke", docs)


def test_gke_puts_gpu_models_on_the_gpu_pool_and_speaks_tls_to_three_brokers() -> None:
    docs = RENDERED["gke"]
    minilm = _one(docs, "Deployment", "worker-embed-minilm")["spec"]["template"]["spec"]
    echo = _one(docs, "Deployment", "worker-echo")["spec"]["template"]["spec"]
    rabbitmq = _one(docs, "RabbitmqCluster", "rabbitmq")["spec"]

    assert minilm["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert minilm["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert minilm["containers"][0]["image"].endswith(":0.1.0-cuda")
    assert "nodeSelector" not in echo and echo["containers"][0]["image"].endswith(":0.1.0")
    assert rabbitmq["replicas"] == 3 and rabbitmq["tls"]["disableNonTLSListeners"] is True
    assert "rabbitmq_management" in rabbitmq["rabbitmq"]["additionalPlugins"], "KEDA reads the management API"


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_each_scale_target_outlives_its_drain_and_runs_its_model(overlay: str) -> None:
    docs = RENDERED[overlay]
    drain_s = float(_one(docs, "ConfigMap", "inferq")["data"]["DRAIN_TIMEOUT_S"])
    for scaled in (d for d in docs if d["kind"] == "ScaledObject"):
        target = _one(docs, "Deployment", scaled["spec"]["scaleTargetRef"]["name"])
        pod = target["spec"]["template"]["spec"]
        model = scaled["metadata"]["labels"].get("inferq.dev/model")
        assert pod["terminationGracePeriodSeconds"] > drain_s
        expected = ["callbacks"] if model is None else ["worker", model]
        assert pod["containers"][0]["command"][3:] == expected


def test_the_pods_read_their_settings_and_a_valid_configuration() -> None:
    docs = RENDERED["kind"]
    config = _one(docs, "ConfigMap", "inferq")["data"]
    health = _container(docs, "worker-echo")

    Environment.read(config)  # the ConfigMap's values pass the services' own validation
    assert {p["containerPort"] for p in health["ports"]} == {8080, 9102}
    assert health["livenessProbe"]["httpGet"]["path"] == "/livez"


def test_the_job_records_redis_keeps_its_data_and_every_pod_points_at_its_sentinels() -> None:
    """Finding 13: one Redis, so every drain was an outage of status and `Prefer: wait`."""
    docs = RENDERED["kind"]
    config = _one(docs, "ConfigMap", "inferq")
    redis = _one(docs, "StatefulSet", "redis")
    service = _one(docs, "Service", redis["spec"]["serviceName"])
    containers = {c["name"]: c for c in redis["spec"]["template"]["spec"]["containers"]}
    node = containers["redis"]
    mounts = {m["name"]: m["mountPath"] for m in node["volumeMounts"]}
    provision = (OVERLAYS["kind"].parent.parent / "provision.sh").read_text()

    assert "REDIS_URL" not in config["data"]  # it carries the password: the Secret inferq-redis
    assert 'REDIS_URL="redis+sentinel://:$redis_password@$sentinels/inferq/0"' in provision
    assert redis["spec"]["replicas"] == 3 and set(containers) == {"redis", "sentinel", "exporter"}
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert {p["port"] for p in service["spec"]["ports"]} == {6379, 26379}
    args = node["args"]
    assert args[args.index("--appendonly") + 1] == "yes"  # every write reaches the volume
    assert args[args.index("--min-replicas-to-write") + 1] == "1"  # cut off, a primary takes no writes
    assert [t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]] == ["data"]
    assert mounts["data"] == args[args.index("--dir") + 1]
    (budget,) = [
        d
        for d in docs
        if d["kind"] == "PodDisruptionBudget"
        and d["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "redis"}
    ]
    assert budget["spec"]["maxUnavailable"] == 1  # a drain takes one node of three


def test_only_keda_reaches_the_push_scaler_and_its_service_fronts_its_pods() -> None:
    docs = RENDERED["kind"]
    deployment = _one(docs, "Deployment", "push-scaler")
    service = _one(docs, "Service", "push-scaler")
    policy = _one(docs, "NetworkPolicy", "push-scaler")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    (rule,) = policy["spec"]["ingress"]

    assert container["command"] == ["python", "-m", "push_scaler"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert [p["port"] for p in rule["ports"]] == [p["containerPort"] for p in container["ports"]]
    assert rule["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "keda"}


def test_webhooks_leave_only_for_public_addresses() -> None:
    policy = _one(RENDERED["kind"], "NetworkPolicy", "callbacks-to-public-webhooks")
    (rule,) = policy["spec"]["egress"]
    (block,) = rule["to"]

    assert block["ipBlock"]["cidr"] == "0.0.0.0/0"
    assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"} <= set(
        block["ipBlock"]["except"]
    )


MONITORING_DOCS = {overlay: render(MONITORING[overlay]) for overlay in OVERLAYS}


def _monitoring_with(change: Callable[[list[Manifest]], None], overlay: str = "kind") -> list[str]:
    docs = copy.deepcopy(MONITORING_DOCS[overlay])
    change(docs)
    return [f"{subject}: {rule}" for subject, rule in monitoring_violations(docs, RENDERED[overlay])]


def _rules() -> list[Manifest]:
    (rules,) = [d for d in MONITORING_DOCS["kind"] if d["kind"] == "PrometheusRule"]
    found: list[Manifest] = rules["spec"]["groups"][0]["rules"]
    return found


def _rule(docs: list[Manifest], index: int = 0) -> Manifest:
    (rules,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    rule: Manifest = rules["spec"]["groups"][0]["rules"][index]
    return rule


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_the_monitoring_scrapes_what_each_overlay_runs_and_its_promql_is_sound(overlay: str) -> None:
    assert monitoring_violations(MONITORING_DOCS[overlay], RENDERED[overlay]) == []


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_the_monitors_are_valid_against_the_pinned_charts_crds(overlay: str) -> None:
    assert list(schema_violations(MONITORING_DOCS[overlay])) == []


def test_given_a_monitor_the_pinned_crds_refuse_then_it_is_caught() -> None:
    docs = copy.deepcopy(MONITORING_DOCS["kind"])
    (monitor, *_) = [d for d in docs if d["kind"] == "PodMonitor"]
    monitor["spec"]["podMetricsEndpoints"][0]["interval"] = 15  # a number where a duration goes

    found = [f"{s}: {r}" for s, r in schema_violations(docs)]

    assert any("PodMonitor" in line and "invalid against its CRD" in line for line in found), found


def test_given_the_two_year_old_chart_then_verify_says_its_crds_are_not_the_ones_checked() -> None:
    """Finding 17: kube-prometheus-stack 65.1.1 was two years older than the rest."""
    provision = (OVERLAYS["kind"].parent.parent / "provision.sh").read_text()
    old = provision.replace(
        'PROMETHEUS_STACK_CHART_VERSION="88.5.3"', 'PROMETHEUS_STACK_CHART_VERSION="65.1.1"'
    )

    assert chart_pin_violations(provision) == []
    assert any("65.1.1" in rule and "88.5.3" in rule for _, rule in chart_pin_violations(old))


def test_given_the_brokers_tls_only_service_then_a_plain_metrics_port_is_caught() -> None:
    """Cluster finding 9: with TLS the operator's Service has `prometheus-tls` (15691) and
    no `prometheus` (15692); the plain monitoring scraped a port GKE's broker lacks."""
    found = [f"{s}: {r}" for s, r in monitoring_violations(MONITORING_DOCS["kind"], RENDERED["gke"])]

    assert "ServiceMonitor/rabbitmq: a selected object has none of the ports ['prometheus']" in found
    (endpoint,) = _one(MONITORING_DOCS["gke"], "ServiceMonitor", "rabbitmq")["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["scheme"]) == ("prometheus-tls", "https")
    assert endpoint["tlsConfig"]["ca"]["secret"] == {"name": "rabbitmq-ca", "key": "ca.crt"}


def test_a_metric_nothing_exports_is_caught_in_a_rule() -> None:
    found = _monitoring_with(
        lambda docs: _rule(docs).update(expr="rate(ray_inferq_worker_jobz_total[5m]) > 0")
    )
    assert any("['ray_inferq_worker_jobz_total'] exported by nothing" in v for v in found), found


def test_given_the_keda_series_removed_in_2_17_then_the_scaler_alert_is_caught() -> None:
    """Cluster finding 10: KEDA 2.20 exports keda_scaled_object_errors_total and
    keda_scaler_detail_errors_total; an alert on keda_scaler_errors_total never fires."""
    (index,) = [i for i, rule in enumerate(_rules()) if rule.get("alert") == "InferqScalerErrors"]
    found = _monitoring_with(
        lambda docs: _rule(docs, index).update(
            expr='sum by (scaledObject) (rate(keda_scaler_errors_total{namespace="inferq"}[5m])) > 0'
        )
    )
    assert any("['keda_scaler_errors_total'] exported by nothing" in v for v in found), found


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_given_a_queue_matcher_for_classic_queues_then_the_quorum_overlays_catch_it(overlay: str) -> None:
    """Cluster finding 11: both overlays run the quorum topology (jobs.<model>.<priority>);
    a depth panel on `jobs\\.[^.]+` (classic names) showed nothing on every cluster."""
    found = _monitoring_with(
        lambda docs: _rule(docs).update(
            expr='sum by (queue) (rabbitmq_detailed_queue_messages{queue=~"jobs\\\\.[^.]+"}) > 0'
        ),
        overlay,
    )
    assert any("queue=~'jobs\\\\.[^.]+' selects none of the overlay's queues" in v for v in found), found


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_given_ray_on_loopback_in_a_scraped_pod_then_it_is_caught(overlay: str) -> None:
    """Cluster finding 8: Ray started on 127.0.0.1 binds its metrics exporter to loopback;
    the PodMonitor scrapes the pod IP, so the workers' and the dispatcher's panels stayed empty."""
    platform = copy.deepcopy(RENDERED[overlay])
    for workload in (d for d in platform if d["kind"] == "Deployment"):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            container["env"] = [e for e in container.get("env", []) if e["name"] != "RAY_NODE_IP"]

    found = [f"{s}: {r}" for s, r in monitoring_violations(MONITORING_DOCS[overlay], platform)]

    scraped = {"Deployment/callbacks", "Deployment/worker-echo", "Deployment/worker-embed-minilm"}
    assert {v.split(": ")[0] for v in found if "RAY_NODE_IP" in v} == scraped, found


def test_a_rule_promtool_refuses_is_caught() -> None:
    found = _monitoring_with(
        lambda docs: _rule(docs).update(expr="sum(rate(ray_inferq_worker_jobs_total[5m]")
    )
    assert any("PrometheusRule/inferq: promtool check rules" in v for v in found), found


def test_a_monitor_that_selects_nothing_or_scrapes_a_missing_port_is_caught() -> None:
    def retarget(docs: list[Manifest]) -> None:
        ingress = _one(docs, "ServiceMonitor", "ingress")
        ingress["spec"]["selector"]["matchLabels"] = {"app.kubernetes.io/component": "nothing"}
        _one(docs, "PodMonitor", "ray-replicas")["spec"]["podMetricsEndpoints"][0]["port"] = "stats"

    found = _monitoring_with(retarget)
    assert "ServiceMonitor/ingress: selects nothing the platform renders" in found
    assert "PodMonitor/ray-replicas: a selected object has none of the ports ['stats']" in found


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (le, model) (rate(a_bucket{x=~"y|z"}[5m]))', {"a_bucket"}),
        ("b_total / on (job) group_left c > 0.1", {"b_total", "c"}),
        ("histogram_quantile(0.99, sum without (pod) (rate(d_bucket[1m]))) offset 5m", {"d_bucket"}),
        ("max(e) == 2 and f unless g", {"e", "f", "g"}),
    ],
)
def test_the_metric_names_of_a_promql_expression(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_a_label_no_series_of_its_metric_carries_is_caught() -> None:
    """Cluster finding 20: a PromQL label that is not on the series (misspelt, or a label
    another metric has) selects or groups nothing, and the panel is silently empty."""

    def mislabel(docs: list[Manifest]) -> None:
        dashboard_map = next(d for d in docs if d["kind"] == "ConfigMap")
        name, text = next(iter(dashboard_map["data"].items()))
        dashboard = json.loads(text)
        dashboard["panels"][4]["targets"][0]["expr"] = (
            "sum by (modle) (rate(ray_inferq_worker_jobs_total[1m]))"
        )
        dashboard["panels"][6]["targets"][0]["expr"] = (
            'rate(inferq_ingress_jobs_accepted_total{tenant="a"}[1m])'
        )
        dashboard_map["data"][name] = json.dumps(dashboard)

    found = _monitoring_with(mislabel)

    assert any("labels ['modle'] are on none of its series" in v for v in found), found
    assert any("labels ['tenant'] are on none of its series" in v for v in found), found
    assert label_names('sum by (le, model) (rate(a_bucket{x=~"y|z", q!="a=b"}[5m])) / on (job) c') == {
        "le",
        "model",
        "x",
        "q",
        "job",
    }


def test_given_the_image_without_a_package_a_component_imports_then_verify_names_it() -> None:
    """Cluster finding 1: the Dockerfile copied every package but broker_access/, so the
    broker-access Job died with "No module named broker_access" and no component got its
    broker user."""
    dockerfile = DOCKERFILE.read_text()
    without = dockerfile.replace("COPY broker_access ./broker_access\n", "")
    assert without != dockerfile

    found = [f"{s}: {r}" for s, r in image_violations(RENDERED["kind"], without)]

    assert found == [
        "Job/broker-access: runs `python -m broker_access`, which needs ['broker_access']: "
        "not COPYed into the image"
    ]
    assert list(image_violations(RENDERED["kind"], dockerfile)) == []


def test_given_three_broker_nodes_then_they_need_a_budget_and_anti_affinity() -> None:
    """Cluster finding 14: the gke overlay's three RabbitMQ nodes had no PodDisruptionBudget
    and nothing kept two of them off one Kubernetes node (whose loss takes a quorum)."""
    docs = copy.deepcopy(RENDERED["gke"])
    del _one(docs, "RabbitmqCluster", "rabbitmq")["spec"]["affinity"]
    docs = [d for d in docs if (d["kind"], d["metadata"]["name"]) != ("PodDisruptionBudget", "rabbitmq")]

    found = [str(v) for v in violations("gke", docs)]

    assert "gke: RabbitmqCluster/rabbitmq: no PodDisruptionBudget selects the broker's pods" in found
    assert any("RabbitmqCluster/rabbitmq: several broker nodes and no podAntiAffinity" in v for v in found)
    assert not [
        v for v in violations("gke", RENDERED["gke"]) if "broker nodes" in str(v) or "broker's pods" in str(v)
    ]


def test_given_redis_without_its_exporter_or_alerts_then_it_is_caught() -> None:
    """Finding 13: no exporter and no alert, so the job records could fill or stop unseen."""
    platform = copy.deepcopy(RENDERED["kind"])
    pod = _one(platform, "StatefulSet", "redis")["spec"]["template"]["spec"]
    pod["containers"] = [c for c in pod["containers"] if c["name"] != "exporter"]
    docs = copy.deepcopy(MONITORING_DOCS["kind"])
    (rules,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    group = rules["spec"]["groups"][0]
    group["rules"] = [r for r in group["rules"] if "redis_" not in r["expr"]]

    found = [f"{s}: {r}" for s, r in monitoring_violations(docs, platform)]

    assert "StatefulSet/redis: no monitor scrapes an exporter of it" in found
    assert "StatefulSet/redis: no alert reads redis_up" in found
    assert "StatefulSet/redis: no alert reads redis_instance_info" in found


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (("whl/cu126 torch==2.13.0", "whl/cu128 torch==2.13.0"), "not built for the index cu128"),
        (("whl/cu126 torch==2.13.0", "whl/cu126 torch==2.12.0"), "pyproject.toml pins 2.13.0"),
    ],
)
def test_given_a_torch_the_index_does_not_carry_then_verify_names_it(
    change: tuple[str, str], words: str
) -> None:
    """Finding 4: nothing checked that the pinned torch exists on the CUDA index the image uses."""
    dockerfile = DOCKERFILE.read_text()
    assert list(torch_violations(dockerfile)) == []

    found = [rule for _, rule in torch_violations(dockerfile.replace(*change))]

    assert any(words in rule for rule in found), found
