"""The callback stage's settings, read once from the environment at start.

Only this stage signs, so only it receives WEBHOOK_SECRET (the model replicas never see it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from callbacks.signing import InvalidWebhookSecret, parse_secrets
from job_records.store import DEFAULT_RECORD_OUTPUT_MAX_BYTES
from policies.callback_guard import AllowList
from settings.environment import DEFAULT_AMQP_URL, ConfigError, Environment
from wire.topology import Topology


@dataclass(frozen=True)
class CallbackSettings:
    amqp_url: str = field(default=DEFAULT_AMQP_URL, repr=False)
    # Space-separated `whsec_` secrets; the first signs, all are sent (key rotation).
    webhook_secret: str = field(default="", repr=False)
    callback_allow: AllowList = field(default_factory=AllowList)
    dns_timeout_s: float = 3.0
    models: tuple[str, ...] = ("echo", "embed-minilm")
    topology: Topology = field(default_factory=Topology)
    callback_timeout_s: float = 10.0
    # Deliveries in flight in all and per host; prefetched ones wait in memory for a slot.
    callback_concurrency: int = 256
    callback_host_concurrency: int = 64
    # Messages; one carries at most 64 events and 64 KiB of them (broker.settlement).
    callback_prefetch: int = 1024
    # Bytes of messages consumed and unsettled (classic queues), and held for one host.
    callback_prefetch_max_bytes: int = 64 * 1024 * 1024
    callback_host_hold_max_bytes: int = 32 * 1024 * 1024
    # Callback-host breaker: consecutive failed deliveries that open it, and its cool-down.
    callback_breaker_threshold: int = 5
    callback_breaker_cooldown_s: float = 30.0
    # Deferrals (no attempt spent) before a delivery is parked: 288 x the 300 s tier = a day.
    callback_max_deferrals: int = 288
    # The express lane (callbacks.express_lane): at low load, events through Redis first.
    callback_express: bool = True
    drain_timeout_s: float = 30.0
    # Job records, for the callbacks' delivery state; None runs without them.
    redis_url: str | None = field(default=None, repr=False)
    result_ttl_s: int = 24 * 3600
    record_output_max_bytes: int = DEFAULT_RECORD_OUTPUT_MAX_BYTES

    def __post_init__(self) -> None:
        if self.callback_host_concurrency > self.callback_concurrency:
            raise ConfigError(
                f"CALLBACK_HOST_CONCURRENCY={self.callback_host_concurrency} exceeds "
                f"CALLBACK_CONCURRENCY={self.callback_concurrency}; a host's share must fit in the total"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> CallbackSettings:
        read = Environment.read(env)
        if not read.webhook_secret:
            raise ConfigError("WEBHOOK_SECRET is not set; expected whsec_<base64> (task up makes one)")
        try:
            parse_secrets(read.webhook_secret)
        except InvalidWebhookSecret as exc:
            raise ConfigError(str(exc)) from None
        return cls(
            amqp_url=read.amqp_url,
            webhook_secret=read.webhook_secret,
            callback_allow=AllowList.parse(read.callback_allow_hosts),
            dns_timeout_s=read.dns_timeout_s,
            models=read.served_models,
            topology=read.topology(),
            callback_timeout_s=read.callback_timeout_s,
            callback_concurrency=read.callback_concurrency,
            callback_host_concurrency=read.callback_host_concurrency,
            callback_prefetch=read.callback_prefetch,
            callback_prefetch_max_bytes=read.callback_prefetch_max_bytes,
            callback_host_hold_max_bytes=read.callback_host_hold_max_bytes,
            callback_breaker_threshold=read.callback_breaker_threshold,
            callback_breaker_cooldown_s=read.callback_breaker_cooldown_s,
            callback_max_deferrals=read.callback_max_deferrals,
            callback_express=read.callback_express,
            drain_timeout_s=read.drain_timeout_s,
            redis_url=read.records_url,
            result_ttl_s=read.result_ttl_s,
            record_output_max_bytes=read.record_output_max_bytes,
        )
