"""What the image holds against what the cluster runs from it: every package a container's
`python -m MODULE` imports, directly or not, must be COPYed into the image (the `cpu`
stage of cluster/Dockerfile; the `cuda` stage copies its /app). A package left out works
in the checkout and dies in the pod with "No module named ...".

And the torch it installs: the version pyproject.toml pins, from an index PyTorch builds
that version for (a CUDA index without the pinned version fails the image's build, or
worse, a looser pin takes another version from it).
"""

from __future__ import annotations

import functools
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grimp

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "cluster" / "Dockerfile"
# PyTorch's wheel indexes per minor release: its RELEASE.md, "Release Compatibility Matrix"
# (stable CUDA; the experimental one is left out), and the CPU build every release has.
TORCH_INDEXES = {
    "2.12": frozenset({"cpu", "cu126", "cu130"}),
    "2.13": frozenset({"cpu", "cu126", "cu130"}),
    "2.14": frozenset({"cpu", "cu126", "cu130", "cu132"}),
}
_TORCH_INSTALL = re.compile(r"--index-url https://download\.pytorch\.org/whl/(\w+) torch==([0-9.]+)")
_COPY = re.compile(r"^COPY\s+(?!--)(\S+)\s+\./\1/?\s*$", re.M)

Manifest = dict[str, Any]


def project_packages() -> tuple[str, ...]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages: list[str] = pyproject["tool"]["importlinter"]["root_packages"]
    return tuple(packages)


def copied_packages(dockerfile: str, stage: str = "cpu") -> set[str]:
    """The folders `COPY name ./name` puts into `stage`."""
    start = re.search(rf"^FROM\s+\S+\s+AS\s+{stage}\s*$", dockerfile, re.M)
    if start is None:
        raise ValueError(f"the Dockerfile has no stage {stage!r}")
    following = re.search(r"^FROM\s", dockerfile[start.end() :], re.M)
    body = dockerfile[start.end() : start.end() + following.start() if following else len(dockerfile)]
    return set(_COPY.findall(body))


@functools.cache
def _graph() -> grimp.ImportGraph:
    return grimp.build_graph(*project_packages())


def imported_packages(module: str) -> set[str]:
    """The project's packages `module` needs: its own and those it imports, transitively."""
    graph = _graph()
    modules = {module, *graph.find_upstream_modules(module)}
    return {name.split(".")[0] for name in modules} & set(project_packages())


def _entry_modules(docs: list[Manifest]) -> Iterator[tuple[str, str]]:
    """(workload, module) for every container started as `python -m MODULE`."""
    for doc in docs:
        if doc["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            words = container.get("command", []) + container.get("args", [])
            if "-m" in words[:-1]:
                yield f"{doc['kind']}/{doc['metadata']['name']}", words[words.index("-m") + 1]


def image_violations(docs: list[Manifest], dockerfile: str | None = None) -> Iterator[tuple[str, str]]:
    copied = copied_packages(DOCKERFILE.read_text() if dockerfile is None else dockerfile)
    for workload, module in _entry_modules(docs):
        missing = imported_packages(module) - copied
        if missing:
            yield (
                workload,
                f"runs `python -m {module}`, which needs {sorted(missing)}: not COPYed into the image",
            )


def torch_violations(dockerfile: str | None = None) -> Iterator[tuple[str, str]]:
    """Each stage's torch is the pinned one, from an index built for it."""
    text = DOCKERFILE.read_text() if dockerfile is None else dockerfile
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = next((d.split("==")[1] for d in dependencies if d.startswith("torch==")), None)
    installs = _TORCH_INSTALL.findall(text)
    if not installs:
        yield "cluster/Dockerfile", "installs no torch from download.pytorch.org"
    for index, version in installs:
        if version != pinned:
            yield "cluster/Dockerfile", f"installs torch {version}; pyproject.toml pins {pinned}"
        minor = ".".join(version.split(".")[:2])
        if minor not in TORCH_INDEXES:
            yield "cluster/Dockerfile", f"torch {minor}'s wheel indexes are not known here (TORCH_INDEXES)"
        elif index not in TORCH_INDEXES[minor]:
            yield (
                "cluster/Dockerfile",
                f"torch {version} is not built for the index {index} (only {sorted(TORCH_INDEXES[minor])})",
            )
