"""S3 clients that give up (issue 5): 1,000 requests wait for a key's only token, then their clients disconnect.

Each ticket is removed within 1 s of its client's disconnect, none is ever forwarded, no token (parallelism or
rate slot) is consumed. Real servers on loopback: `flowgate serve` on Redis (the waitlist is read from Redis),
and the proxy under uvicorn in this process on the memory store (read from the store). The clients disconnect
in 10 batches of 100, 100 ms apart, so "within 1 s" is measured per batch, not once for all.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from gateway.engine import Lease
from gateway.rules import Rule
from tests import proxy_fixtures
from tests.faults.harness import Flowgate, key_tag, raw_request, running
from tests.proxy_harness import running_gateway

upstream = proxy_fixtures.upstream
Upstream = proxy_fixtures.Upstream

pytestmark = pytest.mark.slow

WAITERS = 1000
BATCH = 100
BATCH_EVERY = 0.1
REMOVAL_BOUND = 1.0  # the figure


async def open_waiters(port: int, key_path: str, count: int) -> list[asyncio.StreamWriter]:
    writers = []
    for index in range(count):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {key_path}?seq={index} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
        writers.append(writer)
    for writer in writers:
        await writer.drain()
    return writers


async def disconnect_in_batches(
    writers: list[asyncio.StreamWriter], waiting: Callable[[], Awaitable[int]]
) -> list[float]:
    """Close the clients batch by batch; return how long each batch's tickets took to leave the waitlist."""
    closed_at: list[float] = []
    removal: list[float] = []
    samples: list[tuple[float, int]] = []
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            samples.append((time.monotonic(), await waiting()))
            await asyncio.sleep(0.01)

    sampler = asyncio.create_task(sample())
    for start in range(0, len(writers), BATCH):
        for writer in writers[start : start + BATCH]:
            writer.close()
        closed_at.append(time.monotonic())
        await asyncio.sleep(BATCH_EVERY)
    deadline = time.monotonic() + REMOVAL_BOUND + 5  # wait past the bound, to measure rather than time out
    while time.monotonic() < deadline and (not samples or samples[-1][1] > 0):  # noqa: ASYNC110 - a sampler runs
        await asyncio.sleep(0.05)
    done.set()
    await sampler
    for batch, moment in enumerate(closed_at):
        left = len(writers) - BATCH * (batch + 1)
        gone = next((at for at, size in samples if at >= moment and size <= left), None)
        assert gone is not None, f"batch {batch}: its tickets never left the waitlist"
        removal.append(gone - moment)
    return removal


@pytest.mark.redis
async def test_s3_on_redis(tmp_path: Path, upstream: Upstream, redis_url: str) -> None:
    key = f"s3-{uuid.uuid4().hex[:6]}"
    config = f"""
lease_ttl = "30s"
[defaults]
max_wait = "60s"
[[rules]]
path = "/s3/"
key = "{key}"
parallelism = 1
rate = 1000
period = "1m"
"""
    gateway = Flowgate(tmp_path, upstream.url, store=redis_url, config=config)
    client = aioredis.Redis.from_url(redis_url)
    tag = f"fc:{{{key_tag(key)}}}"
    try:
        with running(gateway):
            holder = await raw_request(gateway.port, b"GET /s3/hold?hold=1 HTTP/1.1\r\nHost: gw\r\n\r\n")
            assert holder.status == 200  # its token stays held (Flow-Control-Hold) until released below
            writers = await open_waiters(gateway.port, "/s3/w", WAITERS)
            await _until(lambda: _zcard(client, tag + ":w"), WAITERS, timeout=30)
            removal = await disconnect_in_batches(writers, lambda: _zcard(client, tag + ":w"))
            assert await client.hlen(tag + ":t") == 0
            lease = upstream.app.calls(key)[0].lease
            status, body = gateway.admin(f"/v2/leases/{lease}/release", method="POST")
            assert status == 200, body
            await asyncio.sleep(1.0)  # a ticket wrongly kept would be admitted and forwarded by now
            assert [call.path for call in upstream.app.calls(key)] == ["/s3/hold"]  # none forwarded
            assert await client.zcard(tag + ":l") == 0  # no token held
            assert await client.zcard(tag + ":s") == 1  # one rate slot used: the holder's
            fresh = await raw_request(gateway.port, b"GET /s3/fresh HTTP/1.1\r\nHost: gw\r\n\r\n")
            assert fresh.status == 200 and int(fresh.headers["flow-control-waited"]) < 1000
        assert "Traceback" not in gateway.log
    finally:
        await client.aclose()
    assert max(removal) < REMOVAL_BOUND, removal
    print(f"\nS3 redis: {WAITERS} tickets, removal per batch of {BATCH} after {[round(r, 3) for r in removal]} s")


async def test_s3_on_memory(upstream: Upstream) -> None:
    key = f"s3-{uuid.uuid4().hex[:6]}"
    rule = Rule(key=key, path="/s3/", parallelism=1, rate=1000, period="1m", max_wait="60s")
    async with running_gateway(upstream.url, "memory://", rules=[rule]) as gateway:

        async def waiting() -> int:
            state = await gateway.store.state(key)
            return state.waiting if state else 0

        holder = await raw_request(gateway.port, b"GET /s3/hold?hold=1 HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert holder.status == 200
        writers = await open_waiters(gateway.port, "/s3/w", WAITERS)
        await _until(waiting, WAITERS, timeout=30)
        removal = await disconnect_in_batches(writers, waiting)
        assert gateway.controller.waiting == 0
        assert await gateway.controller.release(Lease.from_token(upstream.app.calls(key)[0].lease))
        await asyncio.sleep(1.0)
        assert [call.path for call in upstream.app.calls(key)] == ["/s3/hold"]
        state = await gateway.store.state(key)
        assert state is not None and state.active == 0 and state.rate_count == 1
    assert max(removal) < REMOVAL_BOUND, removal
    print(f"\nS3 memory: {WAITERS} tickets, removal per batch of {BATCH} after {[round(r, 3) for r in removal]} s")


async def _zcard(client: aioredis.Redis, name: str) -> int:
    return int(await client.zcard(name))


async def _until(read: Callable[[], Awaitable[int]], value: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (current := await read()) != value:
        assert time.monotonic() < deadline, f"{current} != {value} after {timeout}s"
        await asyncio.sleep(0.05)
