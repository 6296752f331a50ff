"""The rehearsal, start to end: the kind overlay rendered, its Secrets made by cluster-up's
own functions, the broker-access Job run to completion, then Redis and every Deployment's
pod, each in its own network namespace, probed as declared; a job per served model
through the rehearsed ingress with a verified callback; Prometheus scraping what the
monitors select; every dashboard panel and alert asked of it.

What it cannot rehearse, and says so: KEDA's scaling (each worker runs one pod, as if
KEDA had woken it), the operators (the RabbitMQ cluster is the broker on
this machine, reached as the Service `rabbitmq`; the overlay's quorum topology on its one
node), NetworkPolicy enforcement, GPUs, and what only kube-state-metrics or KEDA export.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import secrets as random_secrets
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from loadgen.callback_receiver import CallbackReceiver
from manifests.cluster_verify import OVERLAYS, render
from manifests.monitoring_verify import MONITORING, selector_matches
from rehearsal.cluster_secrets import make_secrets
from rehearsal.image_stage import stage_image
from rehearsal.pod_network import HOST_ADDRESS, PodNetwork
from rehearsal.pods import Pod, Probe, make_pod
from rehearsal.prometheus import SCRAPE_INTERVAL_S, Prometheus, scrape_targets, unrehearsed_sources
from rehearsal.records_failover import rehearse_failover

Manifest = dict[str, Any]
OVERLAY = "kind"
WORKLOAD_KINDS = ("Job", "StatefulSet", "Deployment")
BROKER = "127.0.0.1"
MANAGEMENT = f"http://{BROKER}:15672"
READY_TIMEOUT_S = 300.0
JOB_TIMEOUT_S = 180.0
PROMETHEUS_PORT = 19090
CANNOT_REHEARSE = (
    "KEDA's scaling: a worker (created at 0 by cluster-up) runs one pod, as if KEDA woke it",
    "the operators: RabbitMQ is the broker on this machine (one node, the overlay's quorum topology)",
    "NetworkPolicy enforcement",
    "GPUs: GPU models run on the CPU, as in the kind overlay",
    "series only kube-state-metrics or KEDA export (their panels are listed as not rehearsed)",
)
DEVIATIONS = (
    "ConfigMap inferq gains CALLBACK_ALLOW_HOSTS=198.18.77.1: the rehearsal's webhook receiver "
    "sits on the bridge's host address, which the callback-URL guard rightly refuses",
    f"scrape interval {SCRAPE_INTERVAL_S} s instead of 15 s, so the run is short",
    "processes run as this machine's root: its Python lives where no other user may read "
    "(task cluster:verify checks the users, read-only roots and dropped capabilities)",
    "MinIO is moto's S3-compatible server (no MinIO binary installs here; rehearsal/minio_stand_in.py) "
    "on the pod's address and port, with MinIO's health endpoints; Secret inferq-object-store's "
    "S3_PUBLIC_ENDPOINT_URL names that pod's address instead of kind's port-forward",
)
# Over OUTPUT_INLINE_MAX_BYTES (256 KiB): the echo's output goes to the store as well.
BY_REFERENCE_INPUT = {"rehearsal": "by reference", "text": "x" * 300_000}
# JSON Lines over one output part (8 MiB), compact as echo writes them back: the worker
# streams it and writes its output to the store in parts (a multipart upload).
BY_REFERENCE_LINES = b"".join(b'{"n":%d,"text":"%s"}\n' % (n, b"y" * 1000) for n in range(10_000))


@dataclass
class PodReport:
    name: str
    ready: bool
    address: str
    probe_failures: dict[str, int] = field(default_factory=dict)
    exit_code: int | None = None
    log_tail: str = ""


@dataclass
class Report:
    pods: list[PodReport] = field(default_factory=list)
    jobs_succeeded: int = 0
    jobs: list[dict[str, Any]] = field(default_factory=list)
    panels: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    targets: dict[str, str] = field(default_factory=dict)
    cannot_rehearse: tuple[str, ...] = CANNOT_REHEARSE
    deviations: tuple[str, ...] = DEVIATIONS
    records_failover: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


async def _forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def broker_service() -> AsyncIterator[None]:
    """The Service `rabbitmq` at the bridge's host address: AMQP forwarded to the broker on
    loopback (the management API already listens on every interface)."""

    async def connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(BROKER, 5672)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_forward(reader, upstream_writer), _forward(upstream_reader, writer))

    server = await asyncio.start_server(connect, HOST_ADDRESS, 5672)
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


class BrokerAdmin:
    """The operator's part: an administrator on the broker (its `rabbitmq-default-user`),
    and afterwards the removal of everything the rehearsal made there."""

    def __init__(self, tag: str) -> None:
        self.user = f"inferq-rehearsal-{tag}"
        self.password = random_secrets.token_hex(16)
        self._auth = aiohttp.BasicAuth("guest", "guest")

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> None:
        url = f"{MANAGEMENT}{path}"
        async with (
            aiohttp.ClientSession(auth=self._auth) as session,
            session.request(method, url, json=body) as answer,
        ):
            if answer.status >= 400 and not (method == "DELETE" and answer.status == 404):
                raise RuntimeError(f"management API {method} {path}: {answer.status} {await answer.text()}")

    async def create(self) -> None:
        # The operator's RabbitMQ image serves rabbitmq_prometheus; this broker may not yet.
        enable = ["rabbitmq-plugins", "enable", "rabbitmq_prometheus"]
        await asyncio.to_thread(subprocess.run, enable, capture_output=True, timeout=120)
        await self._call(
            "PUT", f"/api/users/{self.user}", {"password": self.password, "tags": "administrator"}
        )

    async def remove(self, users: list[str]) -> None:
        await self._call("DELETE", "/api/vhosts/inferq")
        for user in [*users, self.user]:
            await self._call("DELETE", f"/api/users/{user}")


async def _all_pass(probes: list[Probe], pod: Pod) -> bool:
    return all([await probe.passes(pod) for probe in probes])


async def _probe_loop(pod: Pod, report: PodReport) -> None:
    """The kubelet's probing: startup until it passes, then readiness and liveness each on
    its own period; the pod is ready while every container's readiness passes."""
    startups = pod.probes("startupProbe")
    if startups:
        failures = 0
        while not await _all_pass(startups, pod):
            failures += 1
            report.probe_failures["startup"] = failures
            if failures >= max(p.failure_threshold for p in startups) or pod.exited() is not None:
                return
            await asyncio.sleep(min(p.period_s for p in startups))
    readiness, liveness = pod.probes("readinessProbe"), pod.probes("livenessProbe")
    threshold = max((p.failure_threshold for p in readiness), default=1)
    period_s = min((p.period_s for p in readiness), default=5.0)
    liveness_period_s = min((p.period_s for p in liveness), default=10.0)
    consecutive = 0
    next_liveness = time.monotonic()
    while pod.exited() is None:
        passed = await _all_pass(readiness, pod)
        consecutive = 0 if passed else consecutive + 1
        if not passed:
            report.probe_failures["readiness"] = report.probe_failures.get("readiness", 0) + 1
        pod.ready = passed or (pod.ready and consecutive < threshold)
        if liveness and time.monotonic() >= next_liveness:
            if not await _all_pass(liveness, pod):
                report.probe_failures["liveness"] = report.probe_failures.get("liveness", 0) + 1
            next_liveness = time.monotonic() + liveness_period_s
        await asyncio.sleep(period_s)
    pod.ready = False


async def _run_job(pod: Pod, report: PodReport, timeout_s: float = 180) -> bool:
    limit = int(pod.workload["spec"].get("backoffLimit", 6))
    for _attempt in range(min(limit, 3) + 1):
        pod.start()
        await _until(lambda: pod.exited() is not None, timeout_s)
        pod.stop()
        report.exit_code = pod.exited()
        if report.exit_code == 0:
            return True
    return False


async def _submit_jobs(
    ingress: Pod, api_key: str, models: list[str], receiver: CallbackReceiver, report: Report
) -> None:
    inputs = {"echo": {"hello": "rehearsal"}, "embed-minilm": "a sentence to embed in the rehearsal"}
    headers = {"Authorization": f"Bearer {api_key}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        for model in models:
            body = {"input": inputs.get(model, "rehearsal"), "callback_url": receiver.url}
            url = f"http://{ingress.address}:{ingress.ports['http']}/v1/models/{model}/jobs"
            async with session.post(url, json=body) as answer:
                text = await answer.text()
                job = {"model": model, "submit_status": answer.status}
                if answer.status == 202:
                    job["id"] = json.loads(text)["id"]
                else:
                    job["error"] = text[:500]
                report.jobs.append(job)
    wanted = [job for job in report.jobs if "id" in job]
    with contextlib.suppress(TimeoutError, AssertionError):
        await receiver.wait_for(len(wanted), JOB_TIMEOUT_S)
    events = {c.event["data"]["id"]: c for c in receiver.received}
    for job in wanted:
        callback = events.get(job["id"])
        job["callback"] = (
            None if callback is None else {"type": callback.event["type"], "verified": callback.verified}
        )
        if callback is not None and callback.verified and callback.event["type"] == "job.succeeded":
            report.jobs_succeeded += 1


async def _submit_by_reference(
    ingress: Pod,
    api_key: str,
    receiver: CallbackReceiver,
    report: Report,
    data: bytes,
    input_format: str,
) -> None:
    """An echo job whose input the rehearsal uploads to the store (MinIO's stand-in) and
    whose output the worker writes there: its callback's output_url downloads as the input."""
    base = f"http://{ingress.address}:{ingress.ports['http']}"
    job: dict[str, Any] = {"model": f"echo (input and output by reference, {input_format})"}
    report.jobs.append(job)
    already = len(receiver.received)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {api_key}"}) as session:
        async with session.post(f"{base}/v1/uploads") as created:
            upload = await created.json()
            job["submit_status"] = created.status
        if created.status != 201:
            job["error"] = f"POST /v1/uploads: {created.status} {str(upload)[:300]}"
            return
        async with aiohttp.ClientSession() as direct, direct.put(upload["upload_url"], data=data) as put:
            if put.status != 200:
                job["error"] = f"PUT to the store: {put.status} {(await put.text())[:300]}"
                return
        body = {"input_ref": upload["input_ref"], "input_format": input_format, "callback_url": receiver.url}
        async with session.post(f"{base}/v1/models/echo/jobs", json=body) as answer:
            job["submit_status"] = answer.status
            if answer.status != 202:
                job["error"] = (await answer.text())[:500]
                return
            job["id"] = (await answer.json())["id"]
    with contextlib.suppress(TimeoutError, AssertionError):
        await receiver.wait_for(already + 1, JOB_TIMEOUT_S)
    callback = next((c for c in receiver.received if c.event["data"]["id"] == job["id"]), None)
    if callback is None:
        return
    job["callback"] = {"type": callback.event["type"], "verified": callback.verified}
    output_url = callback.event["data"].get("output_url")
    if output_url is None:
        job["error"] = f"no output_url in the callback: {str(callback.event['data'])[:300]}"
        return
    async with aiohttp.ClientSession() as direct, direct.get(output_url) as output:
        downloaded = await output.read()
    same = output.status == 200 and (
        downloaded == data if input_format == "jsonl" else json.loads(downloaded) == json.loads(data)
    )
    if not same:
        job["error"] = f"the output at output_url ({output.status}, {len(downloaded)} bytes) is not the input"
    elif callback.verified and callback.event["type"] == "job.succeeded":
        report.jobs_succeeded += 1


async def _evaluate(prometheus: Prometheus, monitoring: list[Manifest], report: Report) -> None:
    for doc in monitoring:
        if doc["kind"] == "ConfigMap" and doc["metadata"].get("labels", {}).get("grafana_dashboard") == "1":
            for text in doc["data"].values():
                for panel in json.loads(text)["panels"]:
                    exprs = [t["expr"] for t in panel.get("targets", [])]
                    counts = [await prometheus.query(expr) for expr in exprs]
                    series = sum(count for count, _error in counts)
                    errors = [error for _count, error in counts if error]
                    sources = set().union(*(unrehearsed_sources(expr) for expr in exprs))
                    entry: dict[str, Any] = {"title": panel["title"], "series": series}
                    if errors:
                        entry["error"] = "; ".join(errors)
                    if not series and sources and all(unrehearsed_sources(expr) for expr in exprs):
                        entry["not_rehearsed"] = f"its series come from {', '.join(sorted(sources))}"
                    report.panels.append(entry)
        if doc["kind"] == "PrometheusRule":
            for group in doc["spec"]["groups"]:
                for rule in group["rules"]:
                    count, error = await prometheus.query(str(rule["expr"]))
                    report.alerts.append(
                        {"name": rule.get("alert", rule.get("record")), "error": error, "series": count}
                    )


def _quiet(series: int) -> str:
    return "evaluated, quiet" if not series else f"evaluated, holds ({series} series)"


def _verdict(report: Report) -> None:
    report.failures += [f"pod {p.name} is not ready" for p in report.pods if not p.ready]
    report.failures += [
        f"job on {job['model']}: {job.get('error') or job.get('callback') or 'no callback'}"
        for job in report.jobs
        if "error" in job
        or not (job.get("callback") or {}).get("verified")
        or (job.get("callback") or {}).get("type") != "job.succeeded"
    ]
    report.failures += [
        f"panel {panel['title']!r} has no series{': ' + panel['error'] if 'error' in panel else ''}"
        for panel in report.panels
        if not panel["series"] and "not_rehearsed" not in panel
    ]
    report.failures += [
        f"alert {alert['name']}: {alert['error']}" for alert in report.alerts if alert["error"]
    ]
    failover = report.records_failover
    if failover and ("error" in failover or failover.get("replicas_after_rejoin", 0) < 2):
        report.failures.append(f"the records' primary lost: {failover.get('error') or failover}")
    # The rehearsed platform is healthy: an alert whose expression holds there is wrong, or
    # what it watches is (the records' three Redis nodes without a primary or replicas).
    report.failures += [
        f"alert {alert['name']} holds on the healthy rehearsal ({alert['series']} series)"
        for alert in report.alerts
        if not alert["error"] and alert["series"]
    ]


def summary(report: Report) -> str:
    lines = ["cluster rehearsal (kind overlay)", ""]
    lines += [
        f"  pod {p.name:<24} {p.address:<14} {'ready' if p.ready else 'NOT READY'} {p.probe_failures or ''}"
        for p in report.pods
    ]
    lines += ["", f"  jobs: {report.jobs_succeeded} of {len(report.jobs)} called back verified and succeeded"]
    for panel in report.panels:
        state = panel.get("not_rehearsed") or f"{panel['series']} series"
        lines.append(f"  panel {panel['title']!r}: {state}")
    lines += [
        f"  alert {a['name']}: {'error: ' + a['error'] if a['error'] else _quiet(a['series'])}"
        for a in report.alerts
    ]
    failover = report.records_failover
    if failover and "error" not in failover:
        lines.append(
            f"  records' primary {failover['primary_lost']} stopped: {failover['promoted']} promoted after "
            f"{failover['promoted_after_s']} s, a keyed job {failover['job_status']} after "
            f"{failover['keyed_job_done_after_s']} s, {failover['primary_lost']} back as a replica "
            f"({failover['replicas_after_rejoin']} replicas)"
        )
    lines += ["", "  not rehearsed:", *(f"    - {item}" for item in report.cannot_rehearse)]
    lines += ["  deviations from the manifests:", *(f"    - {item}" for item in report.deviations)]
    lines += ["", "PASSED" if not report.failures else "FAILED:", *(f"  - {f}" for f in report.failures)]
    return "\n".join(lines)


def _service_hosts(docs: list[Manifest], addresses: dict[str, str]) -> dict[str, str]:
    """Each Service's names at the address of the first pod it selects, and each
    StatefulSet pod's own name; `rabbitmq` at the bridge's host address, where the broker
    is reached."""
    hosts = {"rabbitmq.inferq.svc": HOST_ADDRESS, "rabbitmq.inferq.svc.cluster.local": HOST_ADDRESS}
    workloads = [d for d in docs if d["kind"] in WORKLOAD_KINDS]
    for service in (d for d in docs if d["kind"] == "Service"):
        selector = {"matchLabels": service["spec"]["selector"]}
        chosen = [
            w for w in workloads if selector_matches(selector, w["spec"]["template"]["metadata"]["labels"])
        ]
        if chosen:
            name = service["metadata"]["name"]
            for alias in (f"{name}.inferq.svc", f"{name}.inferq.svc.cluster.local"):
                hosts[alias] = addresses[f"{chosen[0]['metadata']['name']}-0"]
    # A StatefulSet's pods by their own names under its governing (headless) Service.
    for stateful in (w for w in workloads if w["kind"] == "StatefulSet"):
        for ordinal in range(_replicas(stateful)):
            pod = f"{stateful['metadata']['name']}-{ordinal}"
            for suffix in ("inferq.svc", "inferq.svc.cluster.local"):
                hosts[f"{pod}.{stateful['spec']['serviceName']}.{suffix}"] = addresses[pod]
    return hosts


def _replicas(workload: Manifest) -> int:
    return 1 if workload["kind"] == "Job" else int(workload["spec"].get("replicas", 1))


def _broker_users(secrets: dict[str, dict[str, str]]) -> list[str]:
    """The components' broker users, named in the AMQP URLs of their Secrets."""
    return [
        urlsplit(values["AMQP_URL"]).username or ""
        for name, values in secrets.items()
        if name.startswith("inferq-broker-") and name != "inferq-broker-admin" and "AMQP_URL" in values
    ]


def _settled(pods: list[Pod]) -> bool:
    return all(pod.ready or pod.exited() is not None for pod in pods)


async def _until(predicate: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate() or time.monotonic() > deadline:
            return
        await asyncio.sleep(1)


class Rehearsal:
    """One run: `prepare` (image, network, broker administrator, Secrets, pods), `run_pods`,
    `observe` (Prometheus, jobs, panels, alerts), and `close`, which undoes everything."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.report = Report()
        self.docs = render(OVERLAYS[OVERLAY])
        self.monitoring = render(MONITORING[OVERLAY])
        tag = random_secrets.token_hex(3)
        # Short: Ray's sockets live under a pod's /tmp, and AF_UNIX paths stop at 107 bytes.
        self.work = Path(f"/tmp/iqr{tag}")
        self.network = PodNetwork(tag)
        self.admin = BrokerAdmin(tag)
        self.pods: list[Pod] = []
        self.reports: dict[str, PodReport] = {}
        self.probes: list[asyncio.Task[None]] = []
        self.prometheus = Prometheus(self.work / "prometheus", PROMETHEUS_PORT)
        self.receiver: CallbackReceiver | None = None
        self.secrets: dict[str, dict[str, str]] = {}
        self.config_maps: dict[str, dict[str, str]] = {}

    def prepare(self) -> None:
        self.work.mkdir(mode=0o700)
        image = stage_image(self.work / "image")
        self.network.open()
        self.secrets = make_secrets(self.work / "secrets", OVERLAY, (self.admin.user, self.admin.password))
        self.config_maps = {
            d["metadata"]["name"]: dict(d.get("data", {})) for d in self.docs if d["kind"] == "ConfigMap"
        }
        self.config_maps["inferq"]["CALLBACK_ALLOW_HOSTS"] = HOST_ADDRESS
        # Each workload's pods: `replicas` of a Deployment or a StatefulSet, one of a Job,
        # and one of a worker (no count: cluster-up creates it at 0, KEDA wakes it).
        replicas = [(w, i) for w in self.docs if w["kind"] in WORKLOAD_KINDS for i in range(_replicas(w))]
        addresses = {
            f"{w['metadata']['name']}-{i}": self.network.add_pod(f"{w['metadata']['name']}-{i}")
            for w, i in replicas
        }
        self.network.write_hosts(_service_hosts(self.docs, addresses))
        # Callers reach the store at its pod's address here, not through kind's port-forward.
        self.secrets["inferq-object-store"]["S3_PUBLIC_ENDPOINT_URL"] = f"http://{addresses['minio-0']}:9000"
        for index, (workload, ordinal) in enumerate(replicas):
            name = f"{workload['metadata']['name']}-{ordinal}"
            pod = make_pod(
                workload,
                addresses[name],
                self.work / "pods" / f"p{index}",
                self.network.command(name, []),
                image=(image.app, image.python, image.env),
                config_maps=self.config_maps,
                secrets=self.secrets,
                ordinal=ordinal,
            )
            self.pods.append(pod)
            self.reports[pod.name] = PodReport(pod.name, False, pod.address)
        self.report.pods = list(self.reports.values())

    async def run_pods(self) -> None:
        """The Job to completion first (the components' users and the topology), then the
        StatefulSets, then the Deployments, each set until ready or out of time."""
        for pod in (p for p in self.pods if p.workload["kind"] == "Job"):
            report = self.reports[pod.name]
            report.ready = await _run_job(pod, report)
            if not report.ready:
                report.log_tail = pod.log_tail()
                raise RuntimeError(f"the Job {pod.name} did not complete: {report.log_tail}")
        for kind in ("StatefulSet", "Deployment"):
            batch = [p for p in self.pods if p.workload["kind"] == kind]
            for pod in batch:
                pod.start()
                self.probes.append(asyncio.create_task(_probe_loop(pod, self.reports[pod.name])))
            await _until(functools.partial(_settled, batch), READY_TIMEOUT_S)
        for pod in (p for p in self.pods if p.workload["kind"] != "Job"):
            report = self.reports[pod.name]
            report.ready, report.exit_code = pod.ready, pod.exited()
            if not pod.ready:
                report.log_tail = pod.log_tail()

    async def observe(self) -> None:
        monitors = [d for d in self.monitoring if d["kind"] in ("ServiceMonitor", "PodMonitor")]
        targets = list(scrape_targets(monitors, self.docs, self.pods, {"prometheus": f"{BROKER}:15692"}))
        self.prometheus.start(targets)
        await self.prometheus.wait_ready()
        self.receiver = CallbackReceiver(self.secrets["inferq"]["WEBHOOK_SECRET"], host=HOST_ADDRESS)
        await self.receiver.start()
        ingress = next(p for p in self.pods if p.labels.get("app.kubernetes.io/component") == "ingress")
        api_key = self.secrets["inferq"]["API_KEYS"].split(",")[0]
        if ingress.ready:
            models = self.config_maps["inferq"]["MODELS"].split(",")
            await _submit_jobs(ingress, api_key, models, self.receiver, self.report)
            whole = json.dumps(BY_REFERENCE_INPUT).encode()
            await _submit_by_reference(ingress, api_key, self.receiver, self.report, whole, "json")
            lines = BY_REFERENCE_LINES
            await _submit_by_reference(ingress, api_key, self.receiver, self.report, lines, "jsonl")
        # Enough scrapes after the jobs for rates over a minute's window.
        await asyncio.sleep(4 * SCRAPE_INTERVAL_S)
        self.report.targets = await self.prometheus.targets_up()
        await _evaluate(self.prometheus, self.monitoring, self.report)
        if ingress.ready:
            redis = [p for p in self.pods if p.labels.get("app.kubernetes.io/name") == "redis"]
            self.report.records_failover = await rehearse_failover(redis, ingress, api_key, self.receiver)

    async def close(self) -> None:
        for task in self.probes:
            task.cancel()
        if self.receiver is not None:
            await self.receiver.stop()
        self.prometheus.stop()
        for pod in reversed(self.pods):
            pod.stop()
        self.network.close()
        with contextlib.suppress(aiohttp.ClientError, RuntimeError):
            await self.admin.remove(_broker_users(self.secrets))

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        for pod in self.pods:
            if pod.log_path is not None and pod.log_path.exists():
                shutil.copy(pod.log_path, self.out / f"{pod.name}.log")
        shutil.rmtree(self.work, ignore_errors=True)
        _verdict(self.report)
        (self.out / "rehearsal.json").write_text(json.dumps(asdict(self.report), indent=2))
        (self.out / "summary.txt").write_text(summary(self.report) + "\n")


async def rehearse(rehearsal: Rehearsal) -> Report:
    """Run `rehearsal` to the end; anything that stops it early is a failure in its report."""
    try:
        await rehearsal.admin.create()
        await asyncio.to_thread(rehearsal.prepare)
        async with broker_service():
            await rehearsal.run_pods()
            await rehearsal.observe()
    except (RuntimeError, OSError, KeyError, subprocess.SubprocessError, aiohttp.ClientError) as exc:
        rehearsal.report.failures.append(f"the rehearsal stopped: {exc!r}")
    finally:
        await rehearsal.close()
    return rehearsal.report
