"""An engine in its own process, for crash tests: `python -m tests.crash_worker URL KEY TASKS LEASE_TTL`.

Runs TASKS deliveries of KEY (parallelism 4) in a loop on a FlowController over the Redis store at URL, each
holding its lease for HOLD seconds (forever when HOLD is `inf`), and reports on stdout, one line per event:
`ready`, `start TASK UNIX_TIME` (lease granted), `end TASK UNIX_TIME` (about to release).
"""

from __future__ import annotations

import asyncio
import sys
import time

from gateway import FlowController, Policy, open_store

PARALLELISM = 4


def emit(*words: object) -> None:
    print(*words, flush=True)


async def deliver_forever(controller: FlowController, key: str, policy: Policy, task: int, hold: float) -> None:
    while True:
        lease = await controller.acquire(key, policy)
        emit("start", task, f"{time.time():.6f}")
        await asyncio.sleep(hold)
        emit("end", task, f"{time.time():.6f}")
        await controller.release(lease)


async def main(url: str, key: str, tasks: int, lease_ttl: float, hold: float) -> None:
    controller = FlowController(open_store(url), lease_ttl=lease_ttl)
    policy = Policy(parallelism=PARALLELISM, max_wait=60)
    await controller.store.ping()
    emit("ready")
    await asyncio.gather(*(deliver_forever(controller, key, policy, task, hold) for task in range(tasks)))


if __name__ == "__main__":
    url, key, tasks, lease_ttl, hold = sys.argv[1:6]
    asyncio.run(main(url, key, int(tasks), float(lease_ttl), float(hold)))
