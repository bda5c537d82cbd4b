"""F2 zombie upstream (issue 5): an upstream call that outlives the lease TTL never lets parallelism + 1 run.

`flowgate serve` with `lease_ttl = 1.5s`, a key of parallelism 1 and upstream calls of 5 s (over three TTLs):
the engine renews the lease every lease_ttl / 3 while the call runs, so the token stays held and the next
request waits. On Redis the lease's expiry is read while the call runs: it keeps moving forward, in steps
about lease_ttl / 3 apart (a loose upper bound: this box is shared and noisy).
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests import proxy_fixtures
from tests.faults.harness import Flowgate, live_leases, raw_request, running
from tests.upstream_app import max_concurrency

upstream = proxy_fixtures.upstream
Upstream = proxy_fixtures.Upstream
store_uri = proxy_fixtures.store_uri

pytestmark = pytest.mark.slow

LEASE_TTL = 1.5
CALL = 4.0
REQUESTS = 2


async def test_f2_call_outliving_the_lease_ttl(tmp_path: Path, upstream: Upstream, store_uri: str) -> None:
    key = f"f2-{uuid.uuid4().hex[:6]}"
    config = f"""
lease_ttl = "{round(LEASE_TTL * 1000)}ms"
upstream_timeout = "60s"
[[rules]]
key = "{key}"
parallelism = 1
[defaults]
max_wait = "60s"
"""
    gateway = Flowgate(tmp_path, upstream.url, store=store_uri, config=config)
    client = aioredis.Redis.from_url(store_uri) if store_uri.startswith("redis") else None
    expiries: list[tuple[float, float]] = []  # (when read, lease expiry in Redis ms)
    try:
        with running(gateway):
            request = f"GET /zombie?sleep={CALL:g} HTTP/1.1\r\nHost: gw\r\n\r\n".encode()
            calls = [asyncio.create_task(raw_request(gateway.port, request, timeout=60)) for _ in range(REQUESTS)]
            if client is not None:
                deadline = time.monotonic() + CALL - 0.5
                while time.monotonic() < deadline:  # during the first call
                    leases = await live_leases(client, key)
                    assert len(leases) <= 1
                    if leases:
                        expiries.append((time.monotonic(), next(iter(leases.values()))))
                    await asyncio.sleep(0.05)
            answers = await asyncio.gather(*calls)
        assert "Traceback" not in gateway.log
    finally:
        if client is not None:
            await client.aclose()
    assert [answer.status for answer in answers] == [200] * REQUESTS
    records = upstream.app.calls(key)
    assert len(records) == REQUESTS
    assert all(call.end - call.start >= CALL - 0.05 for call in records)  # each call outlived the TTL
    assert max_concurrency(records) == 1  # never parallelism + 1
    starts = sorted(call.start for call in records)
    ends = sorted(call.end for call in records)
    assert all(start >= end - 0.01 for start, end in zip(starts[1:], ends, strict=False))  # one after the other
    summary = f"{REQUESTS} calls of {CALL:g}s, lease TTL {LEASE_TTL:g}s: max concurrency 1"
    if client is not None:
        moves = [(at, expiry) for (_, before), (at, expiry) in itertools.pairwise(expiries) if expiry > before]
        assert len(moves) >= 3, expiries  # renewed several times while the call ran
        gaps = [later - earlier for (earlier, _), (later, _) in itertools.pairwise(moves)]
        assert max(gaps) < LEASE_TTL * 2 / 3 + 0.5, gaps  # every lease_ttl/3 = 0.5 s, with room for noise
        summary += f"; expiry pushed forward {len(moves)} times, every {sum(gaps) / len(gaps):.2f}s on average"
    print(f"\nF2 {store_uri.split(':')[0]}: {summary}")
