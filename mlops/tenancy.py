"""Tenants of the online service, as pure logic: names, model naming and quotas.

A tenant's models are registered as ``<model>--<tenant>`` (``tenant_model_name``), so the
registry holds one registered model per tenant variant and a name says whose it is.
``TokenBucket`` and ``TenantQuota`` decide admission (requests per second and requests in
flight) from a clock the caller passes in; they do no IO and import no web framework.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from mlops.errors import ConfigError

SEPARATOR = "--"
"""Between the base model name and the tenant in a tenant's registered model name."""
TENANT_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9_]|-(?!-)){0,38}[a-z0-9]$|^[a-z0-9]$")
"""Lower-case letters, digits, ``_`` and single ``-``; 1-40 characters, no ``--``."""


def check_tenant_name(name: str) -> str:
    """``name`` when it is a valid tenant name; else ``ConfigError`` saying the rule."""
    if not TENANT_NAME.match(name):
        raise ConfigError(
            f"invalid tenant name {name[:60]!r}: use 1-40 lower-case letters, digits, '_' or single '-', "
            "starting and ending with a letter or digit"
        )
    return name


def tenant_model_name(model: str, tenant: str) -> str:
    """The registered model name of ``tenant``'s variant of ``model``: ``<model>--<tenant>``."""
    return f"{model}{SEPARATOR}{check_tenant_name(tenant)}"


def owner_of(registered: str) -> str | None:
    """The tenant a registered model name belongs to (the part after the last ``--``), or None."""
    base, sep, tenant = registered.rpartition(SEPARATOR)
    if not sep or not base or not TENANT_NAME.match(tenant):
        return None
    return tenant


@dataclass
class TokenBucket:
    """``rate`` tokens per second up to ``burst``; a request takes one token."""

    rate: float
    burst: float
    tokens: float = field(default=-1.0)
    updated: float = 0.0

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = self.burst

    def take(self, now: float) -> float:
        """0.0 when a token was taken; else the seconds until one is available (none taken)."""
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
        if self.tokens >= 1.0 - 1e-9:  # float sums of refills land a hair below 1
            self.tokens = max(0.0, self.tokens - 1.0)
            return 0.0
        return (1.0 - self.tokens) / self.rate


@dataclass
class TenantQuota:
    """One tenant's admission state: a request-rate bucket and a cap on requests in flight."""

    bucket: TokenBucket
    max_concurrent: int
    inflight: int = 0

    def admit(self, now: float) -> int:
        """0 when the request is admitted (counted in flight until ``done``); else the whole
        seconds the caller should wait before retrying (``Retry-After``, at least 1)."""
        if self.inflight >= self.max_concurrent:
            return 1
        wait = self.bucket.take(now)
        if wait > 0:
            return max(1, math.ceil(wait))
        self.inflight += 1
        return 0

    def done(self) -> None:
        """A request admitted by ``admit`` has been answered."""
        self.inflight -= 1
