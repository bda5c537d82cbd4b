"""Liveness on Redis and Redis Cluster: admissions made for a dead instance are revoked, a live one keeps its own.

Every instance that queues tickets keeps `fc:alive:{I}` set (TTL: min(lease TTL, pickup TTL)). A wake-up goes
only to a live instance; an admission made for a dead one is taken back at once, and one pushed to an instance
that dies before picking it up is taken back when that instance's liveness key runs out. Taking back touches only
an admission still awaiting pickup: an owner that picked it up (by its wake-up or its safety re-check) keeps it,
even if its liveness key lapsed meanwhile. The real-process version (SIGKILL) is in test_engine_crash.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway import Policy
from gateway.stores import liveness
from gateway.stores.redis import RedisStore, key_names
from tests.helpers import wait_until
from tests.store_fixtures import Stores

pytestmark = pytest.mark.redis

KEY = "liveness:1"
ONE = Policy(parallelism=1, max_wait=30)


@pytest.fixture(params=["redis", pytest.param("cluster", marks=pytest.mark.cluster)])
def url(request: pytest.FixtureRequest) -> str:
    uri: str = request.getfixturevalue("redis_url" if request.param == "redis" else "cluster_url")
    return uri


class Instances(Stores):
    """Redis stores opened as separate instances would be, and controllers over them; all closed at the end."""

    def store(self, **options: Any) -> RedisStore:
        store = self.open(**options)
        assert isinstance(store, RedisStore)
        return store


@pytest.fixture
async def instances(url: str) -> AsyncIterator[Instances]:
    opened = Instances(url)
    try:
        yield opened
    finally:
        await opened.aclose()


def alive_key(store: RedisStore) -> str:
    return liveness.alive_key(store.instance)


async def lease_live(store: RedisStore, lease: str) -> bool:
    return await store._client.zscore(key_names(KEY)[1], lease) is not None


async def waiting(store: RedisStore, count: int) -> bool:
    state = await store.state(KEY)
    return state is not None and state.waiting == count


async def active(store: RedisStore) -> int:
    state = await store.state(KEY)
    return state.active if state is not None else 0


async def die(store: RedisStore) -> None:
    """What a crash leaves: the instance stops refreshing its liveness key, and the key runs out (here: at once)."""
    assert store._liveness._keeper is not None
    store._liveness._keeper.cancel()
    await store._client.delete(alive_key(store))


async def test_an_instance_is_alive_before_its_first_ticket_waits(instances: Instances) -> None:
    store = instances.store()
    controller = instances.controller(store=store, lease_ttl=3.0)
    assert not await store._client.exists(alive_key(store))  # nothing entered yet: nothing to keep alive
    lease = await controller.acquire(KEY, ONE)
    ttl = await store._client.pttl(alive_key(store))
    assert 0 < ttl <= 3000  # min(lease TTL, pickup TTL)
    await asyncio.sleep(1.5)
    assert await store._client.pttl(alive_key(store)) > 1000  # refreshed every third of its TTL
    await controller.release(lease)


async def test_a_tiny_lease_ttl_does_not_make_the_liveness_key_churn(instances: Instances) -> None:
    store = instances.store()
    await store.enter(KEY, ONE, "a" * 24, "owner", 0.01)
    assert 200 < await store._client.pttl(alive_key(store)) <= liveness.MIN_TTL_MS  # not 10 ms, set 300 times a second


async def test_a_closed_instance_is_no_longer_alive(instances: Instances) -> None:
    store, watcher = instances.store(), instances.store()
    await store.enter(KEY, ONE, "a" * 24, "owner", 60.0)
    assert await watcher._client.exists(alive_key(store))
    await store.close()
    assert not await watcher._client.exists(alive_key(store))  # admissions for it are revoked from now on


async def test_an_admission_for_a_dead_instance_goes_to_the_next_waiter_at_once(instances: Instances) -> None:
    survivor = instances.store()  # default pickup TTL: 10 s
    holder = instances.controller(store=survivor)
    ghost = instances.store()
    first = await holder.acquire(KEY, ONE)
    await ghost.enter(KEY, ONE, "9" * 24, "ghost-owner", 60.0)  # the dead instance's ticket, next in line
    await die(ghost)
    next_one = asyncio.create_task(holder.acquire(KEY, ONE))
    await wait_until(lambda: waiting(survivor, 2))
    await holder.release(first)  # admits the ghost's ticket: no live owner, so it is revoked and ours goes
    lease = await asyncio.wait_for(next_one, 1.0)  # not after the 10 s pickup TTL
    assert await lease_live(survivor, lease.id)
    assert not await lease_live(survivor, "9" * 24)
    assert await active(survivor) == 1
    await holder.release(lease)


async def test_an_admission_pushed_before_its_owner_died_is_revoked_when_its_liveness_runs_out(
    instances: Instances,
) -> None:
    """The owner was alive when its wake-up was pushed, and died before picking it up: the pusher checks again
    when the owner's liveness key would have run out, and revokes."""
    survivor = instances.store()
    holder = instances.controller(store=survivor)
    doomed = instances.store()
    doomed_owner = instances.controller(store=doomed, lease_ttl=1.0)  # liveness TTL 1 s
    doomed._pick_up = _dropped  # type: ignore[method-assign]  # it dies before the wake-up reaches it
    first = await holder.acquire(KEY, ONE)
    ghost_waiter = asyncio.create_task(doomed_owner.acquire(KEY, ONE))
    await wait_until(lambda: waiting(survivor, 1))
    next_one = asyncio.create_task(holder.acquire(KEY, ONE))
    await wait_until(lambda: waiting(survivor, 2))
    await holder.release(first)  # admits the doomed instance's ticket (pickup TTL 10 s) and pushes its wake-up
    await wait_until(lambda: survivor._liveness.watching(doomed.instance))
    assert doomed._liveness._keeper is not None
    doomed._liveness._keeper.cancel()  # it dies: its liveness key runs out within 1 s
    lease = await asyncio.wait_for(next_one, 1.0 + 1.0)  # not after the 10 s pickup TTL
    assert await lease_live(survivor, lease.id)
    assert await active(survivor) == 1
    ghost_waiter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await ghost_waiter
    await holder.release(lease)


async def test_a_live_owner_slow_to_pick_up_keeps_its_admission(instances: Instances) -> None:
    """The owner takes longer than its liveness TTL to pick its admission up, but is alive: the pusher's check
    finds it alive and revokes nothing. (With the same settings everywhere the liveness TTL is the admission's
    pickup TTL; here the owner's is shorter, so that the pick-up can outlast it and still be in time.)"""
    admitter = instances.store(pickup_ttl=5.0)  # admissions for other instances: 5 s to be picked up
    holder = instances.controller(store=admitter)
    slow = instances.store(pickup_ttl=1.0)  # liveness TTL 1 s, refreshed every 0.33 s
    owner = instances.controller(store=slow)
    pick_up = slow._pick_up

    async def slow_pick_up(*args: Any) -> None:
        await asyncio.sleep(2.5)  # over two liveness TTLs: the admitter checks on it meanwhile
        await pick_up(*args)

    slow._pick_up = slow_pick_up  # type: ignore[method-assign]
    first = await holder.acquire(KEY, ONE)
    waiter = asyncio.create_task(owner.acquire(KEY, ONE))
    await wait_until(lambda: waiting(admitter, 1))
    await holder.release(first)
    await wait_until(lambda: admitter._liveness.watching(slow.instance))
    lease = await asyncio.wait_for(waiter, 5.0)
    assert await lease_live(slow, lease.id)
    await asyncio.sleep(1.5)  # renewed by its owner; a wrongful revoke would show by now
    assert await lease_live(slow, lease.id)
    assert await active(slow) == 1
    await owner.release(lease)


async def test_revoking_never_takes_back_an_admission_its_owner_picked_up(instances: Instances) -> None:
    """The owner's safety re-check took the admission over, then its liveness key lapsed (a long pause) before
    the wake-up was pushed: the pusher finds it "dead" and revokes, which must leave the picked-up lease alone."""
    admitter = instances.store()
    holder = instances.controller(store=admitter)
    paused = instances.store()
    owner = instances.controller(store=paused, safety_interval=0.2)
    pushes: list[tuple[str, list[tuple[str, str]]]] = []

    async def hold_back(key: str, remote: list[tuple[str, str]]) -> None:
        pushes.append((key, remote))

    admitter._push = hold_back  # type: ignore[method-assign]
    first = await holder.acquire(KEY, ONE)
    waiter = asyncio.create_task(owner.acquire(KEY, ONE))
    await wait_until(lambda: waiting(admitter, 1))
    await holder.release(first)
    lease = await asyncio.wait_for(waiter, 5.0)  # taken over by the owner's safety re-check
    await die(paused)
    del admitter._push
    await admitter._push(*pushes[0])  # the owner looks dead: the admission is revoked, unless picked up
    await asyncio.sleep(0.3)
    assert await lease_live(paused, lease.id)
    assert await active(paused) == 1
    await owner.release(lease)


async def _dropped(*args: Any) -> None:
    """A wake-up that reaches a dead process: nothing picks the admission up."""
