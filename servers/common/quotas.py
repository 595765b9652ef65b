"""Request quotas per principal (DESIGN.md, Limits): every signed-in call takes a token from
its caller's bucket for its endpoint class, kept in Redis when the mesh has one (replicas share
the count) and in memory otherwise or while Redis fails (ratelimit.TokenBucketLimiter: one stored
moment per caller, whatever the quota). A quota of LIMIT calls per SECONDS lets a burst of LIMIT
calls through, then one every SECONDS / LIMIT.

The classes and their defaults come from the seeds:

  general     1,000 calls a minute   seed 002: "1000 requests per minute per API key"
  monitoring    500 calls an hour    seed 001's "Monitoring" class: stats and metrics
  management    100 calls an hour    seed 001's "Endpoint Management": user administration
  agent       6,000 calls a minute   the worker side of an agent-scoped key (register,
                                     heartbeat, progress, results, messages); no seed has it

A user's calls count together whether they come with a token or with any of the user's API keys,
so more keys buy no more calls; an agent's calls count per key, so each agent has its own budget.

Seed 000's tiers replace the general quota of the accounts an admin puts in one (SetUserTier),
or of every account without one when AGENTMESH_DEFAULT_TIER names one:

  free          100 calls an hour
  pro         1,000 calls an hour
  enterprise  no limit

AGENTMESH_TIERS overrides them as AGENTMESH_QUOTAS does the classes. A token carries the tier it
was issued with; API keys follow a change at once.

Public RPCs (health, sign-up, login: login has its own limit) and the mesh's internal calls are
not counted. A stream counts once, when it opens.

The verdict goes back as seed 001's headers: X-RateLimit-Limit, -Remaining, -Reset (epoch
seconds when the bucket is full again) and -Window (seconds); a refused call is
429 RATE_LIMIT_EXCEEDED with Retry-After. gRPC callers get the same keys, lower-case, as trailing
metadata (interceptors.QuotaInterceptor).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import RateLimited

if TYPE_CHECKING:
    from .context import Principal
    from .ratelimit import Verdict

CLASSES = ("general", "monitoring", "management", "agent")


@dataclass(frozen=True)
class Quota:
    limit: int  # calls per window; 0: not limited
    window: int  # seconds


DEFAULTS: Mapping[str, Quota] = {
    "general": Quota(1000, 60),
    "monitoring": Quota(500, 3600),
    "management": Quota(100, 3600),
    "agent": Quota(6000, 60),
}
TIER_DEFAULTS: Mapping[str, Quota] = {
    "free": Quota(100, 3600),
    "pro": Quota(1000, 3600),
    "enterprise": Quota(0, 3600),
}
TIERS = tuple(TIER_DEFAULTS)
MAX_WINDOW = 86_400


def parse(
    raw: str, defaults: Mapping[str, Quota] = DEFAULTS, *, what: str = "CLASS"
) -> dict[str, Quota]:
    """The quotas of AGENTMESH_QUOTAS (or, with TIER_DEFAULTS, AGENTMESH_TIERS),
    ``name=limit/seconds`` separated by commas (a name not given keeps its default;
    ``name=0``: not limited), over the defaults."""
    quotas = dict(defaults)
    for item in filter(None, (part.strip() for part in raw.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in defaults:
            raise ValueError(
                f"{item!r}: expected {what}=LIMIT/SECONDS, {what} one of {tuple(defaults)}"
            )
        limit_text, _, window_text = value.partition("/")
        try:
            limit = int(limit_text)
            window = int(window_text) if window_text else quotas[name].window
        except ValueError:
            raise ValueError(f"{item!r}: LIMIT and SECONDS must be integers") from None
        if limit < 0 or not 1 <= window <= MAX_WINDOW:
            raise ValueError(f"{item!r}: LIMIT >= 0 and 1 <= SECONDS <= {MAX_WINDOW}")
        quotas[name] = Quota(limit, window)
    return quotas


def headers(verdict: Verdict, window: int) -> list[tuple[str, str]]:
    """Seed 001's rate-limit headers for a verdict, as gRPC metadata keys."""
    return [
        ("x-ratelimit-limit", str(verdict.limit)),
        ("x-ratelimit-remaining", str(verdict.remaining)),
        ("x-ratelimit-reset", str(math.ceil(verdict.reset))),
        ("x-ratelimit-window", str(window)),
    ]


class Quotas:
    """The limiters of every limited class; ``charge`` counts one call."""

    def __init__(
        self,
        quotas: Mapping[str, Quota],
        *,
        tiers: Mapping[str, Quota] = TIER_DEFAULTS,
        default_tier: str = "",
        redis_url: str | None = None,
        prefix: str = "agentmesh:",
    ) -> None:
        from .ratelimit import TokenBucketLimiter  # redis: not for the settings' import

        self._default_tier = default_tier
        # By class, and by tier as "tier:NAME"; None: not limited.
        self._quotas = {
            **quotas,
            **{f"tier:{name}": quota for name, quota in tiers.items()},
        }
        self._limiters = {
            name: TokenBucketLimiter(
                name=f"quota-{name.replace(':', '-')}",
                limit=quota.limit,
                window=quota.window,
                redis_url=redis_url,
                prefix=prefix,
            )
            for name, quota in self._quotas.items()
            if quota.limit > 0
        }

    def _bucket(self, quota_class: str, who: Principal) -> tuple[str, str]:
        """The quota that counts ``who``'s calls of the class (the general class: its tier's,
        if it has one), and the key of its bucket there."""
        name = quota_class
        tier = who.tier or self._default_tier
        if quota_class == "general" and f"tier:{tier}" in self._quotas:
            name = f"tier:{tier}"
        return name, who.token_id if quota_class == "agent" else who.subject

    async def charge(self, quota_class: str, who: Principal) -> list[tuple[str, str]]:
        """Counts a call of ``who`` in its class; its rate-limit headers, or none without a
        limit. Raises QuotaExceeded, the headers in its ``headers``, when the caller's bucket
        is empty."""
        name, key = self._bucket(quota_class, who)
        limiter = self._limiters.get(name)
        if limiter is None:
            return []
        verdict = await limiter.hit(key)
        window = self._quotas[name].window
        out = headers(verdict, window)
        if not verdict.allowed:
            raise QuotaExceeded(name, verdict, window, out)
        return out

    async def spend(self, quota_class: str, who: Principal, calls: int) -> None:
        """Counts ``calls`` more calls of ``who``, allowed or not: the cost of a call past its
        own, known once it has run. A bucket taken below empty refuses the next calls until
        it has refilled."""
        name, key = self._bucket(quota_class, who)
        limiter = self._limiters.get(name)
        if limiter is not None:
            await limiter.spend(key, calls)

    async def close(self) -> None:
        for limiter in self._limiters.values():
            await limiter.close()


class QuotaExceeded(RateLimited):
    def __init__(
        self, name: str, verdict: Verdict, window: int, out: list[tuple[str, str]]
    ) -> None:
        quota, _, tier = name.partition(":")
        self.quota = name  # the class, or "tier:NAME"
        super().__init__(
            f"the {tier or quota} quota of {verdict.limit} calls per {window} s is used up",
            details={
                "quota": "general" if tier else quota,
                **({"tier": tier} if tier else {}),
                "limit": verdict.limit,
                "window": window,
                "retry_after": verdict.retry_after,
            },
        )
        self.headers = out
