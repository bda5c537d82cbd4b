"""Engines in separate processes share one Redis; one of them dies by SIGKILL.

Workers (tests/crash_worker.py) report when each of their leases starts and ends; the test counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway import FlowController, Policy, open_store
from tests.helpers import max_concurrency, wait_until

pytestmark = pytest.mark.redis

ROOT = Path(__file__).resolve().parents[1]
KEY = "crash:shared"
PARALLELISM = 4
LEASE_TTL = 2.0


@dataclass
class Worker:
    """One engine process and the events it reported (unix times)."""

    process: asyncio.subprocess.Process
    starts: dict[tuple[int, int], float] = field(default_factory=dict)  # (task, nth lease) -> start
    ends: dict[tuple[int, int], float] = field(default_factory=dict)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    _count: dict[int, int] = field(default_factory=dict)

    async def read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            words = raw.decode().split()
            if words == ["ready"]:
                self.ready.set()
            elif len(words) == 3 and words[0] in ("start", "end"):
                task, at = int(words[1]), float(words[2])
                if words[0] == "start":
                    nth = self._count[task] = self._count.get(task, -1) + 1
                    self.starts[(task, nth)] = at
                else:
                    self.ends[(task, self._count[task])] = at

    def intervals(self, open_until: float) -> list[tuple[float, float]]:
        return [(start, self.ends.get(lease, open_until)) for lease, start in self.starts.items()]

    def holding(self) -> int:
        return len(self.starts) - len(self.ends)


@contextlib.asynccontextmanager
async def worker(url: str, tasks: int, hold: float) -> AsyncIterator[Worker]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.crash_worker", url, KEY, str(tasks), str(LEASE_TTL), str(hold),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    spawned = Worker(process)
    reader = asyncio.create_task(spawned.read())
    try:
        async with asyncio.timeout(30):
            await spawned.ready.wait()
        yield spawned
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        await reader


async def test_survivor_gets_a_killed_engines_tokens_back(redis_url: str) -> None:
    store = open_store(redis_url)
    peak = 0
    sampling = True

    async def sample() -> None:
        nonlocal peak
        while sampling:
            state = await store.state(KEY)
            peak = max(peak, state.active if state else 0)
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    try:
        async with worker(redis_url, PARALLELISM, math.inf) as doomed, worker(redis_url, PARALLELISM, 0.1) as survivor:
            await wait_until(lambda: len(doomed.starts) == PARALLELISM, timeout=10)
            await asyncio.sleep(0.5)
            assert survivor.starts == {}  # every token is the doomed engine's, renewed while it lives
            killed_at = time.time()
            doomed.process.kill()
            await doomed.process.wait()
            await wait_until(lambda: survivor.holding() == PARALLELISM, timeout=LEASE_TTL + 10)
            all_back = time.time()
            await asyncio.sleep(0.3)  # let it churn on the recovered tokens
            intervals = doomed.intervals(open_until=killed_at) + survivor.intervals(open_until=time.time())
    finally:
        sampling = False
        await sampler
        await store.close()
    assert min(survivor.starts.values()) >= killed_at
    assert all_back - killed_at <= LEASE_TTL + 1.0
    assert max_concurrency(intervals) <= PARALLELISM
    assert peak <= PARALLELISM


@pytest.mark.parametrize(
    "release_after", [LEASE_TTL * 0.75, LEASE_TTL + 0.5], ids=["while-it-looks-alive", "once-it-is-known-dead"]
)
async def test_a_killed_engines_waiting_tickets_do_not_hold_the_key(redis_url: str, release_after: float) -> None:
    """The killed engine's waiting tickets reach the head. Admitted while its liveness key still runs (its TTL:
    min(lease TTL, pickup TTL), here 2 s), they are pushed to its inbox and revoked when the key runs out, not a
    pickup TTL after their admission; admitted later, they are revoked at once."""
    store = open_store(redis_url)  # the default pickup TTL: 10 s
    controller = FlowController(store, lease_ttl=30.0)
    policy = Policy(parallelism=PARALLELISM, max_wait=30)
    try:
        held = [await controller.acquire(KEY, policy) for _ in range(PARALLELISM)]
        async with worker(redis_url, PARALLELISM, 0.1) as doomed:
            await wait_until(lambda: _waiting(store, PARALLELISM), timeout=10)
            doomed.process.kill()
            await doomed.process.wait()
            killed_at = time.monotonic()
        next_ones = [asyncio.create_task(controller.acquire(KEY, policy)) for _ in range(PARALLELISM)]
        await wait_until(lambda: _waiting(store, 2 * PARALLELISM), timeout=10)
        await asyncio.sleep(max(0.0, killed_at + release_after - time.monotonic()))
        released_at = time.monotonic()
        for lease in held:
            await controller.release(lease)  # the dead engine's tickets are at the head: admitted to nobody
        async with asyncio.timeout(30):
            leases = await asyncio.gather(*next_ones)
        if release_after:
            assert time.monotonic() - released_at <= 1.0
        else:  # back when its liveness key ran out: by LEASE_TTL after the kill (not 1.5 s + its pickup TTL, 2 s)
            assert time.monotonic() - killed_at <= LEASE_TTL + 0.8
        state = await store.state(KEY)
        assert state is not None and (state.active, state.waiting) == (PARALLELISM, 0)
        for lease in leases:
            await controller.release(lease)
    finally:
        await controller.close()


async def _waiting(store: object, count: int) -> bool:
    state = await store.state(KEY)  # type: ignore[attr-defined]
    return state is not None and state.waiting == count
