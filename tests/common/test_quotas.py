"""Request quotas: AGENTMESH_QUOTAS, the classes of the policy table, and the token buckets'
verdicts (with the moment a bucket is full again) in both stores, memory and Redis."""

from __future__ import annotations

import math
import time
import uuid

import pytest
import redis

from servers.common import ratelimit
from servers.common.config import Settings
from servers.common.context import Principal
from servers.common.policy import POLICY
from servers.common.quotas import (
    CLASSES,
    DEFAULTS,
    TIER_DEFAULTS,
    Quota,
    QuotaExceeded,
    Quotas,
    parse,
)
from tests.conftest import RedisServer


def test_defaults_are_the_seeds_and_the_environment_overrides_them() -> None:
    assert parse("") == DEFAULTS
    assert DEFAULTS["general"] == Quota(1000, 60)  # seed 002: 1000 a minute per key
    assert DEFAULTS["monitoring"] == Quota(500, 3600)  # seed 001's endpoint classes
    assert DEFAULTS["management"] == Quota(100, 3600)
    quotas = parse(" general=20/1, agent=0 ,monitoring=7")
    assert quotas["general"] == Quota(20, 1)
    assert quotas["agent"].limit == 0
    assert quotas["monitoring"] == Quota(7, 3600)  # a class's window stays when not given
    assert quotas["management"] == DEFAULTS["management"]


@pytest.mark.parametrize(
    "raw", ["general", "nosuch=1/60", "general=x/60", "general=-1/60", "general=5/0", "agent=1/1e9"]
)
def test_a_bad_setting_stops_the_mesh_with_its_reason(raw: str) -> None:
    with pytest.raises(SystemExit, match="AGENTMESH_QUOTAS"):
        Settings.from_env({"AGENTMESH_QUOTAS": raw})


def test_every_rpc_a_principal_may_call_counts_in_a_known_class() -> None:
    for method, rule in POLICY.items():
        if rule.public or rule.internal:
            assert rule.quota == "", method
        elif rule.agent:
            assert rule.quota == "agent", method
        else:
            assert rule.quota in CLASSES, method
    assert POLICY["/agentmesh.v1.UsersService/DeleteUser"].quota == "management"
    assert POLICY["/agentmesh.v1.MetricsService/GetPrometheusMetrics"].quota == "monitoring"


def _user(subject: str = "") -> Principal:
    return Principal(subject=subject or str(uuid.uuid4()), kind="user", token_id="t")


async def _exhaust(quotas: Quotas, who: Principal, limit: int) -> list[dict[str, str]]:
    return [dict(await quotas.charge("general", who)) for _ in range(limit)]


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_a_bucket_lets_a_burst_through_then_refills_at_its_rate(
    store: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    server: RedisServer | None = (
        request.getfixturevalue("redis_server") if store == "redis" else None
    )
    url = server[0] if server else None
    clock = [time.time()]
    monkeypatch.setattr(ratelimit.time, "time", lambda: clock[0])
    quotas = Quotas({"general": Quota(3, 60), "agent": Quota(0, 60)}, redis_url=url)
    try:
        who, other = _user(), _user()
        start = clock[0]
        answers = await _exhaust(quotas, who, 3)
        assert [a["x-ratelimit-remaining"] for a in answers] == ["2", "1", "0"]
        assert {a["x-ratelimit-limit"] for a in answers} == {"3"}
        assert {a["x-ratelimit-window"] for a in answers} == {"60"}
        # Each call takes one of 3 tokens; a token comes back every 20 s, so the bucket is full
        # again 20 s after the first call, 40 after the second, 60 after the third.
        resets = [int(a["x-ratelimit-reset"]) for a in answers]
        assert resets == [math.ceil(start + 20 * n) for n in (1, 2, 3)]
        with pytest.raises(QuotaExceeded) as refused:
            await quotas.charge("general", who)
        assert refused.value.details["retry_after"] == "20"
        assert dict(refused.value.headers)["x-ratelimit-remaining"] == "0"
        # Another caller has a bucket of its own.
        assert (await quotas.charge("general", other))[1] == ("x-ratelimit-remaining", "2")
        # 20 s on, one token is back: one call goes through, the next does not.
        clock[0] += 20
        assert dict(await quotas.charge("general", who))["x-ratelimit-remaining"] == "0"
        with pytest.raises(QuotaExceeded):
            await quotas.charge("general", who)
        # A minute after that, the bucket is full.
        clock[0] += 60
        assert dict(await quotas.charge("general", who))["x-ratelimit-remaining"] == "2"
        # A class without a limit counts nothing and says nothing.
        assert await quotas.charge("agent", who) == []
        if url:  # counted in Redis itself, not in the fallback
            client = redis.Redis.from_url(url)
            assert client.exists(f"agentmesh:rl:quota-general:{who.subject}")
            client.close()
    finally:
        await quotas.close()


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_a_cost_past_the_call_is_a_debt_that_refuses_until_paid(
    store: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    server: RedisServer | None = (
        request.getfixturevalue("redis_server") if store == "redis" else None
    )
    clock = [time.time()]
    monkeypatch.setattr(ratelimit.time, "time", lambda: clock[0])
    quotas = Quotas({"general": Quota(3, 60)}, redis_url=server[0] if server else None)
    try:
        who, other = _user(), _user()
        assert dict(await quotas.charge("general", who))["x-ratelimit-remaining"] == "2"
        # The call turned out to cost 5 more: 6 of 3 tokens, 3 beyond empty. The next call
        # waits for those 3 and its own, at one token per 20 s: 80 s.
        await quotas.spend("general", who, 5)
        with pytest.raises(QuotaExceeded) as refused:
            await quotas.charge("general", who)
        assert refused.value.details["retry_after"] == "80"
        clock[0] += 79
        with pytest.raises(QuotaExceeded):
            await quotas.charge("general", who)
        clock[0] += 1
        assert dict(await quotas.charge("general", who))["x-ratelimit-remaining"] == "0"
        # Nobody else pays for it; nothing spent is nothing.
        await quotas.spend("general", other, 0)
        assert dict(await quotas.charge("general", other))["x-ratelimit-remaining"] == "2"
    finally:
        await quotas.close()


def test_tiers_are_seed_000s_and_the_environment_overrides_them() -> None:
    settings = Settings.from_env({})
    assert settings.tiers == TIER_DEFAULTS and settings.default_tier == ""
    assert TIER_DEFAULTS == {
        "free": Quota(100, 3600),
        "pro": Quota(1000, 3600),
        "enterprise": Quota(0, 3600),
    }
    settings = Settings.from_env({"AGENTMESH_TIERS": "pro=5000", "AGENTMESH_DEFAULT_TIER": "free"})
    assert settings.tiers["pro"] == Quota(5000, 3600) and settings.default_tier == "free"
    for bad in ({"AGENTMESH_TIERS": "gold=1/60"}, {"AGENTMESH_DEFAULT_TIER": "gold"}):
        with pytest.raises(SystemExit, match="TIER"):
            Settings.from_env(bad)


async def test_a_tier_replaces_the_general_quota_only() -> None:
    quotas = Quotas(
        {**DEFAULTS, "general": Quota(5, 60), "monitoring": Quota(4, 60)},
        tiers={"free": Quota(1, 3600), "pro": Quota(2, 3600), "enterprise": Quota(0, 3600)},
        default_tier="pro",
    )
    free = Principal(subject=str(uuid.uuid4()), kind="user", tier="free")
    assert dict(await quotas.charge("general", free))["x-ratelimit-window"] == "3600"
    with pytest.raises(QuotaExceeded) as refused:
        await quotas.charge("general", free)
    assert refused.value.details["quota"] == "general" and refused.value.details["tier"] == "free"
    # Other classes keep their own quota.
    assert dict(await quotas.charge("monitoring", free))["x-ratelimit-limit"] == "4"
    # An account without a tier has the default one; enterprise has no limit.
    assert dict(await quotas.charge("general", _user()))["x-ratelimit-limit"] == "2"
    rich = Principal(subject=str(uuid.uuid4()), kind="user", tier="enterprise")
    assert [await quotas.charge("general", rich) for _ in range(10)] == [[]] * 10


async def test_agents_count_per_key_and_users_per_account() -> None:
    quotas = Quotas({"general": Quota(1, 60), "agent": Quota(1, 60)})
    owner = str(uuid.uuid4())
    token = Principal(subject=owner, kind="user", token_id="jwt-1")
    key = Principal(subject=owner, kind="api_key", token_id="key-1")
    await quotas.charge("general", token)
    with pytest.raises(QuotaExceeded):
        await quotas.charge("general", key)  # the owner's key shares its quota
    await quotas.charge("agent", key)
    await quotas.charge("agent", Principal(subject=owner, kind="api_key", token_id="key-2"))
    with pytest.raises(QuotaExceeded):
        await quotas.charge("agent", key)


async def test_meshes_sharing_a_redis_count_apart(redis_server: RedisServer) -> None:
    """AGENTMESH_BUS_PREFIX names a mesh's Redis keys, its quotas' and limits' too: a staging
    mesh on production's Redis must not spend production's quotas."""
    url = redis_server[0]
    first = Quotas({"general": Quota(1, 60)}, redis_url=url, prefix="prod:")
    second = Quotas({"general": Quota(1, 60)}, redis_url=url, prefix="staging:")
    who = _user()
    try:
        await first.charge("general", who)
        with pytest.raises(QuotaExceeded):
            await first.charge("general", who)
        await second.charge("general", who)  # its own bucket
        client = redis.Redis.from_url(url)
        assert client.exists(f"prod:rl:quota-general:{who.subject}")
        assert client.exists(f"staging:rl:quota-general:{who.subject}")
        client.close()
    finally:
        await first.close()
        await second.close()
