"""`task new-model -- NAME`: a new model, outside the platform's code, ready to serve.

Writes, for NAME (e.g. `sentiment`):

    <into>/<name>_model/__init__.py
    <into>/<name>_model/model.py          the class: prepare, predict (a working example)
    <into>/test_<name>_model.py           a test that serves it through the real pipeline
    <catalogue> (appended)                its entry: class, description, input schema

The test starts the ingress and a worker against the real broker and Redis (AMQP_URL,
REDIS_URL), submits one valid and one invalid job, and checks the 200 with the output
and the 422 with the pointer. Run it from the project's root with
`PYTHONPATH=<into> .venv/bin/python -m pytest -c pyproject.toml <into>/test_<name>_model.py`, then
serve the model with `PYTHONPATH=<into> MODELS=...,<name> task up`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from model_catalogue.catalogue import DEFAULT_CATALOGUE, CatalogueError, load_catalogue

MODEL_SOURCE = '''\
"""{name}: replace prepare and predict with your model (see ray_workers/models/base.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class {cls}:
    def __init__(self) -> None:
        # Load weights here: once per replica, before its first job.
        self.suffix = "!"

    def prepare(self, raw_input: Any, attempt: int) -> str:
        # The ingress already checked the input against the catalogue's schema.
        return str(raw_input["text"])

    def predict(self, inputs: Sequence[str]) -> list[Any]:
        # One output per input, in order.
        return [{{"text": text + self.suffix, "length": len(text)}} for text in inputs]
'''

TEST_SOURCE = '''\
"""{name} through the real pipeline: the ingress, a worker, the broker and Redis."""

from __future__ import annotations

import os
import uuid

from broker.client import Broker
from policies.callback_guard import AllowList
from settings.environment import DEFAULT_AMQP_URL, DEFAULT_REDIS_URL
from wire.topology import Topology
from ingress.settings import IngressSettings
from ray_workers.models.registry import load_model
from ray_workers.settings import WorkerSettings
from tests.conftest import running_ingress, running_worker

CATALOGUE = {catalogue!r}


async def test_{package}_is_validated_and_served() -> None:
    amqp_url = os.environ.get("AMQP_URL", DEFAULT_AMQP_URL)
    redis_url = os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)
    topology = Topology(prefix=f"t{{uuid.uuid4().hex[:10]}}.")
    models = ({name!r},)
    ingress = IngressSettings(
        amqp_url=amqp_url, models=models, topology=topology, model_catalogue=CATALOGUE,
        redis_url=redis_url, callback_allow=AllowList.parse(["127.0.0.1"]),
    )
    workers = WorkerSettings(
        amqp_url=amqp_url, models=models, topology=topology, model_catalogue=CATALOGUE, redis_url=redis_url
    )
    try:
        async with running_ingress(ingress) as client:
            refused = await client.post("/v1/models/{name}/jobs", json={{"input": {{"text": 1}}}})
            async with running_worker(load_model({name!r}, CATALOGUE), workers):
                served = await client.post(
                    "/v1/models/{name}/jobs",
                    json={{"input": {{"text": "hello"}}}},
                    headers={{"Prefer": "wait=10"}},
                )
    finally:  # the broker may be shared: its queues go with the test
        broker = Broker(amqp_url, topology, models)
        await broker.connect()
        await broker.delete_topology()
        await broker.close()

    assert refused.status_code == 422 and refused.json()["errors"][0]["pointer"] == "/input/text"
    assert served.status_code == 200, served.text
    assert served.json()["output"] == {{"text": "hello!", "length": 5}}
'''

CATALOGUE_ENTRY = """
  {name}:
    class: {package}.model:{cls}
    description: {name} (scaffolded by task new-model; describe it here).
    input_schema:
      type: object
      required: [text]
      additionalProperties: false
      properties:
        text: {{type: string, minLength: 1}}
"""


def scaffold(name: str, into: Path, catalogue: Path) -> list[Path]:
    """Write the model's package, its test and its catalogue entry; returns the files.

    The extended catalogue is validated before anything is written (a bad name leaves
    every file as it was)."""
    if name in load_catalogue(catalogue).entries:
        raise CatalogueError(f"{catalogue}: a model {name!r} exists already")
    package = name.replace("-", "_") + "_model"
    cls = "".join(part.capitalize() for part in name.split("-")) + "Model"
    if (into / package).exists():
        raise CatalogueError(f"{into / package} exists already: choose another name or folder")
    extended = catalogue.with_name(f".{catalogue.name}.new")
    extended.write_text(catalogue.read_text() + CATALOGUE_ENTRY.format(name=name, package=package, cls=cls))
    try:
        load_catalogue(extended)
    except CatalogueError:
        extended.unlink()
        raise
    (into / package).mkdir(parents=True)
    written = [into / package / "__init__.py", into / package / "model.py", into / f"test_{package}.py"]
    written[0].write_text("")
    written[1].write_text(MODEL_SOURCE.format(name=name, cls=cls))
    written[2].write_text(TEST_SOURCE.format(name=name, package=package, catalogue=str(catalogue)))
    extended.replace(catalogue)
    load_catalogue.cache_clear()
    return [*written, catalogue]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="new-model", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="the model's name: lowercase letters, digits and '-'")
    parser.add_argument("--into", type=Path, default=Path("user_models"), help="where its package goes")
    parser.add_argument("--catalogue", type=Path, default=DEFAULT_CATALOGUE)
    args = parser.parse_args(argv)
    try:
        written = scaffold(args.name, args.into, args.catalogue)
    except CatalogueError as exc:
        print(f"new-model: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    print(f"next: PYTHONPATH={args.into} .venv/bin/python -m pytest -c pyproject.toml {written[2]}")
    print(f"then: PYTHONPATH={args.into} MODELS=echo,{args.name} ./task up")
    return 0


if __name__ == "__main__":
    sys.exit(main())
