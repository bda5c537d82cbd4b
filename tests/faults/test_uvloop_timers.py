"""Found by S1: under uvloop (what `flowgate serve` runs on), `loop.call_at` for an instant less than 0.5 ms
away returns a plain `Handle` without `when()`; the stores compared their per-key timer's `when()` and a request
failed with AttributeError (a 500) whenever a key's rate window or lease expiry was due within a millisecond.
The stores now keep each timer's instant themselves. (The Redis store's crash showed on every S1 run; this is
the memory store's, checked directly.)"""

from __future__ import annotations

import asyncio

import uvloop

from gateway import FlowController, Policy
from gateway.stores.memory import MemoryStore


def test_sub_millisecond_timers_on_uvloop() -> None:
    async def scenario() -> None:
        store = MemoryStore()
        controller = FlowController(store)
        policy = Policy(rate=2, period=0.05)
        leases = await asyncio.gather(*(controller.acquire("uv", policy) for _ in range(40)))
        assert len(leases) == 40  # 40 starts at 2 per 50 ms: the window reopens again and again
        state = store._keys["uv"]
        store._arm("uv", state, 0.0002)  # a handle without when() under uvloop...
        store._arm("uv", state, 0.0001)  # ...compared with the next one
        await asyncio.sleep(0.01)
        for lease in leases:
            await controller.release(lease)
        await controller.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())
