"""The image as the pods would get it, without a container engine: exactly the files the
Dockerfile's `cpu` stage COPYs, staged in a folder of their own, and a Python whose
site-packages holds the project's dependencies and that folder (as `pip install .` in the
image would), and not the checkout: an import that only works from the checkout fails.
The stage's ENV comes with it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "cluster" / "Dockerfile"
_STAGE = re.compile(r"^FROM\s+\S+\s+AS\s+(\S+)\s*$", re.M)


@dataclass(frozen=True)
class StagedImage:
    app: Path
    python: Path
    env: dict[str, str]


def stage_body(dockerfile: str, stage: str) -> str:
    starts = [(m.group(1), m.end()) for m in _STAGE.finditer(dockerfile)]
    for index, (name, start) in enumerate(starts):
        if name == stage:
            end = dockerfile.rfind("\nFROM ", 0, starts[index + 1][1]) if index + 1 < len(starts) else None
            return dockerfile[start:end]
    raise ValueError(f"the Dockerfile has no stage {stage!r}")


def _instructions(body: str, keyword: str) -> list[list[str]]:
    joined = body.replace("\\\n", " ")
    return [line.split()[1:] for line in joined.splitlines() if line.startswith(f"{keyword} ")]


def image_env(body: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for words in _instructions(body, "ENV"):
        env.update(word.split("=", 1) for word in words if "=" in word)  # type: ignore[misc]
    return env


def copied_paths(body: str) -> list[str]:
    """The sources of every `COPY src... dest` (no --from: those copy from another stage)."""
    paths = []
    for words in _instructions(body, "COPY"):
        if any(word.startswith("--") for word in words):
            continue
        paths += words[:-1]
    return paths


def stage_image(folder: Path, stage: str = "cpu") -> StagedImage:
    body = stage_body(DOCKERFILE.read_text(), stage)
    app = folder / "app"
    app.mkdir(parents=True)
    for source in copied_paths(body):
        origin = ROOT / source
        if origin.is_dir():
            shutil.copytree(origin, app / source, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(origin, app / source)
    venv = folder / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    # Plain path lines: the dependencies' folder is added without running the .pth files in
    # it, so the checkout's editable-install finder never loads.
    (site / "inferq-image.pth").write_text(f"{sysconfig.get_path('purelib')}\n{app}\n")
    return StagedImage(app=app, python=venv / "bin" / "python", env=image_env(body))
