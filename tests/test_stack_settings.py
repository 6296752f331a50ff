"""The local stack's and the workers' settings: what the environment may say, and what
a machine of this size may run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from contract.config import ConfigError
from ray_workers.local_stack import StackSettings, _scaling_plan
from ray_workers.settings import WorkerSettings

SECRET = "whsec_" + "A" * 44
KEDA_DIR = Path(__file__).resolve().parent.parent / "keda"


def test_given_a_host_share_above_the_total_then_start_fails_naming_both_variables() -> None:
    env = {"WEBHOOK_SECRET": SECRET, "CALLBACK_CONCURRENCY": "16", "CALLBACK_HOST_CONCURRENCY": "32"}
    with pytest.raises(ConfigError, match="CALLBACK_HOST_CONCURRENCY=32 exceeds CALLBACK_CONCURRENCY=16"):
        WorkerSettings.from_env(env)


def test_given_the_defaults_then_one_host_may_take_64_callbacks_at_once_from_a_window_of_1024() -> None:
    settings = WorkerSettings.from_env({"WEBHOOK_SECRET": SECRET})
    assert (settings.callback_host_concurrency, settings.callback_concurrency) == (64, 256)
    assert settings.callback_prefetch == 1024


@pytest.mark.parametrize(
    ("local_max", "expected"), [("1", {"echo": 1, "embed-minilm": 1}), ("3", {"echo": 3, "embed-minilm": 3})]
)
def test_given_local_max_replicas_then_the_scaledobjects_maxima_are_capped_to_it(
    local_max: str, expected: dict[str, int]
) -> None:
    env = {"WEBHOOK_SECRET": SECRET, "SCALEDOBJECTS_DIR": str(KEDA_DIR), "LOCAL_MAX_REPLICAS": local_max}
    policies, initial = _scaling_plan(StackSettings.from_env(env))

    assert {model: p.max_replicas for model, p in policies.items()} == expected
    assert all(
        p.fallback_replicas is None or p.fallback_replicas <= p.max_replicas for p in policies.values()
    )
    assert initial == {"echo": 0, "embed-minilm": 0}


def test_given_model_threads_then_a_machine_runs_as_many_replicas_as_its_cores_allow() -> None:
    env = {"WEBHOOK_SECRET": SECRET, "MODEL_THREADS": "1"}
    assert StackSettings.from_env(env).local_max_replicas == (os.cpu_count() or 1)
