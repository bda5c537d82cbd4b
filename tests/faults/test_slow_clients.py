"""X2 slow clients (issue 5): connections trickling their request head, or their body, are closed within a
deadline while normal clients keep being served.

Where each deadline lives (uvicorn has neither: `timeout_keep_alive` only closes idle connections between
requests, and its h11 size limit bounds bytes, not time):
- head: `header_timeout` (default 10 s), enforced by Flowgate's protocol subclass (gateway/server.py,
  `LimitedHttpToolsProtocol`): from the connection's start or the request's first byte, the head must be
  complete in time, else 408 `request_timeout` and the connection closes.
- body: `body_timeout` (default 60 s), enforced by the proxy (gateway/inbox.py): the time the proxy spends
  waiting for the client's body bytes, summed over the body, may not exceed it, else 408 `body_timeout`, the
  upstream call is aborted, the lease released and the connection closed. Waiting for a token does not count.

Both are set to 2 s here. A real `flowgate serve` on loopback; 500 head tricklers (the issue's figure) in the
default suite; the body tricklers are fewer (100), as they also hold upstream calls open.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import aiohttp
import pytest

from tests import proxy_fixtures
from tests.faults.harness import Flowgate, running

upstream = proxy_fixtures.upstream
Upstream = proxy_fixtures.Upstream

pytestmark = pytest.mark.slow

DEADLINE = 2.0
CLOSE_BOUND = DEADLINE + 3.0  # generous: 500 sockets on a shared 2-core box
TRICKLE_EVERY = 0.4
HEAD_TRICKLERS = 500
BODY_TRICKLERS = 100


async def trickle(port: int, head: bytes, drip: bytes, opened: list[float]) -> tuple[float, bytes]:
    """Send `head` at once, then `drip` a byte every TRICKLE_EVERY until the server closes; (seconds the
    connection lived, what the server answered)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    opened.append(started)
    answer = b""

    async def read() -> None:
        nonlocal answer
        try:
            while chunk := await reader.read(4096):
                answer += chunk
        except ConnectionError:
            pass

    reading = asyncio.create_task(read())
    try:
        writer.write(head)
        for byte in drip:
            if reading.done():
                break
            try:
                writer.write(bytes([byte]))
                await writer.drain()
            except ConnectionError:
                break
            await asyncio.wait([reading], timeout=TRICKLE_EVERY)
        await asyncio.wait_for(reading, 30)
        return time.monotonic() - started, answer
    finally:
        writer.close()


async def normal_traffic(url: str, stop: asyncio.Event, latencies: list[float], statuses: list[int]) -> None:
    async with aiohttp.ClientSession() as session:

        async def client() -> None:
            while not stop.is_set():
                sent = time.monotonic()
                async with session.get(f"{url}/normal") as response:
                    await response.read()
                    statuses.append(response.status)
                latencies.append(time.monotonic() - sent)
                await asyncio.sleep(0.02)

        await asyncio.gather(*(client() for _ in range(5)))


def start_gateway(tmp_path: Path, upstream: Upstream, config: str = "") -> Flowgate:
    env = {"FLOWGATE_HEADER_TIMEOUT": f"{DEADLINE:g}s", "FLOWGATE_BODY_TIMEOUT": f"{DEADLINE:g}s"}
    return Flowgate(tmp_path, upstream.url, config=config, env=env)


async def test_x2_head_tricklers_are_cut_off_while_others_are_served(tmp_path: Path, upstream: Upstream) -> None:
    gateway = start_gateway(tmp_path, upstream)
    latencies: list[float] = []
    statuses: list[int] = []
    opened: list[float] = []
    with running(gateway):
        stop = asyncio.Event()
        normal = asyncio.create_task(normal_traffic(gateway.url, stop, latencies, statuses))
        head = b"GET /slow HTTP/1.1\r\nHost: gw\r\n"
        drip = b"X-Slow-Header: " + b"a" * 200  # never finishes within the deadline
        results = await asyncio.gather(*(trickle(gateway.port, head, drip, opened) for _ in range(HEAD_TRICKLERS)))
        stop.set()
        await normal
    lived = [seconds for seconds, _ in results]
    assert max(lived) < CLOSE_BOUND, max(lived)
    assert min(lived) >= DEADLINE - 0.5  # the deadline closed them (the client's clock starts a little late)
    answered = [answer for _, answer in results if answer]
    assert all(answer.startswith(b"HTTP/1.1 408 ") and b'"request_timeout"' in answer for answer in answered)
    assert len(answered) >= HEAD_TRICKLERS * 0.9  # most read the 408 before the close (a reset may eat some)
    assert not any(call.path == "/slow" for call in upstream.app.calls(""))  # nothing forwarded
    assert statuses and set(statuses) == {200}  # normal clients kept being served throughout
    assert max(latencies) < 2.0, max(latencies)
    assert "Traceback" not in gateway.log
    print(
        f"\nX2 head: {HEAD_TRICKLERS} tricklers closed after {min(lived):.2f}-{max(lived):.2f}s (deadline "
        f"{DEADLINE:g}s), {len(answered)} read the 408; meanwhile {len(statuses)} normal requests, all 200, "
        f"slowest {max(latencies) * 1000:.0f} ms"
    )


async def test_x2_body_tricklers_are_cut_off_and_their_upstream_calls_aborted(
    tmp_path: Path, upstream: Upstream
) -> None:
    key = f"x2-{uuid.uuid4().hex[:6]}"
    config = f"""
[[rules]]
path = "/limited/"
key = "{key}"
parallelism = 1
[defaults]
max_wait = "30s"
"""
    gateway = start_gateway(tmp_path, upstream, config)
    latencies: list[float] = []
    statuses: list[int] = []
    opened: list[float] = []
    with running(gateway):
        stop = asyncio.Event()
        normal = asyncio.create_task(normal_traffic(gateway.url, stop, latencies, statuses))
        body = b"b" * 100
        head = b"POST /body HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n" % len(body)
        passthrough = [trickle(gateway.port, head, body, opened) for _ in range(BODY_TRICKLERS)]
        # Flow-controlled (parallelism 1): the three queue one behind the other; each gets the whole deadline
        # once it holds the token, since waiting for a token does not count against the body deadline.
        limited_head = b"POST /limited/x HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n" % len(body)
        limited = [trickle(gateway.port, limited_head, body, []) for _ in range(3)]
        results = await asyncio.gather(*passthrough, *limited)
        stop.set()
        await normal
        await asyncio.sleep(0.5)
        flow = gateway.admin("/readyz")
        assert flow[0] == 200
    lived = [seconds for seconds, _ in results[:BODY_TRICKLERS]]
    assert max(lived) < CLOSE_BOUND, max(lived)
    assert min(lived) >= DEADLINE - 0.5
    for _, answer in results:
        assert answer.startswith(b"HTTP/1.1 408 ") and b'"body_timeout"' in answer, answer[:200]
    limited_lived = sorted(seconds for seconds, _ in results[BODY_TRICKLERS:])
    assert limited_lived[-1] >= 3 * DEADLINE - 0.3  # one after the other: the token was held, then released
    calls = upstream.app.calls("")
    body_calls = [call for call in calls if call.path == "/body"]
    assert len(body_calls) == BODY_TRICKLERS  # forwarded while streaming (passthrough)...
    assert all(call.body_size < len(body) for call in body_calls)  # ...and aborted before the body completed
    limited_calls = upstream.app.calls(key)
    assert len(limited_calls) == 3 and all(call.end for call in limited_calls)
    assert statuses and set(statuses) == {200}
    assert max(latencies) < 2.0, max(latencies)
    assert "Traceback" not in gateway.log
    print(
        f"\nX2 body: {BODY_TRICKLERS} tricklers closed after {min(lived):.2f}-{max(lived):.2f}s (deadline "
        f"{DEADLINE:g}s), 3 flow-controlled ones after {[round(x, 2) for x in limited_lived]} s; meanwhile "
        f"{len(statuses)} normal requests, all 200, slowest {max(latencies) * 1000:.0f} ms"
    )
