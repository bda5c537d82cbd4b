"""The store contract's operator side and state, on every store: pause/resume, pin/unpin, policy changes,
reset_rate, state(), keys(), in_flight(), unknown leases, re-sent tickets, unusual keys, idle keys.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from gateway import FlowController, Policy, Store
from gateway.stores import Admitted, Queued
from tests import store_fixtures
from tests.helpers import wait_until
from tests.store_fixtures import KEY, Stores, active, queue

store_uri = store_fixtures.store_uri
stores = store_fixtures.stores
store = store_fixtures.store


async def test_pause_keeps_the_waitlist_and_resume_drains_in_order(stores: Stores) -> None:
    controller = stores.controller()
    store = controller.store
    policy = Policy(parallelism=1, max_wait=30)
    holder = await controller.acquire(KEY, policy)
    await store.pause(KEY)
    tasks = await queue(controller, KEY, policy, 4)
    await controller.release(holder)
    await asyncio.sleep(0.2)
    state = await store.state(KEY)
    assert state is not None and state.paused
    assert (state.active, state.waiting) == (0, 4)
    assert not any(task.done() for task in tasks)
    order: list[int] = []

    async def drain(index: int, task: asyncio.Task[object]) -> None:
        lease = await task
        order.append(index)
        await asyncio.sleep(0.005)
        await controller.release(lease)  # type: ignore[arg-type]

    await store.resume(KEY)
    async with asyncio.timeout(10):
        await asyncio.gather(*(drain(index, task) for index, task in enumerate(tasks)))
    assert order == [0, 1, 2, 3]
    state = await store.state(KEY)
    assert state is None or not state.paused


async def test_pin_overrides_requested_policy_until_unpin(stores: Stores) -> None:
    controller = stores.controller()
    store = controller.store
    requested = Policy(parallelism=5, max_wait=30)
    await store.pin(KEY, parallelism=1)
    first = await controller.acquire(KEY, requested)
    (task,) = await queue(controller, KEY, requested, 1)
    state = await store.state(KEY)
    assert state is not None
    assert (state.policy.parallelism, state.pinned_parallelism, state.pinned_rate) == (1, True, False)
    await store.unpin(KEY)
    async with asyncio.timeout(5):
        second = await task
    state = await store.state(KEY)
    assert state is not None
    assert (state.policy.parallelism, state.pinned_parallelism, state.active) == (5, False, 2)
    await controller.release(first)
    await controller.release(second)  # type: ignore[arg-type]


async def test_pinned_rate(stores: Stores) -> None:
    controller = stores.controller()
    store = controller.store
    await store.pin(KEY, rate=1, period=30)
    await controller.release(await controller.acquire(KEY, Policy(max_wait=30)))
    (task,) = await queue(controller, KEY, Policy(rate=100, max_wait=30), 1)
    state = await store.state(KEY)
    assert state is not None and state.pinned_rate and not state.pinned_parallelism
    assert (state.policy.rate, state.policy.period, state.rate_count) == (1, 30.0, 1)
    await store.unpin(KEY, parallelism=False, rate=True)
    async with asyncio.timeout(5):
        await controller.release(await task)  # type: ignore[arg-type]


async def test_new_policy_applies_to_waiting_tickets_at_once(stores: Stores) -> None:
    first, second = stores.controller(), stores.controller()
    policy = Policy(parallelism=1, max_wait=30)
    holder = await first.acquire(KEY, policy)
    tasks = await queue(first, KEY, policy, 2) + await queue(second, KEY, policy, 1)
    await first.store.set_policy(KEY, policy.replace(parallelism=4))
    async with asyncio.timeout(5):
        await asyncio.gather(*tasks)
    assert await active(first.store) == 4
    # a request carrying a new policy raises it for the waiters too
    more = await queue(second, KEY, policy.replace(parallelism=4), 2)
    async with asyncio.timeout(5):
        lease = await second.acquire(KEY, policy.replace(parallelism=7))
        await asyncio.gather(*more)
    assert await active(first.store) == 7
    assert lease.key == KEY
    await first.release(holder)


async def test_reset_rate_opens_a_fresh_window(stores: Stores) -> None:
    controller = stores.controller()
    policy = Policy(rate=2, period=30, max_wait=30)
    for _ in range(2):
        await controller.release(await controller.acquire(KEY, policy))
    (task,) = await queue(controller, KEY, policy, 1)
    state = await controller.store.state(KEY)
    assert state is not None and state.rate_count == 2
    await controller.store.reset_rate(KEY)
    async with asyncio.timeout(5):
        lease = await task
    state = await controller.store.state(KEY)
    assert state is not None and state.rate_count == 1
    await controller.release(lease)  # type: ignore[arg-type]


async def test_state_fields(stores: Stores) -> None:
    controller = stores.controller()
    store = controller.store
    assert await store.state("nobody") is None
    policy = Policy(parallelism=3, rate=10, period=2.0, max_waiting=50, max_wait=30)
    leases = [await controller.acquire(KEY, policy) for _ in range(2)]
    state = await store.state(KEY)
    assert state is not None
    assert state.key == KEY
    assert (state.policy.parallelism, state.policy.rate, state.policy.period) == (3, 10, 2.0)
    assert state.policy.max_waiting == 50
    assert (state.active, state.waiting, state.rate_count) == (2, 0, 2)
    assert (state.paused, state.pinned_parallelism, state.pinned_rate) == (False, False, False)
    assert time.time() - 2.0 - 1.0 <= state.rate_period_start <= time.time() + 0.5
    for lease in leases:
        await controller.release(lease)


async def test_keys_by_prefix_and_in_flight(stores: Stores) -> None:
    controller = stores.controller()
    store = controller.store
    assert await store.in_flight() == 0
    policy = Policy(parallelism=5)
    leases = [await controller.acquire(key, policy) for key in ("a:1", "a:2", "a:2", "b:1")]
    assert await store.keys("a:") == ["a:1", "a:2"]
    assert await store.keys() == ["a:1", "a:2", "b:1"]
    assert await store.keys("zzz") == []
    assert await store.in_flight() == 4
    await controller.release(leases.pop())
    assert await store.in_flight() == 3
    for lease in leases:
        await controller.release(lease)
    assert await store.in_flight() == 0


@pytest.mark.parametrize("key", ["x{1}", "x{2}", "{x}", "}{", "ключ 🔑"])
async def test_keys_with_braces_and_unicode(store: Store, key: str) -> None:
    policy = Policy(parallelism=1)
    assert await store.enter(key, policy, "cc01", "owner", 5) == Admitted("cc01")
    assert await store.enter(key + "!", policy, "cc02", "owner", 5) == Admitted("cc02")  # a separate key
    state = await store.state(key)
    assert state is not None and state.key == key and state.active == 1
    assert await store.keys() == sorted([key, key + "!"])
    assert await store.release(key, "cc01")
    assert await store.release(key + "!", "cc02")


async def test_release_of_unknown_lease(stores: Stores) -> None:
    controller = stores.controller()
    store = controller.store
    assert await store.release("never-seen", "dd01") is False
    lease = await controller.acquire(KEY, Policy(parallelism=2))
    assert await store.release(KEY, "dd02") is False
    assert await controller.release(lease) is True
    assert await controller.release(lease) is False
    assert await store.renew(KEY, [lease.id], 5) == [False]


async def test_enter_is_idempotent_for_a_resent_ticket(store: Store) -> None:
    policy = Policy(parallelism=1, max_wait=30)
    assert await store.enter(KEY, policy, "ee01", "owner", 30) == Admitted("ee01")
    assert await store.enter(KEY, policy, "ee01", "owner", 30) == Admitted("ee01")
    first = await store.enter(KEY, policy, "ee02", "owner", 30)
    again = await store.enter(KEY, policy, "ee02", "owner", 30)
    assert isinstance(first, Queued) and isinstance(again, Queued)
    assert first.position == again.position == 1
    state = await store.state(KEY)
    assert state is not None and (state.active, state.waiting, state.rate_count) == (1, 1, 0)  # no rate: no log
    assert await store.cancel(KEY, "ee02") is False
    assert await store.release(KEY, "ee01")


async def test_a_resent_ticket_on_a_free_key_takes_nothing_twice(store: Store) -> None:
    policy = Policy(parallelism=5, rate=10, period=60)  # a token free, nobody waiting: the common path
    for _ in range(2):
        assert await store.enter(KEY, policy, "ff01", "owner", 30) == Admitted("ff01")
    state = await store.state(KEY)
    assert state is not None and (state.active, state.rate_count) == (1, 1)  # one lease, one start in the window
    assert await store.release(KEY, "ff01")


async def test_idle_memory_key_disappears() -> None:
    controller = FlowController(Stores("memory://").open())
    store = controller.store
    await controller.release(await controller.acquire(KEY, Policy(parallelism=1, rate=5, period=0.2)))
    await asyncio.sleep(0.3)
    assert await store.state(KEY) is None
    assert await store.keys() == []
    await controller.close()


class CommandLog:
    """The commands clients send to a Redis (MONITOR, leaving out those that scripts run)."""

    def __init__(self, url: str) -> None:
        self.client = aioredis.Redis.from_url(url)
        self.commands: list[str] = []
        self._markers = 0

    async def __aenter__(self) -> CommandLog:
        self._monitor = self.client.monitor()
        await self._monitor.__aenter__()
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        await self._monitor.__aexit__()
        await self.client.aclose()

    async def _read(self) -> None:
        async for command in self._monitor.listen():
            if command["client_type"] != "lua":
                self.commands.append(command["command"])

    async def mark(self) -> int:
        """Everything sent before this call has been logged: returns the log's length."""
        self._markers += 1
        marker = f"ECHO log-marker-{self._markers}"
        await self.client.echo(marker.split()[1])
        await wait_until(lambda: marker in self.commands)
        return self.commands.index(marker) + 1

    def since(self, index: int) -> list[str]:
        return [command for command in self.commands[index:] if not command.startswith("ECHO log-marker-")]


@pytest.mark.redis
async def test_redis_idle_key_costs_no_commands_and_expires(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    controller = FlowController(Stores(redis_url).open())
    policy = Policy(parallelism=2, rate=100, period=0.5, max_wait=2)
    try:
        async with CommandLog(redis_url) as log:
            for _ in range(3):
                await controller.release(await controller.acquire(KEY, policy))
            # enter is one round trip when nothing waits (after the first call loaded the script)
            start = await log.mark()
            lease = await controller.acquire(KEY, policy)
            await log.mark()
            sent = log.since(start)
            assert len(sent) == 1 and sent[0].startswith("EVALSHA"), sent
            await controller.release(lease)
            await asyncio.sleep(0.3)  # background work settles
            start = await log.mark()
            await asyncio.sleep(1.5)
            await log.mark()
            assert log.since(start) == []  # no timers, no polling
        names = [name.decode() async for name in client.scan_iter(match="fc:*")]
        state_keys = [name for name in names if name.startswith("fc:{")]
        assert state_keys, names
        for name in state_keys:
            ttl = await client.pttl(name)
            assert 0 < ttl <= 10 * 60 * 1000, f"{name} would outlive its use: pttl {ttl}"
    finally:
        await controller.close()
        await controller.store.close()
        await client.aclose()
