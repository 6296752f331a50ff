"""Parsing of the environment variables both services share.

Each service reads its environment once, at its entry point, into its own typed
settings object; these helpers keep the shared names and their rules in one place.
"""

from __future__ import annotations

from collections.abc import Mapping

from contract.retry_tiers import RetrySchedule
from contract.topology import DEFAULT_CALLBACK_RETRY_DELAYS_S, DEFAULT_JOB_RETRY_DELAYS_S, Topology

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
DEFAULT_MODELS = "echo,embed-minilm"
TEST_MODELS = ("synthetic",)
KNOWN_MODELS = ("echo", "embed-minilm", "synthetic")


class ConfigError(ValueError):
    """An environment variable holds a value the service cannot use."""


def csv_list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def env_flag(env: Mapping[str, str], name: str, default: bool = False) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean; expected one of 1/0, true/false, on/off")


def env_int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    return int(_env_number(env, name, default, minimum, int))


def env_float(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    return _env_number(env, name, default, minimum, float)


def _env_number(
    env: Mapping[str, str], name: str, default: float, minimum: float, parse: type[int] | type[float]
) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is not {'an integer' if parse is int else 'a number'}") from exc
    if value < minimum:
        raise ConfigError(f"{name}={value} is below the minimum {minimum}")
    return value


def served_models(env: Mapping[str, str]) -> tuple[str, ...]:
    """`MODELS`, plus the test models when `ENABLE_TEST_MODELS` is on."""
    models = csv_list(env.get("MODELS", DEFAULT_MODELS))
    unknown = [model for model in models if model not in KNOWN_MODELS]
    if unknown:
        raise ConfigError(f"MODELS names unknown model(s) {unknown}; known: {list(KNOWN_MODELS)}")
    test_models = [m for m in models if m in TEST_MODELS]
    enabled = env_flag(env, "ENABLE_TEST_MODELS")
    if test_models and not enabled:
        raise ConfigError(f"MODELS lists {test_models}, which needs ENABLE_TEST_MODELS=1")
    if enabled:
        models += tuple(m for m in TEST_MODELS if m not in models)
    if not models:
        raise ConfigError("MODELS is empty; name at least one model")
    return models


def env_delays(env: Mapping[str, str], name: str, default: tuple[float, ...]) -> tuple[float, ...]:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        delays = tuple(float(item) for item in csv_list(raw))
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is not a comma-separated list of seconds") from exc
    if not delays or any(delay <= 0 for delay in delays):
        raise ConfigError(f"{name}={raw!r} needs one or more delays > 0 s")
    return delays


def model_env_suffix(model: str) -> str:
    """`embed-minilm` -> `EMBED_MINILM`, for per-model variables."""
    return model.upper().replace("-", "_")


def topology_from_env(env: Mapping[str, str], models: tuple[str, ...]) -> Topology:
    """The topology both services must agree on: names, limits and retry schedules.

    `RETRY_DELAYS_S` is the job retry schedule; `RETRY_DELAYS_S_<MODEL>` overrides it
    for one model (e.g. `RETRY_DELAYS_S_EMBED_MINILM`).
    """
    jitter = env_float(env, "RETRY_JITTER", 0.1)
    if jitter >= 1:
        raise ConfigError(f"RETRY_JITTER={jitter} must be below 1")
    default_delays = env_delays(env, "RETRY_DELAYS_S", DEFAULT_JOB_RETRY_DELAYS_S)
    by_model = {
        model: RetrySchedule(
            env_delays(env, f"RETRY_DELAYS_S_{model_env_suffix(model)}", default_delays), jitter
        )
        for model in models
    }
    return Topology(
        prefix=env.get("QUEUE_PREFIX", ""),
        max_queue_length=env_int(env, "MAX_QUEUE_LENGTH", 100_000, minimum=1),
        job_retries=RetrySchedule(default_delays, jitter),
        job_retries_by_model=by_model,
        callback_retries=RetrySchedule(
            env_delays(env, "CALLBACK_RETRY_DELAYS_S", DEFAULT_CALLBACK_RETRY_DELAYS_S), jitter
        ),
    )
