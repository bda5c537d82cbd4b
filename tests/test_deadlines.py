"""Deadlines: many deadlines on one timer fire once each, never early, at most `resolution` late."""

from __future__ import annotations

import asyncio

from gateway.deadlines import Deadlines


async def _fired_at(
    deadlines_of: dict[str, float], drop: tuple[str, ...] = (), resolution: float = 0.05
) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    fired: dict[str, float] = {}
    deadlines: Deadlines[str] = Deadlines(loop, lambda item: fired.setdefault(item, loop.time()), resolution)
    start = loop.time()
    for item, delay in deadlines_of.items():
        deadlines.set(item, start + delay)
    for item in drop:
        deadlines.drop(item)
    await asyncio.sleep(max(deadlines_of.values()) + resolution + 0.1)
    assert len(deadlines) == 0
    return {item: when - start for item, when in fired.items()}


async def test_each_fires_once_not_early_and_dropped_ones_never() -> None:
    fired = await _fired_at({"a": 0.05, "b": 0.1, "c": 0.1, "d": 0.2}, drop=("c",))
    assert set(fired) == {"a", "b", "d"}
    for item, delay in {"a": 0.05, "b": 0.1, "d": 0.2}.items():
        assert fired[item] >= delay - 0.002  # the loop's clock resolution


async def test_an_earlier_deadline_set_later_rearms_the_timer() -> None:
    loop = asyncio.get_running_loop()
    fired: list[str] = []
    deadlines: Deadlines[str] = Deadlines(loop, fired.append, resolution=0.01)
    deadlines.set("late", loop.time() + 5)
    deadlines.set("soon", loop.time() + 0.05)
    await asyncio.sleep(0.3)
    assert fired == ["soon"]
    deadlines.close()


async def test_setting_again_moves_the_deadline() -> None:
    loop = asyncio.get_running_loop()
    fired: list[str] = []
    deadlines: Deadlines[str] = Deadlines(loop, fired.append, resolution=0.01)
    deadlines.set("x", loop.time() + 0.05)
    deadlines.set("x", loop.time() + 0.3)
    await asyncio.sleep(0.15)
    assert fired == []
    await asyncio.sleep(0.3)
    assert fired == ["x"]


async def test_a_failing_callback_does_not_starve_the_others() -> None:
    loop = asyncio.get_running_loop()
    fired: list[str] = []
    errors: list[object] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context["exception"]))

    def on_expired(item: str) -> None:
        if item == "bad":
            raise RuntimeError("boom")
        fired.append(item)

    deadlines: Deadlines[str] = Deadlines(loop, on_expired, resolution=0.01)
    for item in ("bad", "good"):
        deadlines.set(item, loop.time() + 0.02)
    await asyncio.sleep(0.1)
    assert fired == ["good"] and len(errors) == 1
    loop.set_exception_handler(None)


async def test_a_crowd_of_deadlines_costs_a_bounded_number_of_scans() -> None:
    loop = asyncio.get_running_loop()
    fired: list[int] = []
    deadlines: Deadlines[int] = Deadlines(loop, fired.append, resolution=0.05)
    start = loop.time()
    for index in range(1000):  # 1,000 distinct deadlines spread over 0.2 s
        deadlines.set(index, start + index * 0.0002)
    await asyncio.sleep(0.5)
    assert sorted(fired) == list(range(1000))
    assert deadlines.scans <= 0.2 / 0.05 + 3
