"""Scale-from-zero latency, broken down from the local stack's log.

For each model woken from zero replicas: detection (job submitted -> the autoscaler
decided 0 -> 1), replica start (the Serve redeploy, model load included), the model
load itself (logged by the replica), the first batch, and the callback.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

_WAKE = re.compile(
    r"^(?P<at>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO autoscaler\.loop: autoscaler "
    r"(?P<model>\S+): 0 -> \d+ replicas.*applied in (?P<apply_s>[\d.]+) s$"
)
_LOADED = re.compile(r"model (?P<model>\S+) loaded in (?P<load_s>[\d.]+) s")


@dataclass(frozen=True)
class ScaleFromZero:
    model: str
    detection_s: float
    replica_start_s: float
    model_load_s: float | None
    first_batch_ms: float
    callback_s: float


@dataclass(frozen=True)
class FirstJob:
    """The first job submitted to a model at zero replicas, and its callback."""

    submitted_wall_s: float
    callback_after_s: float
    first_batch_ms: float


def scale_from_zero(log: str, first_jobs: dict[str, FirstJob]) -> list[ScaleFromZero]:
    loads = {m["model"]: float(m["load_s"]) for m in _LOADED.finditer(log)}
    report = []
    for line in log.splitlines():
        wake = _WAKE.match(line)
        if wake is None or wake["model"] not in first_jobs:
            continue
        job = first_jobs[wake["model"]]
        applied_s = float(wake["apply_s"])
        decided_wall_s = datetime.strptime(wake["at"], "%Y-%m-%d %H:%M:%S,%f").timestamp() - applied_s
        report.append(
            ScaleFromZero(
                wake["model"],
                # Not below 0: the apply time is logged to 0.1 s, so a push wake-up can
                # compute a few ms before its own submission.
                max(0.0, decided_wall_s - job.submitted_wall_s),
                applied_s,
                loads.get(wake["model"]),
                job.first_batch_ms,
                job.callback_after_s,
            )
        )
        del first_jobs[wake["model"]]  # only the first wake-up of each model
    return report
