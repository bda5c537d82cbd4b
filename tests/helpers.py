"""Helpers shared by the engine tests: measuring concurrency and rate from recorded start/end times."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from gateway import FlowController, Policy


def max_concurrency(intervals: Iterable[tuple[float, float]]) -> int:
    """Most intervals open at one instant: a sweep over (start +1, end -1); an end and a start at the same
    instant do not overlap."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    live = peak = 0
    for _, step in events:
        live += step
        peak = max(peak, live)
    return peak


def max_starts_in_window(starts: Iterable[float], window: float) -> int:
    """Most starts inside any half-open window [t, t + window)."""
    ordered = sorted(starts)
    best = first = 0
    for last, start in enumerate(ordered):
        while start - ordered[first] >= window:
            first += 1
        best = max(best, last - first + 1)
    return best


async def wait_until(
    predicate: Callable[[], bool] | Callable[[], Awaitable[bool]], timeout: float = 5.0, interval: float = 0.005
) -> None:
    """Poll `predicate` (sync or async) until true; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


@dataclass
class Recorder:
    """Runs deliveries through controllers and records when each one held its lease (monotonic seconds).

    Start is taken after the lease is granted and end before it is released, so recorded intervals lie inside
    the leases' lives: a sweep over them never over-counts.
    """

    intervals: list[tuple[float, float]] = field(default_factory=list)
    order: list[object] = field(default_factory=list)

    @property
    def starts(self) -> list[float]:
        return [start for start, _ in self.intervals]

    async def deliver(
        self, controller: FlowController, key: str, policy: Policy, hold: float = 0.02, name: object = None
    ) -> None:
        async with controller.hold(key, policy):
            start = time.monotonic()
            self.order.append(name)
            await asyncio.sleep(hold)
            end = time.monotonic()
        self.intervals.append((start, end))
