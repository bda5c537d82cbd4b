"""Engine benchmark: admit+release cycles/s, Redis commands per cycle, handoff latency; appended to RESULTS.md.

    python benchmarks/engine.py [--seconds 2] [--handoffs 400] [--no-write]

- cycles/s: N tasks in one process each loop `acquire` + `release` on one key (parallelism N, so the limit is
  tracked at full use but never makes a task wait), for memory:// and redis:// at N = 1, 64, 1,024.
- Redis commands per cycle, from `INFO commandstats` before and after each run: the script calls clients sent
  (EVALSHA/EVAL: round trips), every command counted (including those the scripts run), and the server's
  CPU per cycle.
- handoff latency: two engines ping-pong one token (parallelism 1, each holds it 2 ms), so every admission is a
  handoff from the other's release; latency = admission seen by the waiter - release called by the holder.
  Redis: the other engine is another process; memory: another controller in this process (memory:// is
  per process).

It starts its own redis-server on a free loopback port (never the shared 6379) and stops it by pid.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gateway import FlowController, Policy, open_store  # noqa: E402
from tests.redis_servers import redis_server  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "RESULTS.md")
CONCURRENCY = (1, 64, 1024)
HOLD = 0.002


@dataclass
class CycleRow:
    store: str
    tasks: int
    cycles_per_s: float
    script_calls: float | None = None  # per cycle
    commands: float | None = None  # per cycle, including those run inside scripts
    server_us: float | None = None  # per cycle


@dataclass
class HandoffRow:
    store: str
    waiter: str
    samples: int
    p50_ms: float
    p99_ms: float
    max_ms: float


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def commandstats(port: int) -> dict[str, tuple[int, int]]:
    """calls and usec per command, from redis-cli (outside the measured process)."""
    out = subprocess.run(
        ["redis-cli", "-p", str(port), "info", "commandstats"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    stats: dict[str, tuple[int, int]] = {}
    for line in out.splitlines():
        if line.startswith("cmdstat_"):
            name, _, fields = line.partition(":")
            values = dict(item.split("=") for item in fields.split(","))
            stats[name.removeprefix("cmdstat_")] = (int(values["calls"]), int(values["usec"]))
    return stats


async def cycles(uri: str, tasks: int, seconds: float) -> int:
    controller = FlowController(open_store(uri))
    key, policy = f"bench:cycles:{tasks}", Policy(parallelism=tasks, max_wait=60)
    await controller.release(await controller.acquire(key, policy))  # warm up: connections, scripts
    done = 0
    deadline = time.monotonic() + seconds

    async def loop() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            await controller.release(await controller.acquire(key, policy))
            done += 1

    await asyncio.gather(*(loop() for _ in range(tasks)))
    await controller.close()
    await controller.store.close()
    return done


def run_cycles(store: str, uri: str, seconds: float, port: int | None) -> list[CycleRow]:
    rows = []
    for tasks in CONCURRENCY:
        before = commandstats(port) if port else {}
        started = time.monotonic()
        loop = new_loop()
        try:
            done = loop.run_until_complete(cycles(uri, tasks, seconds))
        finally:
            loop.close()
        row = CycleRow(store, tasks, done / (time.monotonic() - started))
        if port:
            after = commandstats(port)
            spent = {name: (calls - before.get(name, (0, 0))[0], usec - before.get(name, (0, 0))[1])
                     for name, (calls, usec) in after.items() if name != "info"}  # fmt: skip
            row.script_calls = sum(spent.get(name, (0, 0))[0] for name in ("evalsha", "eval")) / done
            row.commands = sum(calls for calls, _ in spent.values()) / done
            row.server_us = sum(usec for _, usec in spent.values()) / done
        print(f"  {store} {tasks:>5} tasks: {row.cycles_per_s:,.0f} cycles/s", flush=True)
        rows.append(row)
    return rows


async def ping_pong(uri: str, key: str, rounds: int, controller: FlowController | None = None) -> list[list[float]]:
    """Acquire, hold HOLD, release, `rounds` times; returns [acquired_at, released_at] per round (unix s)."""
    own = controller is None
    controller = controller or FlowController(open_store(uri))
    policy = Policy(parallelism=1, max_wait=60)
    events = []
    for _ in range(rounds):
        lease = await controller.acquire(key, policy)
        acquired = time.time()
        await asyncio.sleep(HOLD)
        released = time.time()
        await controller.release(lease)
        events.append([acquired, released])
    if own:
        await controller.close()
        await controller.store.close()
    return events


def handoff_latencies(mine: list[list[float]], theirs: list[list[float]]) -> list[float]:
    """For each admission, the time since the other side's release that preceded it (when that was the last
    release before it, i.e. a handoff)."""
    releases = sorted([(released, "me") for _, released in mine] + [(released, "them") for _, released in theirs])
    latencies = []
    for side, events in (("me", mine), ("them", theirs)):
        for acquired, _ in events:
            before = [item for item in releases if item[0] <= acquired]
            if before and before[-1][1] != side:
                latencies.append(acquired - before[-1][0])
    return latencies


def summarize(store: str, waiter: str, latencies: list[float]) -> HandoffRow:
    ordered = sorted(latencies)
    if not ordered:
        return HandoffRow(store, waiter, 0, float("nan"), float("nan"), float("nan"))

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return HandoffRow(store, waiter, len(ordered), pick(0.5), pick(0.99), ordered[-1] * 1000)


def handoff_memory(rounds: int) -> HandoffRow:
    async def both() -> tuple[list[list[float]], list[list[float]]]:
        store = open_store("memory://")
        first, second = FlowController(store), FlowController(store)
        one, two = await asyncio.gather(
            ping_pong("", "bench:handoff", rounds, first), ping_pong("", "bench:handoff", rounds, second)
        )
        await first.close()
        await second.close()
        return one, two

    loop = new_loop()
    try:
        mine, theirs = loop.run_until_complete(both())
    finally:
        loop.close()
    return summarize("memory://", "same process", handoff_latencies(mine, theirs))


def handoff_redis(uri: str, rounds: int) -> HandoffRow:
    child = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--ping-pong", uri, str(rounds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        loop = new_loop()
        try:
            mine = loop.run_until_complete(ping_pong(uri, "bench:handoff", rounds))
        finally:
            loop.close()
        theirs = json.loads(child.stdout.readline())
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return summarize("redis://", "other process", handoff_latencies(mine, theirs))


def child_ping_pong(uri: str, rounds: int) -> None:
    print("ready", flush=True)
    loop = new_loop()
    try:
        events = loop.run_until_complete(ping_pong(uri, "bench:handoff", rounds))
    finally:
        loop.close()
    print(json.dumps(events), flush=True)


def report(cycle_rows: list[CycleRow], handoff_rows: list[HandoffRow], took: float, note: str) -> str:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "",
        f"## Engine benchmark, {stamp}",
        "",
        f"`python benchmarks/engine.py`: one process, {os.cpu_count()} cores, Python {platform.python_version()},"
        f" uvloop; own redis-server on loopback. Run took {took:.0f}s. {note}".rstrip(),
        "",
        "Admit+release cycles (one key, parallelism = tasks; targets: memory >= 200,000/s, Redis >= 20,000/s):",
        "",
        "| store | tasks | cycles/s | script calls/cycle | Redis commands/cycle (incl. in scripts) | server us/cycle |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in cycle_rows:
        extra = ["-", "-", "-"]
        if row.script_calls is not None:
            extra = [f"{row.script_calls:.3f}", f"{row.commands:.1f}", f"{row.server_us:.1f}"]
        lines.append(f"| {row.store} | {row.tasks:,} | {row.cycles_per_s:,.0f} | " + " | ".join(extra) + " |")
    lines += [
        "",
        f"Handoff latency, release -> waiter woken (parallelism 1, two engines ping-pong, hold {HOLD * 1000:g} ms;"
        " target p99 <= 5 ms):",
        "",
        "| store | waiter | samples | p50 | p99 | max |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for handoff in handoff_rows:
        lines.append(
            f"| {handoff.store} | {handoff.waiter} | {handoff.samples} | {handoff.p50_ms:.2f} ms"
            f" | {handoff.p99_ms:.2f} ms | {handoff.max_ms:.2f} ms |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--ping-pong":
        child_ping_pong(sys.argv[2], int(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each cycles run")
    parser.add_argument("--handoffs", type=int, default=400, help="rounds per engine in the handoff runs")
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    started = time.monotonic()
    cycle_rows = run_cycles("memory://", "memory://", args.seconds, None)
    handoff_rows = [handoff_memory(args.handoffs)]
    note = ""
    try:
        with redis_server() as server:
            cycle_rows += run_cycles("redis://", server.url, args.seconds, server.port)
            handoff_rows.append(handoff_redis(server.url, args.handoffs))
    except ImportError as exc:  # the Redis store is not there yet
        note = f"Redis rows missing: {exc}."
    text = report(cycle_rows, handoff_rows, time.monotonic() - started, note)
    print(text)
    if not args.no_write:
        with open(RESULTS, "a") as handle:
            handle.write(text)
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
