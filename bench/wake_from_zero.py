"""Waking from zero, push against poll (`task bench -- --only wake`; not in the default run,
it starts the stack 2 x reps times).

Each repetition starts the local stack twice, both models at zero replicas: once with
push activation on and the ScaledObjects polling only every 30 s (so a poll cannot be
what wakes a model), once with push activation off and the shipped 5 s polling. One
echo and one embed-minilm job go in together; the figure is the time from submission to
their verified callbacks, broken down from the stack's log (detection, replica start,
model load, first batch).
"""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from callbacks.signing import generate_secret
from loadgen.measurement import bench_stack_env, bench_topology, delete_bench_topology, median
from loadgen.receiver_process import ReceiverProcess
from loadgen.scale_report import FirstJob, scale_from_zero
from loadgen.stack_process import StackProcess

KEDA_DIR = Path(__file__).resolve().parent.parent / "keda"
MODELS = ("echo", "embed-minilm")
INPUTS = {"echo": "wake", "embed-minilm": "wake up"}
WAKE_TIMEOUT_S = 90.0
SCALE_LOG_WAIT_S = 30.0


async def _wake_once(amqp_url: str, push: bool, polling_s: int) -> dict[str, dict[str, float]]:
    topology = bench_topology()
    secret = generate_secret()
    with tempfile.TemporaryDirectory() as folder:
        for model in MODELS:
            doc = yaml.safe_load((KEDA_DIR / f"scaledobject-{model}.yaml").read_text())
            doc["spec"]["pollingInterval"] = polling_s
            (Path(folder) / f"scaledobject-{model}.yaml").write_text(yaml.safe_dump(doc))
        env = bench_stack_env(
            amqp_url, topology, secret, SCALEDOBJECTS_DIR=folder, LOCAL_PUSH_ACTIVATION="1" if push else "0"
        )
        receiver = ReceiverProcess(secret)
        stack = StackProcess(env)
        await receiver.start()
        try:
            await stack.start()
            submitted = await _submit(stack.base_url, receiver.url)
            if not await receiver.wait_for(set(submitted), WAKE_TIMEOUT_S):
                raise TimeoutError(f"no callbacks within {WAKE_TIMEOUT_S} s (push={push})")
            await stack.wait_for_output([f"autoscaler {m}: 0 ->" for m in MODELS], SCALE_LOG_WAIT_S)
            arrived = {r.job_id: r for r in receiver.records}
            first_jobs = {
                model: FirstJob(
                    at_wall_s, arrived[job_id].received_wall_s - at_wall_s, arrived[job_id].inference_ms
                )
                for job_id, (model, at_wall_s) in submitted.items()
            }
            return {
                wake.model: {
                    "callback_s": wake.callback_s,
                    "detection_s": wake.detection_s,
                    "replica_start_s": wake.replica_start_s,
                    "model_load_s": wake.model_load_s if wake.model_load_s is not None else float("nan"),
                    "first_batch_ms": wake.first_batch_ms,
                }
                for wake in scale_from_zero(stack.output(), first_jobs)
            }
        finally:
            await stack.stop()
            await receiver.stop()
            await delete_bench_topology(amqp_url, topology, MODELS)


async def _submit(base_url: str, callback_url: str) -> dict[str, tuple[str, float]]:
    """One job per model, together; job id -> (model, submitted wall-clock s)."""
    submitted: dict[str, tuple[str, float]] = {}
    async with aiohttp.ClientSession() as session:
        for model in MODELS:
            at_wall_s = time.time()
            body = {"input": INPUTS[model], "callback_url": callback_url, "metadata": {"n": uuid.uuid4().hex}}
            async with session.post(f"{base_url}/v1/models/{model}/jobs", json=body) as response:
                if response.status != 202:
                    raise RuntimeError(f"{model} job refused: {response.status} {await response.text()}")
                submitted[str((await response.json())["id"])] = (model, at_wall_s)
    return submitted


async def measure_wake(amqp_url: str, reps: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, dict[str, float]]]] = {"push": [], "poll": []}
    for _ in range(reps):
        runs["push"].append(await _wake_once(amqp_url, push=True, polling_s=30))
        runs["poll"].append(await _wake_once(amqp_url, push=False, polling_s=5))
    medians = {
        mode: {
            model: {
                key: median([run[model][key] for run in mode_runs if model in run])
                for key in mode_runs[0][model]
            }
            for model in MODELS
        }
        for mode, mode_runs in runs.items()
    }
    return {"runs": runs, "medians": medians}
