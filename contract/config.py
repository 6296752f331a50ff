"""Parsing of the environment variables both services share.

Each service reads its environment once, at its entry point, into its own typed
settings object; these helpers keep the shared names and their rules in one place.
"""

from __future__ import annotations

from collections.abc import Mapping

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
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is not an integer") from exc
    if value < minimum:
        raise ConfigError(f"{name}={value} is below the minimum {minimum}")
    return value


def env_float(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is not a number") from exc
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
