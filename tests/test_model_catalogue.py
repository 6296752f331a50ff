"""The model catalogue (models.yaml): what it accepts, how it refuses a bad entry (naming
the model and the field), and a model whose code lives outside the platform's source
tree served end to end: its input schema enforced at submit, its output returned."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.client import Broker
from ingress.settings import IngressSettings
from model_catalogue.catalogue import CatalogueError, load_catalogue, model_class
from ray_workers.models.registry import load_model
from ray_workers.settings import WorkerSettings
from settings.environment import ConfigError, Environment
from tests.conftest import drain_queue, running_ingress, running_worker
from tests.model_packages import installed_package


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / f"models-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_the_shipped_catalogue_lists_the_models_and_each_class_is_a_model() -> None:
    catalogue = load_catalogue()

    assert catalogue.names == ("echo", "embed-minilm", "synthetic")
    assert catalogue.test_only == ("synthetic",)
    for name in catalogue.names:
        assert callable(getattr(model_class(catalogue.entry(name)), "predict", None))


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("echo: {class: echo}", "model 'echo': class='echo'; expected `package.module:Class`"),
        ("echo: {class: 'a.b:C', inputs: {}}", "model 'echo': unknown field(s) ['inputs']"),
        (
            "echo: {class: 'a.b:C', input_schema: {type: 12}}",
            "model 'echo': input_schema is not a valid JSON Schema",
        ),
        ("echo: {class: 'a.b:C', test_only: maybe}", "model 'echo': test_only='maybe'"),
        ("Echo_1: {class: 'a.b:C'}", "model name 'Echo_1' must be lowercase"),
        (
            "echo: {description: no code}",
            "model 'echo': no class, and no installed package declares the entry point inferq.models:echo",
        ),
        (
            "echo: {class: 'a.b:C', scaling: {min_replicas: 3, max_replicas: 2}}",
            "model 'echo': scaling: min_replicas=3 exceeds max_replicas=2",
        ),
        (
            "echo: {class: 'a.b:C', scaling: {max_replica: 2}}",
            "model 'echo': scaling.max_replica=2: unknown field; expected one of",
        ),
        ("echo: {class: 'a.b:C', resources: {memory: 4GB}}", "model 'echo': resources.memory='4GB'"),
        ("echo: {class: 'a.b:C', resources: {gpus: -1}}", "model 'echo': resources.gpus=-1"),
        ("echo: {class: 'a.b:C', batching: {max_size: 0}}", "model 'echo': batching.max_size=0"),
        (
            "echo: {class: 'a.b:C', resources: {processes_per_gpu: 4}}",
            "model 'echo': resources: processes_per_gpu 4 needs gpus: 1 (it has 0): the processes share",
        ),
        (
            "echo: {class: 'a.b:C', resources: {gpus: 2, processes_per_gpu: 2}}",
            "model 'echo': resources: processes_per_gpu 2 needs gpus: 1 (it has 2)",
        ),
        (
            "echo: {class: 'a.b:C', jobs: {retry_delays_s: [1, -2]}}",
            "model 'echo': jobs.retry_delays_s=[1, -2]: Input should be greater than 0",
        ),
        ("echo: {class: 'a.b:C', jobs: 7}", "model 'echo': jobs must be a mapping"),
    ],
)
def test_a_bad_entry_is_refused_naming_the_model_and_the_field(
    tmp_path: Path, entry: str, message: str
) -> None:
    path = _write(tmp_path, f"models:\n  {entry}\n")
    with pytest.raises(CatalogueError) as refused:
        load_catalogue(path)

    assert message in str(refused.value)


@pytest.mark.parametrize(
    ("class_path", "message"),
    [
        ("no_such_package.models:Model", "cannot import no_such_package.models"),
        ("ray_workers.models.echo:Missing", "ray_workers.models.echo has no class Missing"),
        ("model_catalogue.catalogue:ModelEntry", "the class has no prepare or predict"),
    ],
)
def test_a_class_that_is_not_a_model_is_refused_at_start(
    tmp_path: Path, class_path: str, message: str
) -> None:
    path = _write(tmp_path, f"models:\n  mine: {{class: '{class_path}'}}\n")
    with pytest.raises(CatalogueError) as refused:
        model_class(load_catalogue(path).entry("mine"))

    assert f"model 'mine': class='{class_path}': {message}" in str(refused.value)


def test_models_must_name_catalogue_entries(tmp_path: Path) -> None:
    path = _write(tmp_path, "models:\n  mine: {class: 'ray_workers.models.echo:EchoModel'}\n")

    served = Environment.read({"MODEL_CATALOGUE": str(path), "MODELS": "mine"}).served_models
    with pytest.raises(ConfigError, match=r"names unknown model\(s\) \['echo'\]"):
        Environment.read({"MODEL_CATALOGUE": str(path), "MODELS": "echo"})

    assert served == ("mine",)


SHOUT_MODEL = '''
"""A user's model, outside the platform's source tree."""


class ShoutModel:
    def prepare(self, raw_input, attempt):
        return raw_input["text"]

    def predict(self, inputs):
        return [text.upper() + "!" for text in inputs]
'''


@pytest.fixture
def user_model(tmp_path: Path) -> Iterator[Path]:
    """A package `acme_<id>` with one model, importable, and a catalogue naming it."""
    package = f"acme_{uuid.uuid4().hex[:8]}"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / package / "shout.py").write_text(SHOUT_MODEL)
    catalogue = _write(
        tmp_path,
        f"""
        models:
          shout:
            class: {package}.shout:ShoutModel
            description: Shouts its text.
            input_schema:
              type: object
              required: [text]
              additionalProperties: false
              properties:
                text: {{type: string, maxLength: 100}}
        """,
    )
    sys.path.insert(0, str(tmp_path))
    try:
        yield catalogue
    finally:
        sys.path.remove(str(tmp_path))


async def test_a_model_from_outside_the_tree_is_described_validated_and_served(
    user_model: Path, ingress_settings: IngressSettings, worker_settings: WorkerSettings
) -> None:
    models = ("shout",)
    ingress = dataclasses.replace(ingress_settings, models=models, model_catalogue=str(user_model))
    workers = dataclasses.replace(worker_settings, models=models, model_catalogue=str(user_model))
    broker = Broker(workers.amqp_url, workers.topology, models)
    await broker.connect()
    try:
        async with running_ingress(ingress) as client:
            described = await client.get("/v1/models/shout")
            listed = await client.get("/v1/models")
            refused = await client.post("/v1/models/shout/jobs", json={"input": {"text": 42}})
            unknown_field = await client.post("/v1/models/shout/jobs", json={"input": {"txt": "hi"}})
            queued_after_refusals = await drain_queue(workers.amqp_url, workers.topology.main_queue("shout"))
            async with running_worker(load_model("shout", str(user_model)), workers):
                served = await client.post(
                    "/v1/models/shout/jobs", json={"input": {"text": "hello"}}, headers={"Prefer": "wait=10"}
                )
    finally:
        await broker.delete_topology()
        await broker.close()

    assert described.json()["input_schema"]["required"] == ["text"]
    assert listed.json()["models"] == [{"name": "shout", "description": "Shouts its text."}]
    assert refused.status_code == 422 and refused.json()["errors"][0]["pointer"] == "/input/text"
    assert unknown_field.status_code == 422 and unknown_field.json()["type"].endswith("/invalid-input")
    assert queued_after_refusals == []  # refused before anything was queued
    assert served.status_code == 200 and served.json()["output"] == "HELLO!"


WHISPER_MODEL = '''
"""An installed user model: async predict, and a warm-up before the first job."""

import asyncio


class WhisperModel:
    def __init__(self):
        self.warm = False

    def warm_up(self):
        self.warm = True

    def prepare(self, raw_input, attempt):
        return str(raw_input)

    async def predict(self, inputs):
        await asyncio.sleep(0)
        return [f"{text.lower()} ({'warm' if self.warm else 'cold'})" for text in inputs]
'''


@pytest.fixture
def installed_model(tmp_path: Path) -> Iterator[str]:
    """A package installed into this venv (pip), declaring its model by entry point."""
    suffix = uuid.uuid4().hex[:8]
    package, name = f"acme_whisper_{suffix}", f"whisper-{suffix}"
    with installed_package(tmp_path, package, {"model": WHISPER_MODEL}, {name: "model:WhisperModel"}):
        yield name


async def test_a_model_of_an_installed_package_is_found_by_entry_point_warmed_up_and_served(
    installed_model: str, tmp_path: Path, ingress_settings: IngressSettings, worker_settings: WorkerSettings
) -> None:
    listed = _write(tmp_path, f"models:\n  {installed_model}:\n    input_schema: {{type: string}}\n")
    unlisted = _write(tmp_path, "models:\n  echo: {class: 'ray_workers.models.echo:EchoModel'}\n")
    models = (installed_model,)
    ingress = dataclasses.replace(ingress_settings, models=models, model_catalogue=str(listed))
    workers = dataclasses.replace(worker_settings, models=models, model_catalogue=str(listed))
    broker = Broker(workers.amqp_url, workers.topology, models)
    await broker.connect()
    try:
        async with running_ingress(ingress) as client:
            refused = await client.post(f"/v1/models/{installed_model}/jobs", json={"input": 7})
            async with running_worker(load_model(installed_model, str(listed)), workers):
                served = await client.post(
                    f"/v1/models/{installed_model}/jobs",
                    json={"input": "HELLO"},
                    headers={"Prefer": "wait=10"},
                )
    finally:
        await broker.delete_topology()
        await broker.close()

    discovered = load_catalogue(unlisted).entry(installed_model)
    assert refused.status_code == 422  # the catalogue's schema for the installed model holds
    assert served.status_code == 200 and served.json()["output"] == "hello (warm)"
    assert discovered.input_schema == {} and discovered.class_path.endswith(".model:WhisperModel")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            "{class: 'no_such_package.models:Model'}",
            "model 'mine': class='no_such_package.models:Model': cannot",
        ),
        ("{class: 'model_catalogue.catalogue:ModelEntry'}", "model 'mine': class="),
        (
            "{class: 'a.b:C', input_schema: {type: 12}}",
            "model 'mine': input_schema is not a valid JSON Schema",
        ),
        (
            "{class: 'a.b:C', scaling: {min_replicas: 2, max_replicas: 1}}",
            "model 'mine': scaling: min_replicas=2 exceeds max_replicas=1",
        ),
    ],
)
def test_a_bad_catalogue_stops_task_up_at_start_naming_the_model_and_the_field(
    tmp_path: Path, entry: str, message: str
) -> None:
    catalogue = _write(tmp_path, f"models:\n  mine: {entry}\n")
    started = subprocess.run(
        [sys.executable, "-m", "local_stack"],
        env={**os.environ, "MODEL_CATALOGUE": str(catalogue), "MODELS": "mine", "WEBHOOK_SECRET": ""},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert started.returncode == 2, started.stdout + started.stderr
    assert message in started.stderr
    assert "inferq stack ready" not in started.stdout
