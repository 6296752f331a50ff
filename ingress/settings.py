"""The ingress's settings, read once from the environment at start."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from contract.callback_guard import AllowList
from contract.config import (
    DEFAULT_AMQP_URL,
    csv_list,
    env_flag,
    env_int,
    served_models,
    topology_from_env,
)
from contract.topology import Topology


@dataclass(frozen=True)
class IngressSettings:
    amqp_url: str = field(default=DEFAULT_AMQP_URL, repr=False)
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    callback_allow: AllowList = field(default_factory=AllowList)
    max_body_bytes: int = 1024 * 1024
    models: tuple[str, ...] = ("echo", "embed-minilm")
    topology: Topology = field(default_factory=Topology)
    publish_timeout_s: float = 10.0
    retry_after_s: int = 5
    # One log line per request costs about a tenth of the ingress's CPU at a backlog.
    access_log: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> IngressSettings:
        models = served_models(env)
        return cls(
            amqp_url=env.get("AMQP_URL", DEFAULT_AMQP_URL),
            host=env.get("INGRESS_HOST", "127.0.0.1"),
            port=env_int(env, "INGRESS_PORT", 8000, minimum=0),
            api_keys=csv_list(env.get("API_KEYS", "")),
            callback_allow=AllowList.parse(csv_list(env.get("CALLBACK_ALLOW_HOSTS", ""))),
            max_body_bytes=env_int(env, "MAX_BODY_BYTES", 1024 * 1024, minimum=1),
            models=models,
            topology=topology_from_env(env, models),
            access_log=env_flag(env, "INGRESS_ACCESS_LOG"),
        )
