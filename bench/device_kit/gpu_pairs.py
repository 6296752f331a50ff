"""One tree's embed-minilm worker path on the device the model picks, with the bench's own
functions (`bench.minilm_device`): median jobs/s of one-text jobs through the real broker
and a JobWorker. TREE names the tree (this repo, or build.sh's base); prints one RESULT."""

import asyncio
import importlib
import json
import os
import sys


def main() -> None:
    tree = os.environ["TREE"]
    sys.path.insert(0, tree)
    bench = importlib.import_module("bench.minilm_device")
    model = importlib.import_module("ray_workers.models.minilm").MiniLMModel()
    amqp = os.environ.get("AMQP", "amqp://guest:guest@127.0.0.1:5672/%2F")
    reps, jobs = int(os.environ.get("REPS", "3")), int(os.environ.get("JOBS", "4000"))
    result = asyncio.run(bench._worker_path(amqp, model, reps, jobs, 1))
    if os.environ.get("ALONE"):
        result["model_alone_256"] = bench._model_alone(model, 256)
    tree_name = os.path.basename(tree.rstrip("/"))
    print("RESULT", json.dumps({"tree": tree_name, "device": model.device, **result}), flush=True)


if __name__ == "__main__":
    main()
