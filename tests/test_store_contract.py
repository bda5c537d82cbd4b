"""The store contract's admission semantics, proved on every store (memory, Redis, Redis Cluster) at the Store
and FlowController level: limits, FIFO, refusals, cancellation, handoff, leases. Operator steering and state
live in test_store_steering.py.

Wall-clock bounds here are generous upper bounds only; speed belongs to benchmarks/engine.py.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from gateway import FlowController, Lease, Policy, Rejected, Store
from gateway.stores import Admitted, Queued
from tests import store_fixtures
from tests.helpers import Recorder, max_concurrency, max_starts_in_window, wait_until
from tests.store_fixtures import KEY, Stores, active, has_waiting, is_idle, queue, waiting

store_uri = store_fixtures.store_uri
stores = store_fixtures.stores
store = store_fixtures.store

SLACK = 0.03  # jitter between the store's admission and our record of it


async def test_parallelism_never_exceeded_and_reached(stores: Stores) -> None:
    controllers = [stores.controller() for _ in range(3)]
    policy = Policy(parallelism=3, max_wait=30)
    recorder = Recorder()
    peak = 0
    done = asyncio.Event()

    async def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, await active(controllers[0].store))
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    async with asyncio.timeout(30):
        await asyncio.gather(*(recorder.deliver(controllers[i % 3], KEY, policy, 0.03) for i in range(30)))
    done.set()
    await watcher
    assert len(recorder.intervals) == 30
    assert max_concurrency(recorder.intervals) == 3  # never above, and reached under backlog
    assert peak <= 3


async def test_rate_is_a_strict_sliding_window_and_is_reached(stores: Stores) -> None:
    controllers = [stores.controller() for _ in range(2)]
    period, rate = 0.4, 3
    policy = Policy(rate=rate, period=period, max_wait=30)
    recorder = Recorder()
    async with asyncio.timeout(30):
        await asyncio.gather(*(recorder.deliver(controllers[0], KEY, policy, 0.01) for _ in range(rate)))
        await asyncio.sleep(period * 0.6)  # a fixed window would let the next burst in across its boundary
        await asyncio.gather(*(recorder.deliver(controllers[i % 2], KEY, policy, 0.01) for i in range(4 * rate)))
    starts = sorted(recorder.starts)
    assert len(starts) == 5 * rate
    assert max_starts_in_window(starts, period - SLACK) <= rate
    # reached: the backlog goes in waves of exactly `rate`, one wave per period
    waves: list[list[float]] = [[starts[0]]]
    for previous, start in itertools.pairwise(starts):
        if start - previous > period / 2:
            waves.append([])
        waves[-1].append(start)
    assert [len(wave) for wave in waves] == [rate] * 5


async def test_fifo_within_one_controller(stores: Stores) -> None:
    controller = stores.controller()
    policy = Policy(parallelism=1, max_wait=30)
    holder = await controller.acquire(KEY, policy)
    tasks = await queue(controller, KEY, policy, 8)
    order: list[int] = []

    async def drain(index: int, task: asyncio.Task[object]) -> None:
        lease = await task
        order.append(index)
        await asyncio.sleep(0.005)
        await controller.release(lease)  # type: ignore[arg-type]

    await controller.release(holder)
    async with asyncio.timeout(20):
        await asyncio.gather(*(drain(index, task) for index, task in enumerate(tasks)))
    assert order == list(range(8))


async def test_fifo_across_controllers_by_arrival(stores: Stores) -> None:
    controllers = [stores.controller() for _ in range(3)]
    policy = Policy(parallelism=1, max_wait=30)
    holder = await controllers[0].acquire(KEY, policy)
    entered: list[tuple[int, FlowController, asyncio.Task[object]]] = []
    for index in range(9):
        controller = controllers[index % 3]
        (task,) = await queue(controller, KEY, policy, 1)
        entered.append((index, controller, task))
    order: list[int] = []

    async def drain(index: int, controller: FlowController, task: asyncio.Task[object]) -> None:
        lease = await task
        order.append(index)
        await asyncio.sleep(0.01)
        await controller.release(lease)  # type: ignore[arg-type]

    await controllers[0].release(holder)
    async with asyncio.timeout(20):
        await asyncio.gather(*(drain(*item) for item in entered))
    assert order == list(range(9))


async def test_waitlist_full_at_max_waiting(stores: Stores) -> None:
    first, second = stores.controller(), stores.controller()
    policy = Policy(parallelism=1, max_waiting=2, max_wait=30)
    holder = await first.acquire(KEY, policy)
    tasks = await queue(first, KEY, policy, 2)
    for controller in (first, second):
        with pytest.raises(Rejected) as caught:
            await controller.acquire(KEY, policy)
        assert (caught.value.code, caught.value.status) == ("waitlist_full", 429)
        assert caught.value.retry_after is not None and caught.value.retry_after > 0
    assert await waiting(first.store) == 2  # nothing else disturbed
    await first.release(holder)
    async with asyncio.timeout(10):
        for task in tasks:
            await first.release(await task)  # type: ignore[arg-type]


async def test_wait_timeout_after_max_wait(stores: Stores) -> None:
    first, second = stores.controller(), stores.controller()
    policy = Policy(parallelism=1, max_wait=0.3)
    holder = await first.acquire(KEY, policy)
    started = time.monotonic()
    with pytest.raises(Rejected) as caught:
        await second.acquire(KEY, policy)
    assert time.monotonic() - started < 0.3 + 3.0
    assert (caught.value.code, caught.value.status) == ("wait_timeout", 429)
    assert caught.value.retry_after is not None and caught.value.retry_after > 0
    assert second.waiting == 0
    await wait_until(lambda: has_waiting(first.store, KEY, 0))
    await first.release(holder)
    await asyncio.sleep(0.2)
    assert await active(first.store) == 0  # the timed-out ticket never took the token


async def test_cancelled_waiter_is_withdrawn_and_never_admitted(stores: Stores) -> None:
    first, second = stores.controller(), stores.controller()
    policy = Policy(parallelism=1, max_wait=30)
    holder = await first.acquire(KEY, policy)
    (gone,) = await queue(second, KEY, policy, 1)
    (next_one,) = await queue(first, KEY, policy, 1)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    await wait_until(lambda: has_waiting(first.store, KEY, 1))
    await first.release(holder)
    async with asyncio.timeout(5):
        lease = await next_one
    await asyncio.sleep(0.1)
    assert await active(first.store) == 1  # only next_one: the cancelled ticket took nothing
    assert second.held == 0
    await first.release(lease)  # type: ignore[arg-type]
    await wait_until(lambda: is_idle(first.store))


async def test_release_hands_off_without_polling(stores: Stores) -> None:
    releaser, waiter = stores.controller(), stores.controller()  # long lease_ttl and safety interval
    policy = Policy(parallelism=1, max_wait=30)
    lease = await releaser.acquire(KEY, policy)
    for _ in range(5):
        (task,) = await queue(waiter, KEY, policy, 1)
        released = time.monotonic()
        assert await releaser.release(lease)
        async with asyncio.timeout(10):
            handed = await task
        assert time.monotonic() - released < 1.5  # a timer-driven re-check would take 60 s here
        lease = handed  # type: ignore[assignment]
        releaser, waiter = waiter, releaser
    await releaser.release(lease)


async def test_waiter_blocked_by_rate_after_release_goes_when_window_reopens(stores: Stores) -> None:
    """Blocked by parallelism and rate at once; the holder releases before the window reopens. Nothing else
    happens, so the waiter must go when the window reopens (one timer), not at the lease-expiry re-check."""
    first, second = stores.controller(), stores.controller()
    policy = Policy(parallelism=1, rate=1, period=0.5, max_wait=5)
    holder = await first.acquire(KEY, policy)
    (task,) = await queue(second, KEY, policy, 1)
    await first.release(holder)
    async with asyncio.timeout(10):
        lease = await task
    await second.release(lease)  # type: ignore[arg-type]


async def test_lease_expires_without_renewal(stores: Stores) -> None:
    store = stores.open()
    policy = Policy(parallelism=1, max_wait=10)
    assert await store.enter(KEY, policy, "c0ffee01", "crashed-owner", 0.3) == Admitted("c0ffee01")
    controller = stores.controller()
    started = time.monotonic()
    async with asyncio.timeout(10):
        lease = await controller.acquire(KEY, policy)
    assert time.monotonic() - started < 0.3 + 2.0
    assert await store.renew(KEY, ["c0ffee01"], 5.0) == [False]
    assert await store.release(KEY, "c0ffee01") is False
    assert await active(store) == 1
    assert await controller.release(lease)


async def test_expired_lease_is_not_counted(store: Store) -> None:
    policy = Policy(parallelism=2)
    assert await store.enter(KEY, policy, "aa01", "crashed-owner", 0.2) == Admitted("aa01")
    assert await store.enter(KEY, policy, "aa02", "crashed-owner", 0.2) == Admitted("aa02")
    assert await store.in_flight() == 2
    await asyncio.sleep(0.4)
    assert await active(store) == 0
    assert await store.in_flight() == 0
    assert await store.enter(KEY, policy, "aa03", "owner", 5) == Admitted("aa03")
    assert await store.release(KEY, "aa03")


async def test_renewals_keep_a_lease_alive(stores: Stores) -> None:
    controller = stores.controller(lease_ttl=0.3)  # its renewer runs every 0.1 s
    store = controller.store
    policy = Policy(parallelism=1)
    lease = await controller.acquire(KEY, policy)
    assert await store.enter("by-hand", policy, "bb01", "direct", 0.3) == Admitted("bb01")
    for _ in range(6):
        await asyncio.sleep(0.1)
        assert await store.renew("by-hand", ["bb01"], 0.3) == [True]
    assert await active(store, "by-hand") == 1
    assert await active(store) == 1  # the controller's lease, 0.6 s after a 0.3 s ttl
    assert isinstance(await store.enter(KEY, policy, "bb02", "direct", 5), Queued)
    assert await store.cancel(KEY, "bb02") is False
    assert await controller.release(lease)
    assert await store.release("by-hand", "bb01")


async def test_renewed_leases_keep_blocking_waiters(stores: Stores) -> None:
    """A waiter's timer set for a lease's first expiry must not admit it once the lease has been renewed."""
    holder, waiter = stores.controller(lease_ttl=0.3), stores.controller()
    policy = Policy(parallelism=1, max_wait=1.0)
    lease = await holder.acquire(KEY, policy)
    with pytest.raises(Rejected) as caught:
        await waiter.acquire(KEY, policy)
    assert caught.value.code == "wait_timeout"
    assert await holder.release(lease)


async def test_abandoned_ticket_does_not_hold_the_key(stores: Stores) -> None:
    """A ticket whose owner is gone (never cancels, never picks up) must not keep the token for long."""
    store = stores.open()
    controller = stores.controller()
    policy = Policy(parallelism=1, max_wait=0.3)
    holder = await controller.acquire(KEY, policy)
    assert isinstance(await store.enter(KEY, policy, "ff01", "vanished-owner", 0.5), Queued)
    await asyncio.sleep(0.4)
    await controller.release(holder)
    started = time.monotonic()
    async with asyncio.timeout(10):
        lease = await controller.acquire(KEY, policy.replace(max_wait=10))
    assert time.monotonic() - started < 0.5 + 2.0
    await controller.release(lease)


async def test_an_admission_at_once_goes_only_when_nothing_waits_and_leaves_no_trace_otherwise(stores: Stores) -> None:
    """`try_acquire` (memory) and `try_acquire_soon` (Redis: one round trip, answered by callback) grant a lease
    only when a start may happen now with nobody waiting; otherwise they queue and refuse nothing."""
    controller = stores.controller()
    store = controller.store
    policy = Policy(parallelism=1, max_wait=30)

    async def at_once() -> Lease | None:
        lease = controller.try_acquire(KEY, policy)
        if lease is not None or store.admits_at_once:
            return lease
        answer: asyncio.Future[Lease | None] = asyncio.get_running_loop().create_future()
        assert controller.try_acquire_soon(KEY, policy, answer.set_result)
        return await answer

    await controller.release(await controller.acquire(KEY, policy))  # Redis: the key and this instance are known
    first = await at_once()
    assert first is not None and await active(store) == 1
    assert await at_once() is None  # the token is taken
    assert await is_idle(store) is False and await waiting(store) == 0  # and nothing was queued
    (queued,) = await queue(controller, KEY, policy, 1)
    await controller.release(first)
    second = await queued  # FIFO: the waiter, not a newcomer at once
    assert isinstance(second, Lease)
    assert await at_once() is None and await waiting(store) == 0
    await controller.release(second)
    third = await at_once()
    assert third is not None
    controller.release_nowait(third)
    await wait_until(lambda: is_idle(store))


async def test_hold_releases_its_lease_when_the_block_raises_or_is_cancelled(stores: Stores) -> None:
    controller = stores.controller()
    policy = Policy(parallelism=1)
    with pytest.raises(RuntimeError):
        async with controller.hold(KEY, policy) as lease:
            assert await active(controller.store) == 1 and lease.key == KEY
            raise RuntimeError("the delivery failed")
    assert await active(controller.store) == 0
    inside = asyncio.Event()

    async def delivery() -> None:
        async with controller.hold(KEY, policy):
            inside.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(delivery())
    await inside.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until(lambda: is_idle(controller.store))
    assert controller.held == 0
