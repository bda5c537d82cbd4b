"""Redis keeps a key's state exactly as long as it can matter, and no longer.

Every key of a flow key's state carries a TTL covering its leases and rate window (a key left behind by a dead
instance goes away by itself), while a start on a busy key sets no TTL at all: the TTLs are set twice as far as
needed and the policy hash records how far (`kept`)."""

from __future__ import annotations

import pytest
import redis

from gateway.policy import Policy
from gateway.stores import open_store
from gateway.stores.redis import RedisStore, key_names

pytestmark = pytest.mark.redis

LEASE_TTL = 30.0


def client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


def command_calls(url: str, command: str) -> int:
    with client(url) as conn:
        entry = conn.info("commandstats").get(f"cmdstat_{command}", {"calls": 0})
    return int(entry["calls"])


def ttls_ms(url: str, key: str) -> dict[str, int]:
    """PTTL of each existing key of `key`'s state (-1: no TTL)."""
    with client(url) as conn:
        names = dict(zip("plswt", key_names(key), strict=True))
        return {part: int(conn.pttl(name)) for part, name in names.items() if conn.exists(name)}


async def test_every_state_key_has_a_ttl_even_when_emptied_and_made_again(redis_url: str) -> None:
    store = open_store(redis_url)
    assert isinstance(store, RedisStore)
    policy = Policy(parallelism=2, rate=100, period=5.0)
    try:
        for round_ in range(3):  # each round empties L and S's leases and starts them again
            for i in range(2):
                await store.enter("k", policy, f"t{round_}{i}", "owner", LEASE_TTL)
            ttls = ttls_ms(redis_url, "k")
            assert set(ttls) >= {"p", "l", "s"}
            assert all(ttl >= LEASE_TTL * 1000 for ttl in ttls.values()), ttls
            for i in range(2):
                await store.release("k", f"t{round_}{i}")
            with client(redis_url) as conn:
                conn.delete(key_names("k")[2])  # the window emptied too (as after a quiet period)
    finally:
        await store.close()


async def test_a_start_on_a_busy_key_sets_no_ttl(redis_url: str) -> None:
    store = open_store(redis_url)
    assert isinstance(store, RedisStore)
    policy = Policy(parallelism=100)
    try:
        await store.enter("k", policy, "first", "owner", LEASE_TTL)  # sets the TTLs and `kept`
        before = command_calls(redis_url, "pexpire")
        for i in range(20):
            await store.enter("k", policy, f"t{i}", "owner", LEASE_TTL)
        assert command_calls(redis_url, "pexpire") == before
        assert all(ttl >= LEASE_TTL * 1000 for ttl in ttls_ms(redis_url, "k").values())
    finally:
        await store.close()


async def test_a_longer_period_renews_the_ttls_to_cover_it(redis_url: str) -> None:
    store = open_store(redis_url)
    assert isinstance(store, RedisStore)
    try:
        await store.enter("k", Policy(parallelism=100, rate=1000, period=1.0), "a", "owner", 1.0)
        await store.enter("k", Policy(parallelism=100, rate=1000, period=3600.0), "b", "owner", 1.0)
        ttls = ttls_ms(redis_url, "k")
        assert ttls["s"] >= 3600 * 1000 and ttls["p"] >= 3600 * 1000, ttls  # the hour-long window is kept
        await store.set_policy("k", Policy(parallelism=100, rate=1000, period=7200.0))  # an operator's change
        await store.enter("k", Policy(parallelism=100, rate=1000, period=7200.0), "c", "owner", 1.0)
        assert ttls_ms(redis_url, "k")["s"] >= 7200 * 1000
    finally:
        await store.close()
