"""Wake-up races on Redis found by S2 (a parallelism of 2 ran 3 and 4 calls at once, right when the engine's
5-second safety re-check fired): a ticket reached by two wake-ups must be admitted once and keep its lease.

1. The safety re-check (`pump`) admits the very ticket it asks about: the reply reports it "admitted" *and*
   lists it among the hand-offs. The store took it over for the status, then found no local record for the
   hand-off and released the lease, which it took for an abandoned admission, while the delivery went ahead.
2. The re-check finds a ticket that another instance admitted (a wake-up still on its way), takes it over; then
   the wake-up arrives through the inbox and, again, the lease was released under the running delivery.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import redis.asyncio as aioredis

from gateway import FlowController, Policy, open_store
from gateway.stores import Admitted
from gateway.stores.redis import RedisStore, key_names
from tests.helpers import wait_until

pytestmark = pytest.mark.redis

ONE = Policy(parallelism=1)


async def lease_live(client: aioredis.Redis, key: str, lease: str) -> bool:
    return await client.zscore(key_names(key)[1], lease) is not None


async def queued(client: aioredis.Redis, key: str) -> bool:
    """Our ticket has reached the store's waitlist (not only the controller's)."""
    return bool(await client.zcard(key_names(key)[3]) == 1)


async def test_recheck_that_admits_the_asked_ticket_keeps_its_lease(redis_url: str) -> None:
    store = open_store(redis_url)
    controller = FlowController(store, safety_interval=0.2)
    client = aioredis.Redis.from_url(redis_url)
    try:
        first = await controller.acquire("race-1", ONE)
        waiter = asyncio.create_task(controller.acquire("race-1", ONE))
        await wait_until(lambda: queued(client, "race-1"))
        # The first lease vanishes without a release (as when it expires): nothing wakes the waiter but the
        # safety re-check, whose pump admits it and reports it admitted in the same reply.
        await client.zrem(key_names("race-1")[1], first.id)
        controller.detach(first)
        second = await asyncio.wait_for(waiter, 5)
        await asyncio.sleep(0.3)  # a wrongful background release would have happened by now
        assert await lease_live(client, "race-1", second.id)
        assert (await store.state("race-1")).active == 1  # type: ignore[union-attr]
    finally:
        await controller.close()
        await store.close()
        await client.aclose()


async def test_late_wakeup_after_a_takeover_is_ignored(redis_url: str) -> None:
    store = open_store(redis_url)
    other = open_store(redis_url)  # another instance
    assert isinstance(store, RedisStore) and isinstance(other, RedisStore)
    controller = FlowController(store, safety_interval=0.2)
    client = aioredis.Redis.from_url(redis_url)
    try:
        await other.enter("race-2", ONE, "a" * 24, "other-owner", 60.0)
        waiter = asyncio.create_task(controller.acquire("race-2", ONE))
        await wait_until(lambda: queued(client, "race-2"))
        # The other instance releases (admitting our ticket) but its wake-up is delayed: we hold it back by
        # stopping `other` from pushing, then push it ourselves after our re-check took the ticket over.
        pushes: list[tuple[str, list[tuple[str, str]]]] = []

        async def hold_back(key: str, remote: list[tuple[str, str]]) -> None:
            pushes.append((key, remote))

        other._push = hold_back  # type: ignore[method-assign]
        assert await other.release("race-2", "a" * 24) is True
        await wait_until(lambda: bool(pushes))
        second = await asyncio.wait_for(waiter, 5)  # found by the safety re-check
        assert await lease_live(client, "race-2", second.id)
        del other._push  # the late wake-up now arrives in our inbox
        await other._push(*pushes[0])
        await asyncio.sleep(0.5)
        assert await lease_live(client, "race-2", second.id)
        assert (await store.state("race-2")).active == 1  # type: ignore[union-attr]
    finally:
        await controller.close()
        for opened in (store, other):
            with contextlib.suppress(Exception):
                await opened.close()
        await client.aclose()


async def test_wakeup_after_the_pickup_ttl_never_runs_without_a_lease(redis_url: str) -> None:
    """3. Another instance admits our ticket with a pickup TTL; its wake-up reaches us after that TTL ran out and
    someone else took the token. The store renewed in the background and woke the delivery at once: it ran
    without a lease, next to the new holder (parallelism + 1). Now the wake-up counts only once the renewal
    confirms the lease; a lapsed admission is left to the safety re-check (which reports the ticket gone)."""
    store = open_store(redis_url)
    other = open_store(redis_url, pickup_ttl=0.3)
    assert isinstance(store, RedisStore) and isinstance(other, RedisStore)
    controller = FlowController(store, safety_interval=60.0)
    client = aioredis.Redis.from_url(redis_url)
    try:
        await other.enter("race-3", ONE, "a" * 24, "other-owner", 60.0)
        waiter = asyncio.create_task(controller.acquire("race-3", ONE))
        await wait_until(lambda: queued(client, "race-3"))
        pushes: list[tuple[str, list[tuple[str, str]]]] = []

        async def hold_back(key: str, remote: list[tuple[str, str]]) -> None:
            pushes.append((key, remote))

        other._push = hold_back  # type: ignore[method-assign]
        assert await other.release("race-3", "a" * 24) is True  # admits our ticket for 0.3 s
        await wait_until(lambda: bool(pushes))
        await asyncio.sleep(0.6)
        assert await other.enter("race-3", ONE, "b" * 24, "third", 60.0) == Admitted("b" * 24)  # the token moved on
        del other._push
        await other._push(*pushes[0])  # the late wake-up
        await asyncio.sleep(0.5)
        if waiter.done():  # it may only go with a live lease
            lease = waiter.result()
            assert await lease_live(client, "race-3", lease.id), "ran without a lease"
        assert (await store.state("race-3")).active == 1  # type: ignore[union-attr]
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
    finally:
        await controller.close()
        for opened in (store, other):
            with contextlib.suppress(Exception):
                await opened.close()
        await client.aclose()
