"""Settings read from the environment: what each variable accepts, what a bad value says,
which process gets which secret, and what a machine of this size may run."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from callbacks.settings import CallbackSettings
from ingress.settings import IngressSettings
from local_stack.launcher import StackSettings, _scaling_plan
from ray_workers.settings import WorkerSettings
from settings.environment import ConfigError
from wire.topology import DEFAULT_JOB_RETRY_DELAYS_S

SECRET = "whsec_" + "A" * 44
KEDA_DIR = Path(__file__).resolve().parent.parent / "keda"


def test_given_a_host_share_above_the_total_then_start_fails_naming_both_variables() -> None:
    env = {"WEBHOOK_SECRET": SECRET, "CALLBACK_CONCURRENCY": "16", "CALLBACK_HOST_CONCURRENCY": "32"}
    with pytest.raises(ConfigError, match="CALLBACK_HOST_CONCURRENCY=32 exceeds CALLBACK_CONCURRENCY=16"):
        CallbackSettings.from_env(env)


def test_given_the_defaults_then_one_host_may_take_64_callbacks_at_once_from_a_window_of_1024() -> None:
    settings = CallbackSettings.from_env({"WEBHOOK_SECRET": SECRET})
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


@pytest.mark.parametrize("threads", [1, 3])
def test_given_model_threads_then_a_machine_runs_the_replicas_its_cores_allow_beside_the_message_path(
    threads: int,
) -> None:
    env = {"WEBHOOK_SECRET": SECRET, "MODEL_THREADS": str(threads)}
    assert StackSettings.from_env(env).local_max_replicas == max(1, (os.cpu_count() or 1) // (threads + 1))


def test_given_no_model_threads_then_a_replica_runs_on_every_core_and_one_replica_runs() -> None:
    settings = StackSettings.from_env({"WEBHOOK_SECRET": SECRET})
    assert settings.workers.model_threads == (os.cpu_count() or 1)
    assert settings.local_max_replicas == 1


def test_given_no_webhook_secret_then_workers_start_and_the_callback_stage_refuses_naming_it() -> None:
    workers = WorkerSettings.from_env({})

    assert not hasattr(workers, "webhook_secret")  # a model replica never holds the key
    with pytest.raises(ConfigError, match="WEBHOOK_SECRET is not set"):
        CallbackSettings.from_env({})
    with pytest.raises(ConfigError, match="secret 1 of WEBHOOK_SECRET must look like whsec_"):
        CallbackSettings.from_env({"WEBHOOK_SECRET": "hunter2"})


def test_the_secrets_never_appear_in_a_repr() -> None:
    callbacks = CallbackSettings.from_env({"WEBHOOK_SECRET": SECRET, "AMQP_URL": "amqp://u:pw-9@h/%2F"})
    ingress = IngressSettings.from_env({"API_KEYS": "key-123", "AMQP_URL": "amqp://u:pw-9@h/%2F"})

    for text in (repr(callbacks), repr(ingress)):
        assert "A" * 44 not in text and "pw-9" not in text and "key-123" not in text


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BATCH_MAX_SIZE": "many"}, "BATCH_MAX_SIZE='many': Input should be a valid integer"),
        ({"BATCH_MAX_SIZE": "0"}, "BATCH_MAX_SIZE='0': Input should be greater than or equal to 1"),
        ({"BATCH_ADAPTIVE": "maybe"}, "BATCH_ADAPTIVE='maybe': Input should be a valid boolean"),
        ({"RETRY_DELAYS_S": "5,soon"}, "RETRY_DELAYS_S='5,soon' (item 2): Input should be a valid number"),
        ({"RETRY_DELAYS_S": "5,-1"}, "RETRY_DELAYS_S='5,-1' (item 2): Input should be greater than 0"),
        ({"RETRY_DELAYS_S_ECHO": "x"}, "RETRY_DELAYS_S_ECHO='x' (item 1): Input should be a valid number"),
        ({"MODELS": "echo,gpt-9"}, "MODELS='echo,gpt-9': names unknown model(s) ['gpt-9']"),
        ({"MODELS": " , "}, "MODELS=' , ': Value should have at least 1 item"),
        ({"MODELS": "synthetic"}, "MODELS lists ['synthetic'], which needs ENABLE_TEST_MODELS=1"),
        ({"RETRY_JITTER": "1.5"}, "RETRY_JITTER='1.5': Input should be less than 1"),
        ({"INGRESS_PORT": "99999"}, "INGRESS_PORT='99999': Input should be less than or equal to 65535"),
        ({"AMQP_URL": "amqp://u:pw-9@h/", "DRAIN_TIMEOUT_S": "-1"}, "DRAIN_TIMEOUT_S='-1'"),
    ],
)
def test_given_a_bad_value_then_start_fails_naming_the_variable_and_what_it_accepts(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        WorkerSettings.from_env(env)


def test_given_documented_variables_then_they_reach_the_settings_in_their_units() -> None:
    env = {
        "MODELS": "echo",
        "ENABLE_TEST_MODELS": "1",
        "QUEUE_PREFIX": "t-",
        "MAX_QUEUE_LENGTH": "7",
        "RETRY_DELAYS_S": "1,2",
        "RETRY_DELAYS_S_ECHO": "3",
        "BATCH_MAX_WAIT_MS": "20",
        "BATCH_LATENCY_TARGET_MS_ECHO": "50",
    }
    settings = WorkerSettings.from_env(env)

    assert settings.models == ("echo", "synthetic")
    assert settings.topology.main_queue("echo") == "t-jobs.echo"
    assert settings.topology.max_queue_length == 7
    assert settings.topology.job_retry_schedule("echo").delays_s == (3.0,)
    assert settings.topology.job_retry_schedule("synthetic").delays_s == (1.0, 2.0)
    echo, synthetic = settings.batching_for("echo"), settings.batching_for("synthetic")
    assert (echo.max_wait_s, synthetic.max_wait_s) == (0.02, 0.02)
    assert (echo.latency_target_s, synthetic.latency_target_s) == (0.05, 0.2)


def test_given_a_bad_secret_bearing_value_then_the_error_never_shows_it() -> None:
    with pytest.raises(ConfigError) as error:
        IngressSettings.from_env(
            {"API_KEYS": "k-1", "CALLBACK_CONCURRENCY": "1", "CALLBACK_HOST_CONCURRENCY": "2"}
        )
    assert "k-1" not in str(error.value)
    with pytest.raises(ConfigError, match="WEBHOOK_SECRET") as error:
        CallbackSettings.from_env({"WEBHOOK_SECRET": "whsec_c2hvcnQ="})
    assert "c2hvcnQ" not in str(error.value)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "ingress.internal"])
def test_given_a_bind_beyond_loopback_and_no_api_keys_then_the_ingress_refuses_to_start(host: str) -> None:
    """Hardening item 16: no silent open relay; the opt-out is explicit and named."""
    with pytest.raises(ConfigError, match=r"API_KEYS is empty.*ALLOW_UNAUTHENTICATED=1"):
        IngressSettings.from_env({"INGRESS_HOST": host})

    assert IngressSettings.from_env({"INGRESS_HOST": host, "API_KEYS": "k1"}).api_keys == ("k1",)
    assert IngressSettings.from_env({"INGRESS_HOST": host, "ALLOW_UNAUTHENTICATED": "1"}).api_keys == ()
    assert IngressSettings.from_env({"INGRESS_HOST": "127.0.0.1"}).api_keys == ()  # loopback: fine


def test_given_a_catalogue_then_each_model_runs_by_its_sections_and_a_set_variable_wins(
    tmp_path: Path,
) -> None:
    catalogue = tmp_path / "models.yaml"
    catalogue.write_text(
        "models:\n"
        "  echo:\n"
        "    class: ray_workers.models.echo:EchoModel\n"
        "    batching: {max_size: 16, latency_target_ms: 40, adaptive: false}\n"
        "    jobs: {retry_delays_s: [2, 4]}\n"
        "  other:\n"
        "    class: ray_workers.models.echo:EchoModel\n"
    )
    base = {"MODEL_CATALOGUE": str(catalogue), "MODELS": "echo,other"}

    by_catalogue = WorkerSettings.from_env(base)
    by_variables = WorkerSettings.from_env({**base, "BATCH_MAX_SIZE": "8", "RETRY_DELAYS_S": "9"})
    by_model_variable = WorkerSettings.from_env({**base, "RETRY_DELAYS_S_ECHO": "7"})

    echo = by_catalogue.batching_for("echo")
    assert (echo.max_size, echo.latency_target_s, echo.adaptive) == (16, 0.04, False)
    assert by_catalogue.batching_for("other").max_size == 128  # the platform's default
    assert by_catalogue.topology.job_retry_schedule("echo").delays_s == (2.0, 4.0)
    assert by_catalogue.topology.job_retry_schedule("other").delays_s == DEFAULT_JOB_RETRY_DELAYS_S
    assert by_variables.batching_for("echo").max_size == by_variables.batching_for("other").max_size == 8
    assert by_variables.batching_for("echo").latency_target_s == 0.04  # unset variables keep the catalogue's
    assert by_variables.topology.job_retry_schedule("echo").delays_s == (9.0,)
    assert by_model_variable.topology.job_retry_schedule("echo").delays_s == (7.0,)
