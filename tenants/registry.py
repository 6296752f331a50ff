"""Who is calling: tenants, each an API key with a name and, optionally, limits.

`API_KEYS` keeps working: each key is a tenant without limits, named
`key-<first 8 hex of its digest>`. `TENANTS_FILE` (YAML) adds named tenants:

    tenants:
      - name: acme                 # metrics and logs say this, never the key
        key_sha256: 9f86d0...      # or `key: <the key itself>`
        rate_per_s: 20             # token bucket on submitted jobs (a batch counts its jobs)
        burst: 40                  #   with rate_per_s: the bucket's size
        max_queued: 5000           # jobs queued or running at once
        weight: 2                  # fair share against other tenants' jobs (default 1)
        models: [embed-minilm]     # the models it may use (default: all served)

A job's record keeps the key's digest (its `owner`); only that key reads or cancels it.
Keys are looked up by their SHA-256, so the file need not hold the keys themselves.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import msgspec
import yaml

from settings.environment import ConfigError
from wire.envelope import MAX_TENANT_WEIGHT

_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
ANONYMOUS = "anonymous"


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Tenant:
    name: str
    key_sha256: str
    rate_per_s: float | None = None
    burst: int | None = None
    max_queued: int | None = None
    models: tuple[str, ...] | None = None
    weight: float = 1.0

    @property
    def owner(self) -> str:
        """The digest a job record keeps of the key that owns it ("" with auth off)."""
        return self.key_sha256[:32]

    @property
    def rate_limited(self) -> bool:
        return self.rate_per_s is not None and self.burst is not None


NO_AUTH = Tenant(ANONYMOUS, "")


class _TenantEntry(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    key: str | None = None
    key_sha256: str | None = None
    rate_per_s: Annotated[float, msgspec.Meta(gt=0)] | None = None
    burst: Annotated[int, msgspec.Meta(ge=1)] | None = None
    max_queued: Annotated[int, msgspec.Meta(ge=1)] | None = None
    models: list[str] | None = None
    weight: Annotated[float, msgspec.Meta(gt=0, le=MAX_TENANT_WEIGHT)] = 1.0


class _TenantsFile(msgspec.Struct, forbid_unknown_fields=True):
    tenants: list[_TenantEntry]


class Tenants:
    """The tenants of one deployment, found by the key a request presents."""

    def __init__(self, tenants: Iterable[Tenant]) -> None:
        self._by_digest: dict[str, Tenant] = {}
        for tenant in tenants:
            if tenant.key_sha256 in self._by_digest:
                other = self._by_digest[tenant.key_sha256].name
                raise ConfigError(f"tenants {other!r} and {tenant.name!r} have the same key")
            self._by_digest[tenant.key_sha256] = tenant
        names = [tenant.name for tenant in self._by_digest.values()]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ConfigError(f"tenant names must be unique; repeated: {duplicates}")

    @classmethod
    def of(cls, api_keys: tuple[str, ...], named: tuple[Tenant, ...]) -> Tenants:
        """`API_KEYS` as unnamed tenants without limits, plus the named ones."""
        digests = [key_digest(key) for key in api_keys]
        return cls([*(Tenant(f"key-{digest[:8]}", digest) for digest in digests), *named])

    @property
    def auth_off(self) -> bool:
        return not self._by_digest

    @property
    def all(self) -> tuple[Tenant, ...]:
        return tuple(self._by_digest.values())

    def find(self, key: str) -> Tenant | None:
        digest = key_digest(key)
        tenant = self._by_digest.get(digest)
        if tenant is None or not hmac.compare_digest(tenant.key_sha256, digest):
            return None
        return tenant


def load_tenants_file(path: Path, models: tuple[str, ...]) -> tuple[Tenant, ...]:
    """The tenants a TENANTS_FILE names, each checked; ConfigError naming what is wrong."""
    try:
        raw = yaml.safe_load(path.read_text())
        entries = msgspec.convert(raw, _TenantsFile).tenants
    except OSError as exc:
        raise ConfigError(f"TENANTS_FILE={path}: cannot be read: {exc}") from exc
    except (yaml.YAMLError, msgspec.ValidationError) as exc:
        raise ConfigError(f"TENANTS_FILE={path}: {exc}") from exc
    return tuple(_tenant(entry, index, path, models) for index, entry in enumerate(entries))


def _tenant(entry: _TenantEntry, index: int, path: Path, models: tuple[str, ...]) -> Tenant:
    where = f"TENANTS_FILE={path}: tenants[{index}]"
    if not _NAME.fullmatch(entry.name):
        raise ConfigError(f"{where}.name {entry.name!r}: lowercase letters, digits, '_', '.', '-' (1-63)")
    if (entry.key is None) == (entry.key_sha256 is None):
        raise ConfigError(f"{where} ({entry.name}): give exactly one of `key` and `key_sha256`")
    digest = key_digest(entry.key) if entry.key is not None else str(entry.key_sha256).lower()
    if not _SHA256.fullmatch(digest):
        raise ConfigError(f"{where}.key_sha256 ({entry.name}): 64 hex digits")
    if (entry.rate_per_s is None) != (entry.burst is None):
        raise ConfigError(f"{where} ({entry.name}): `rate_per_s` and `burst` go together")
    unknown = sorted(set(entry.models or ()) - set(models))
    if unknown:
        raise ConfigError(f"{where}.models ({entry.name}): {unknown} are not served (MODELS={list(models)})")
    return Tenant(
        name=entry.name,
        key_sha256=digest,
        rate_per_s=entry.rate_per_s,
        burst=entry.burst,
        max_queued=entry.max_queued,
        models=None if entry.models is None else tuple(entry.models),
        weight=entry.weight,
    )
