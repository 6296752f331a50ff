"""The scale-from-zero breakdown, read from a local-stack log."""

from __future__ import annotations

from datetime import datetime

import pytest

from loadgen.scale_report import FirstJob, scale_from_zero

LOG = """\
2026-11-28 08:58:17,552 INFO serve: Application 'callbacks' is ready.
(ServeReplica:worker-embed-minilm pid=1) INFO:ray_workers.deployment:model embed-minilm loaded in 2.88 s
2026-11-28 08:58:30,100 INFO autoscaler.loop: autoscaler embed-minilm: 0 -> 1 replicas, \
backlog 3 (activation: metric 3 > 0); applied in 5.1 s
2026-11-28 08:59:30,100 INFO autoscaler.loop: autoscaler embed-minilm: 0 -> 1 replicas, \
backlog 1 (activation: metric 1 > 0); applied in 1.0 s
2026-11-28 08:58:31,000 INFO autoscaler.loop: autoscaler echo: 1 -> 2 replicas, backlog 900 \
(metric 900 / value 200 -> 5); applied in 1.0 s
"""


def test_the_first_wake_up_of_each_model_is_broken_down() -> None:
    submitted = datetime.strptime("2026-11-28 08:58:15,000", "%Y-%m-%d %H:%M:%S,%f").timestamp()
    first_jobs = {
        "embed-minilm": FirstJob(submitted, callback_after_s=15.4, first_batch_ms=212.0),
        "echo": FirstJob(submitted, callback_after_s=3.0, first_batch_ms=1.0),
    }

    (wake,) = scale_from_zero(LOG, first_jobs)  # echo never woke from zero here

    assert wake.model == "embed-minilm"
    assert wake.detection_s == pytest.approx(30.1 - 5.1 - 15.0)
    assert (wake.replica_start_s, wake.model_load_s, wake.first_batch_ms) == (5.1, 2.88, 212.0)
    assert wake.callback_s == 15.4
