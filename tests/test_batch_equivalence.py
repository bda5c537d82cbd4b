"""A batch gives every operation the result it would have had alone, and leaves the same state.

The batch script reads a flow key's policy and counts its sets once per call and then keeps the counts itself
(lua/lib.lua, K): a count it forgets to adjust would change later operations of the same batch. So random
sequences of enters, releases, cancels, renewals and pumps on one key run twice, in one event-loop tick (one
batch) and one at a time (each its own script call), and must agree on every result, every wake-up and the raw
state left behind. Tickets of another (live) instance wait at the head, so admissions leave pickup marks too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.policy import Policy
from gateway.stores import PumpResult, Queued, Refused, open_store, scripts
from gateway.stores.liveness import alive_key
from gateway.stores.redis import RedisStore, _policy_args, key_names

pytestmark = pytest.mark.redis

TICKETS = 10
GHOST = "ghost-instance"  # another instance: alive, never picks anything up
OPERATIONS = st.lists(
    st.tuples(st.sampled_from(["enter", "enter", "release", "cancel", "renew", "pump"]), st.integers(0, TICKETS - 1)),
    min_size=2,
    max_size=30,
)
POLICIES = st.builds(
    Policy,
    parallelism=st.none() | st.integers(1, 4),
    rate=st.none() | st.integers(1, 6),
    period=st.just(600.0),  # no start leaves the window during the test: the two runs' clocks differ
    max_waiting=st.integers(0, 5),
)


def operation(store: RedisStore, key: str, policy: Policy, name: str, index: int) -> Coroutine[Any, Any, Any]:
    ticket = f"t{index}"
    if name == "enter":
        return store.enter(key, policy, ticket, "owner", 60)
    if name == "release":
        return store.release(key, ticket)
    if name == "cancel":
        return store.cancel(key, ticket)
    if name == "renew":
        return store.renew(key, [ticket, f"t{(index + 1) % TICKETS}"], 60)
    return store.pump(key, [ticket])


def raw_state(client: redis.Redis, key: str, instance: str) -> dict[str, object]:
    p, leases, starts, waiting, marks = key_names(key)
    owners = {instance.encode(): b"us"}  # a waiting ticket's entry starts with its owner, a pickup mark is a word
    return {
        "leases": sorted(client.zrange(leases, 0, -1)),
        "starts": sorted(client.zrange(starts, 0, -1)),
        "waiting": client.zrange(waiting, 0, -1),
        "marks": sorted(
            (field, owners.get(word, word))
            for field, value in client.hgetall(marks).items()
            for word in [value.split(b" ")[0]]
        ),
        "seq": client.hget(p, "seq"),
    }


async def run(url: str, key: str, policy: Policy, ghosts: int, ops: list[tuple[str, int]], batched: bool) -> Any:
    client = redis.Redis.from_url(url)
    client.set(alive_key(GHOST), "1", px=600_000)
    enter = client.register_script(scripts.script("enter"))
    for index in range(ghosts):  # queued behind a full key, as another instance's deliveries would be
        args = [f"g{index}", GHOST, 60_000, 5_000, *_policy_args(Policy(parallelism=1, max_waiting=10))]
        enter(keys=key_names(key), args=args)
    store = open_store(url)
    assert isinstance(store, RedisStore)
    woken: list[str] = []
    store.subscribe("owner", lambda _key, ticket: woken.append(ticket))
    try:
        await store.enter("warm-up", Policy(), "w", "owner", 60)  # liveness and the scripts, before the batch
        await store.release("warm-up", "w")
        before = store._batcher.round_trips
        calls = [operation(store, key, policy, name, index) for name, index in ops]
        if batched:
            results = await asyncio.gather(*calls)
            assert store._batcher.round_trips - before == 1
        else:
            results = [await call for call in calls]
        await asyncio.sleep(0.05)  # wake-ups of other instances go out after the reply
        return [comparable(result) for result in results], woken, raw_state(client, key, store.instance)
    finally:
        await store.close()
        client.close()


def comparable(result: object) -> object:
    """A result with its times reduced to whether there is one: the two runs read the clock at different
    moments, so "a lease expires in 59.98 s" and "in 59.97 s" are the same answer."""
    if isinstance(result, Queued):
        return ("queued", result.position, result.recheck_after is None)
    if isinstance(result, Refused):
        return ("refused", result.reason)
    if isinstance(result, PumpResult):
        return ("pump", result.statuses, result.recheck_after is None)
    return result


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(policy=POLICIES, ghosts=st.integers(0, 2), ops=OPERATIONS)
def test_a_batch_matches_the_same_operations_one_at_a_time(
    redis_url: str, policy: Policy, ghosts: int, ops: list[tuple[str, int]]
) -> None:
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    client.close()
    together = asyncio.run(run(redis_url, "together", policy, ghosts, ops, batched=True))
    alone = asyncio.run(run(redis_url, "alone", policy, ghosts, ops, batched=False))
    assert together == alone
