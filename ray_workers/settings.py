"""The workers' and dispatcher's settings, read once from the environment at start."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from contract.callback_guard import AllowList
from contract.config import DEFAULT_AMQP_URL, ConfigError, csv_list, env_float, env_int, served_models
from contract.topology import Topology

DEFAULT_CALLBACK_RETRY_DELAYS_S = (0.0, 1.0, 5.0)


@dataclass(frozen=True)
class WorkerSettings:
    amqp_url: str = field(default=DEFAULT_AMQP_URL, repr=False)
    webhook_secret: str = field(default="", repr=False)
    callback_allow: AllowList = field(default_factory=AllowList)
    models: tuple[str, ...] = ("echo", "embed-minilm")
    topology: Topology = field(default_factory=Topology)
    batch_max_size: int = 32
    batch_max_wait_s: float = 0.005
    callback_timeout_s: float = 10.0
    # Delay before each delivery attempt; after the last one the callback is parked.
    callback_retry_delays_s: tuple[float, ...] = DEFAULT_CALLBACK_RETRY_DELAYS_S
    callback_concurrency: int = 64
    drain_timeout_s: float = 30.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WorkerSettings:
        secret = env.get("WEBHOOK_SECRET", "")
        if not secret:
            raise ConfigError("WEBHOOK_SECRET is not set; expected whsec_<base64> (task up makes one)")
        return cls(
            amqp_url=env.get("AMQP_URL", DEFAULT_AMQP_URL),
            webhook_secret=secret,
            callback_allow=AllowList.parse(csv_list(env.get("CALLBACK_ALLOW_HOSTS", ""))),
            models=served_models(env),
            topology=Topology(prefix=env.get("QUEUE_PREFIX", "")),
            batch_max_size=env_int(env, "BATCH_MAX_SIZE", 32, minimum=1),
            batch_max_wait_s=env_float(env, "BATCH_MAX_WAIT_MS", 5.0) / 1000,
            callback_timeout_s=env_float(env, "CALLBACK_TIMEOUT_S", 10.0, minimum=0.1),
            callback_retry_delays_s=_delays(env.get("CALLBACK_RETRY_DELAYS_S", "")),
            callback_concurrency=env_int(env, "CALLBACK_CONCURRENCY", 64, minimum=1),
            drain_timeout_s=env_float(env, "DRAIN_TIMEOUT_S", 30.0),
        )


def _delays(raw: str) -> tuple[float, ...]:
    if not raw.strip():
        return DEFAULT_CALLBACK_RETRY_DELAYS_S
    try:
        delays = tuple(float(item) for item in csv_list(raw))
    except ValueError as exc:
        raise ConfigError(f"CALLBACK_RETRY_DELAYS_S={raw!r} is not a list of seconds") from exc
    if not delays or any(d < 0 for d in delays):
        raise ConfigError(f"CALLBACK_RETRY_DELAYS_S={raw!r} needs one or more delays >= 0")
    return delays
