"""Wake from zero on a demand event, on the real stack: with the ScaledObject polling only
every 30 s, the first echo job is called back within seconds (a poll could not have woken
it). Polling alone, with events off, is proved by the scale-to-zero phases."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest
import yaml

from loadgen.callback_receiver import CallbackReceiver
from loadgen.stack_process import StackProcess
from wire.topology import Topology

pytestmark = [pytest.mark.stack, pytest.mark.slow]

KEDA_DIR = Path(__file__).resolve().parent.parent / "keda"
POLLING_S = 30


async def test_given_polling_every_30_s_then_a_demand_event_wakes_echo_within_seconds(
    amqp_url: str, topology: Topology, receiver: CallbackReceiver, webhook_secret: str, tmp_path: Path
) -> None:
    scaled_object = yaml.safe_load((KEDA_DIR / "scaledobject-echo.yaml").read_text())
    scaled_object["spec"]["pollingInterval"] = POLLING_S
    (tmp_path / "scaledobject-echo.yaml").write_text(yaml.safe_dump(scaled_object))
    process = StackProcess(
        {
            **os.environ,
            "AMQP_URL": amqp_url,
            "QUEUE_PREFIX": topology.prefix,
            "WEBHOOK_SECRET": webhook_secret,
            "CALLBACK_ALLOW_HOSTS": "127.0.0.1",
            "MODELS": "echo",
            "SCALEDOBJECTS_DIR": str(tmp_path),
        }
    )
    try:
        await process.start()
        async with httpx.AsyncClient(base_url=process.base_url, timeout=30) as client:
            submitted = time.monotonic()
            response = await client.post(
                "/v1/models/echo/jobs", json={"input": "wake", "callback_url": receiver.url}
            )
            assert response.status_code == 202
            (callback,) = await receiver.wait_for(1, timeout_s=POLLING_S - 5)
            metrics = (await client.get(f"http://127.0.0.1:{process.metrics_port}/metrics")).text
        woke_s = callback.received_monotonic_s - submitted
    finally:
        assert await process.stop() == 0, process.output()[-3000:]

    print(
        f"\npush activation: first echo callback {woke_s:.1f} s after submission (polls every {POLLING_S} s)"
    )
    assert callback.event["data"]["id"] == response.json()["id"]
    assert woke_s < POLLING_S - 5
    assert 'inferq_autoscaler_decisions_total{model="echo",rule="push-activation"} 1.0' in metrics
