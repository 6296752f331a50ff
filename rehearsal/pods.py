"""A rendered workload's pod run as a kubelet would run it: its command and args with
`$(VAR)` expanded, its environment from the image, ConfigMaps, Secrets and the downward API,
its volumes as folders of its own (paths rewritten where the container would see them
mounted), in its own network namespace; its probes run as declared, and readiness decides
whether it counts as a Service's endpoint. Processes run as this machine's user (the
interpreter lives where no other user may read); `task cluster:verify` checks the users,
the read-only root and the dropped capabilities the manifests ask for.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

Manifest = dict[str, Any]
# The upstream images' entrypoints (run when a pod gives only args) and working directories.
IMAGE_ENTRYPOINTS = {"redis": ["redis-server"], "redis_exporter": ["/redis_exporter"], "minio": ["minio"]}
IMAGE_WORKDIRS = {"redis": "/data"}
# Where an image's binaries are found here (Debian's redis-server, redis-tools and
# prometheus-redis-exporter packages): ours is the staged Python.
SYSTEM_BINARIES = {
    "sh": "/bin/sh",
    "redis-server": "/usr/bin/redis-server",
    "redis-cli": "/usr/bin/redis-cli",
    "/redis_exporter": "/usr/bin/prometheus-redis-exporter",
    # No MinIO installs here: moto's S3-compatible server stands in (rehearsal/minio_stand_in.py).
    "minio": str(Path(__file__).with_name("minio_stand_in.py")),
}
_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


class PodFailed(RuntimeError):
    """A pod could not be made from its spec; the message says which field."""


@dataclass
class Probe:
    """A container's probe, run in its pod's network namespace with the container's env."""

    spec: Manifest
    ports: dict[str, int]
    env: dict[str, str]

    @property
    def period_s(self) -> float:
        return float(self.spec.get("periodSeconds", 10))

    @property
    def failure_threshold(self) -> int:
        return int(self.spec.get("failureThreshold", 3))

    def _port(self, port: int | str) -> int:
        return self.ports[port] if isinstance(port, str) else int(port)

    async def passes(self, pod: Pod) -> bool:
        timeout_s = float(self.spec.get("timeoutSeconds", 1))
        try:
            if "httpGet" in self.spec:
                get = self.spec["httpGet"]
                url = f"http://{pod.address}:{self._port(get['port'])}{get.get('path', '/')}"
                timeout = aiohttp.ClientTimeout(total=timeout_s)
                async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as answer:
                    return 200 <= answer.status < 400
            if "tcpSocket" in self.spec:
                connecting = asyncio.open_connection(pod.address, self._port(self.spec["tcpSocket"]["port"]))
                _reader, writer = await asyncio.wait_for(connecting, timeout_s)
                writer.close()
                await writer.wait_closed()
                return True
            if "exec" in self.spec:
                return await pod.exec_ok(self.spec["exec"]["command"], timeout_s, self.env)
        except (OSError, TimeoutError, aiohttp.ClientError):
            return False
        raise PodFailed(f"{pod.name}: a probe of a kind this rehearsal does not run: {sorted(self.spec)}")


@dataclass
class ContainerRun:
    """One container of a pod: its process, and the command, env and directory it runs with."""

    spec: Manifest
    command: list[str]
    env: dict[str, str]
    cwd: Path
    process: subprocess.Popen[bytes] | None = None


@dataclass
class Pod:
    """One pod of a workload, every container a process in the pod's network namespace,
    sharing its volumes; `start`, then `wait_ready`; `stop` ends it."""

    name: str
    workload: Manifest
    address: str
    folder: Path
    containers: list[ContainerRun]
    netns_command: list[str]
    ports: dict[str, int] = field(default_factory=dict)
    ready: bool = False
    restarts: int = 0
    log_path: Path | None = None

    @property
    def labels(self) -> dict[str, str]:
        labels: dict[str, str] = self.workload["spec"]["template"]["metadata"].get("labels", {})
        return labels

    @property
    def command(self) -> list[str]:
        """The first (main) container's command."""
        return self.containers[0].command

    @property
    def env(self) -> dict[str, str]:
        """The first (main) container's environment."""
        return self.containers[0].env

    def start(self) -> None:
        self.log_path = self.folder / "log"
        for container in self.containers:
            log = self.log_path.open("ab")
            container.process = subprocess.Popen(
                self.netns_command + container.command,
                cwd=container.cwd,
                env=container.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            log.close()

    def exited(self) -> int | None:
        """The exit code of the first container that ended (a pod with one ended is not ready)."""
        for container in self.containers:
            code = None if container.process is None else container.process.poll()
            if code is not None:
                return code
        return None

    async def exec_ok(self, argv: list[str], timeout_s: float, env: Mapping[str, str]) -> bool:
        code, _output = await self._exec(argv, timeout_s, env)
        return code == 0

    async def exec_output(self, argv: list[str], timeout_s: float, env: Mapping[str, str]) -> str:
        """What `argv` prints in the pod's network namespace ('' when it fails or times out)."""
        code, output = await self._exec(argv, timeout_s, env)
        return output if code == 0 else ""

    async def _exec(
        self, argv: list[str], timeout_s: float, env: Mapping[str, str]
    ) -> tuple[int | None, str]:
        """`argv` run in the pod's network namespace: its exit code (None when it timed out)
        and what it printed."""
        command = [SYSTEM_BINARIES.get(argv[0], argv[0]), *argv[1:]]
        process = await asyncio.create_subprocess_exec(
            *self.netns_command,
            *command,
            env=dict(env),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            output, _ = await asyncio.wait_for(process.communicate(), timeout_s)
        except TimeoutError:
            process.kill()
            await process.wait()
            return None, ""
        return process.returncode, output.decode(errors="replace")

    def probes(self, kind: str) -> list[Probe]:
        """Each container's probe of `kind` (startupProbe, readinessProbe, livenessProbe)."""
        return [
            Probe(container.spec[kind], self.ports, container.env)
            for container in self.containers
            if container.spec.get(kind)
        ]

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace_s: float = 20.0) -> None:
        running = [c.process for c in self.containers if c.process is not None and c.process.poll() is None]
        for process in running:
            os.killpg(process.pid, signal.SIGTERM)
        for process in running:
            try:
                process.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)


def _expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: a defined variable is replaced, an undefined one kept."""
    return _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), text)


def pod_env(
    container: Manifest,
    image_env: Mapping[str, str],
    config_maps: Mapping[str, Mapping[str, str]],
    secrets: Mapping[str, Mapping[str, str]],
    pod_fields: Mapping[str, str],
) -> dict[str, str]:
    """The container's environment, in the order a kubelet builds it: the image's ENV,
    `envFrom`, then `env` (each value may use the ones before it)."""
    env = dict(image_env)
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config_maps[source["configMapRef"]["name"]])
        elif "secretRef" in source:
            env.update(secrets[source["secretRef"]["name"]])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = _expand(str(item["value"]), env)
            continue
        source = item["valueFrom"]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[item["name"]] = secrets[ref["name"]][ref["key"]]
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[item["name"]] = config_maps[ref["name"]][ref["key"]]
        elif "fieldRef" in source:
            env[item["name"]] = pod_fields[source["fieldRef"]["fieldPath"]]
        else:
            raise PodFailed(f"env {item['name']}: a source this rehearsal does not resolve: {sorted(source)}")
    return env


def mount_folders(
    workload: Manifest,
    folder: Path,
    secrets: Mapping[str, Mapping[str, str]],
    config_maps: Mapping[str, Mapping[str, str]],
    container: Manifest,
) -> dict[str, Path]:
    """`container`'s mountPath -> the folder standing for it, one folder per volume (so the
    pod's containers share it): emptyDirs and claims as empty folders, Secrets and
    ConfigMaps as their keys' files. /dev/shm stays the machine's (shared memory)."""
    spec = workload["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
    claims = {claim["metadata"]["name"] for claim in workload["spec"].get("volumeClaimTemplates", [])}
    mounts: dict[str, Path] = {}
    for mount in container.get("volumeMounts", []):
        if mount["mountPath"] == "/dev/shm":
            continue
        target = folder / "v" / mount["name"]
        target.mkdir(parents=True, exist_ok=True)
        volume = volumes.get(mount["name"])
        if volume is not None and "secret" in volume:
            for key, value in secrets[volume["secret"]["secretName"]].items():
                (target / key).write_text(value)
        elif volume is not None and "configMap" in volume:
            for key, value in config_maps[volume["configMap"]["name"]].items():
                (target / key).write_text(value)
        elif volume is None and mount["name"] not in claims:
            raise PodFailed(f"{workload['metadata']['name']}: volume {mount['name']} is declared nowhere")
        mounts[mount["mountPath"]] = target
    return mounts


def _remap(text: str, mounts: Mapping[str, Path]) -> str:
    for mount_path, target in sorted(mounts.items(), key=lambda item: -len(item[0])):
        if text == mount_path or text.startswith(mount_path.rstrip("/") + "/"):
            return str(target) + text[len(mount_path.rstrip("/")) :]
    return text


def make_pod(
    workload: Manifest,
    address: str,
    folder: Path,
    netns_command: list[str],
    *,
    image: tuple[Path, Path, Mapping[str, str]],
    config_maps: Mapping[str, Mapping[str, str]],
    secrets: Mapping[str, Mapping[str, str]],
    ordinal: int = 0,
) -> Pod:
    """The pod of `workload` at `address`; `image` is (app folder, its python, its ENV) for
    our image, whose `python` is that python and whose working directory is the app."""
    name = f"{workload['metadata']['name']}-{ordinal}"
    folder.mkdir(parents=True)
    fields = {"status.podIP": address, "metadata.name": name, "metadata.namespace": "inferq"}
    containers = [
        _container_run(
            spec, name, folder, image, fields, workload=workload, config_maps=config_maps, secrets=secrets
        )
        for spec in workload["spec"]["template"]["spec"]["containers"]
    ]
    ports = {
        port["name"]: int(port["containerPort"])
        for run in containers
        for port in run.spec.get("ports", [])
        if "name" in port
    }
    return Pod(
        name=name,
        workload=workload,
        address=address,
        folder=folder,
        containers=containers,
        netns_command=netns_command,
        ports=ports,
    )


def _container_run(
    container: Manifest,
    name: str,
    folder: Path,
    image: tuple[Path, Path, Mapping[str, str]],
    fields: Mapping[str, str],
    workload: Manifest,
    config_maps: Mapping[str, Mapping[str, str]],
    secrets: Mapping[str, Mapping[str, str]],
) -> ContainerRun:
    ours = container["image"].startswith("inferq")
    app, python, image_env = image
    env = pod_env(container, image_env if ours else {}, config_maps, secrets, fields)
    mounts = mount_folders(workload, folder, secrets, config_maps, container)
    env = {key: _remap(value, mounts) for key, value in env.items()}
    # The pod's /tmp is its own (an emptyDir where one is mounted, else its root filesystem).
    private_tmp = mounts.get("/tmp", folder / "tmp")
    private_tmp.mkdir(parents=True, exist_ok=True)
    env.setdefault("TMPDIR", str(private_tmp))
    env["PATH"] = f"{python.parent}:/usr/local/bin:/usr/bin:/bin"
    short_image = container["image"].split(":")[0].split("/")[-1]
    argv = [*container.get("command", []), *container.get("args", [])]
    if not container.get("command"):
        entrypoint = IMAGE_ENTRYPOINTS.get(short_image)
        if entrypoint is None:
            raise PodFailed(f"{name}: no command, and no entrypoint known for {container['image']}")
        argv = [*entrypoint, *argv]
    argv = [_remap(_expand(word, env), mounts) for word in argv]
    argv[0] = str(python) if ours and argv[0] == "python" else SYSTEM_BINARIES.get(argv[0], argv[0])
    if not ours and not Path(argv[0]).exists():
        raise PodFailed(f"{name}: {argv[0]} ({container['image']}) is not installed on this machine")
    workdir = container.get("workingDir") or IMAGE_WORKDIRS.get(short_image, "/")
    return ContainerRun(container, argv, env, app if ours else Path(_remap(workdir, mounts)))
