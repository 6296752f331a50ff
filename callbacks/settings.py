"""The callback stage's settings, read once from the environment at start.

Only this stage signs, so only it receives WEBHOOK_SECRET (the model replicas never see it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from callbacks.signing import parse_secrets
from contract.callback_guard import AllowList
from contract.config import (
    DEFAULT_AMQP_URL,
    ConfigError,
    csv_list,
    env_float,
    env_int,
    served_models,
    topology_from_env,
)
from contract.topology import Topology


@dataclass(frozen=True)
class CallbackSettings:
    amqp_url: str = field(default=DEFAULT_AMQP_URL, repr=False)
    # Space-separated `whsec_` secrets; the first signs, all are sent (key rotation).
    webhook_secret: str = field(default="", repr=False)
    callback_allow: AllowList = field(default_factory=AllowList)
    models: tuple[str, ...] = ("echo", "embed-minilm")
    topology: Topology = field(default_factory=Topology)
    callback_timeout_s: float = 10.0
    # Deliveries in flight in all and per host; prefetched ones wait in memory for a slot.
    callback_concurrency: int = 256
    callback_host_concurrency: int = 64
    callback_prefetch: int = 1024
    # Callback-host breaker: consecutive failed deliveries that open it, and its cool-down.
    callback_breaker_threshold: int = 5
    callback_breaker_cooldown_s: float = 30.0
    drain_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.callback_host_concurrency > self.callback_concurrency:
            raise ConfigError(
                f"CALLBACK_HOST_CONCURRENCY={self.callback_host_concurrency} exceeds "
                f"CALLBACK_CONCURRENCY={self.callback_concurrency}; a host's share must fit in the total"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> CallbackSettings:
        secret = env.get("WEBHOOK_SECRET", "")
        if not secret.strip():
            raise ConfigError("WEBHOOK_SECRET is not set; expected whsec_<base64> (task up makes one)")
        try:
            parse_secrets(secret)
        except ValueError as exc:
            raise ConfigError(f"WEBHOOK_SECRET: {exc}") from exc
        models = served_models(env)
        return cls(
            amqp_url=env.get("AMQP_URL", DEFAULT_AMQP_URL),
            webhook_secret=secret,
            callback_allow=AllowList.parse(csv_list(env.get("CALLBACK_ALLOW_HOSTS", ""))),
            models=models,
            topology=topology_from_env(env, models),
            callback_timeout_s=env_float(env, "CALLBACK_TIMEOUT_S", 10.0, minimum=0.1),
            callback_concurrency=env_int(env, "CALLBACK_CONCURRENCY", 256, minimum=1),
            callback_host_concurrency=env_int(env, "CALLBACK_HOST_CONCURRENCY", 64, minimum=1),
            callback_prefetch=env_int(env, "CALLBACK_PREFETCH", 1024, minimum=1),
            callback_breaker_threshold=env_int(env, "CALLBACK_BREAKER_THRESHOLD", 5, minimum=1),
            callback_breaker_cooldown_s=env_float(env, "CALLBACK_BREAKER_COOLDOWN_S", 30.0),
            drain_timeout_s=env_float(env, "DRAIN_TIMEOUT_S", 30.0),
        )
