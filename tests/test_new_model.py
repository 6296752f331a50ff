"""`task new-model`: the scaffold writes a model outside the platform's code whose own
test serves it through the real pipeline, and refuses a name it cannot use without
touching any file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from model_catalogue.catalogue import DEFAULT_CATALOGUE, CatalogueError, load_catalogue
from ray_workers.models.scaffold import scaffold

ROOT = Path(__file__).resolve().parent.parent


def test_a_scaffolded_model_passes_its_own_pipeline_test(tmp_path: Path) -> None:
    catalogue = tmp_path / "models.yaml"
    shutil.copy(DEFAULT_CATALOGUE, catalogue)

    written = scaffold("tone-check", tmp_path / "user_models", catalogue)
    test_file = tmp_path / "user_models" / "test_tone_check_model.py"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-c",
            "pyproject.toml",
            str(test_file),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": f"{tmp_path / 'user_models'}{os.pathsep}{ROOT}"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert test_file in written and catalogue in written
    assert load_catalogue(catalogue).entry("tone-check").class_path == "tone_check_model.model:ToneCheckModel"
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "1 passed" in run.stdout


@pytest.mark.parametrize(("name", "message"), [("Tone", "must be lowercase"), ("echo", "exists already")])
def test_a_name_it_cannot_use_is_refused_and_nothing_is_written(
    tmp_path: Path, name: str, message: str
) -> None:
    catalogue = tmp_path / "models.yaml"
    shutil.copy(DEFAULT_CATALOGUE, catalogue)
    before = catalogue.read_text()

    with pytest.raises(CatalogueError, match=message):
        scaffold(name, tmp_path / "user_models", catalogue)

    assert catalogue.read_text() == before
    assert not (tmp_path / "user_models").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models.yaml"]
