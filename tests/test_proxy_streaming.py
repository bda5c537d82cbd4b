"""Large bodies stream through the proxy in both directions without being buffered whole, and each piece of a
streamed response reaches the client as soon as the upstream sends it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from gateway.types import Receive, Scope, Send
from tests import proxy_fixtures
from tests.proxy_harness import gateway_processes, running_gateway
from tests.upstream_app import serve_in_thread

upstream = proxy_fixtures.upstream
upstream_client = proxy_fixtures.upstream_client
key = proxy_fixtures.key
Upstream = proxy_fixtures.Upstream

SIZE = 50 * 1024 * 1024
CHUNK = 64 * 1024


async def generated(total: int, marks: dict[str, float] | None = None) -> AsyncIterator[bytes]:
    block = b"b" * CHUNK
    sent = 0
    while sent < total:
        piece = block[: min(CHUNK, total - sent)]
        sent += len(piece)
        yield piece
        if marks is not None:
            # The upstream is a thread of this process: let it run while the client sends, or a fast gateway and
            # big socket buffers could take the whole body before the upstream thread gets to its first read.
            await asyncio.sleep(0.001)
    if marks is not None:
        marks["sent"] = time.monotonic()


async def test_upstream_receives_before_client_finished_sending(upstream: Upstream, key: str) -> None:
    marks: dict[str, float] = {}
    body = generated(8 * 1024 * 1024, marks)
    async with (
        running_gateway(upstream.url, max_body=SIZE) as gateway,
        aiohttp.ClientSession() as session,
        session.post(f"{gateway.url}/up", data=body, headers={"X-Test-Key": key}) as response,
    ):
        assert response.status == 200
        seen = await response.json()
    assert seen["body_size"] == 8 * 1024 * 1024
    assert seen["first_byte_at"] < marks["sent"]


async def test_50mb_both_ways_keeps_gateway_memory_bounded(upstream: Upstream, key: str) -> None:
    env = {"FLOWGATE_TEST_MAX_BODY": str(2 * SIZE)}
    rules = [{"key": key, "path": "/", "parallelism": 2}]
    with gateway_processes(1, upstream.url, "memory://", rules, **env) as (gateway,):
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{gateway.url}/warm") as response:
                await response.read()
            baseline = gateway.rss_kib()
            async with session.post(f"{gateway.url}/up", data=generated(SIZE)) as response:
                assert response.status == 200
                assert (await response.json())["body_size"] == SIZE
            received = 0
            async with session.get(f"{gateway.url}/down?size={SIZE}") as response:
                assert response.status == 200
                async for chunk in response.content.iter_chunked(CHUNK):
                    received += len(chunk)
            assert received == SIZE
            peak = gateway.rss_kib("VmHWM")
    assert peak - baseline < 30 * 1024, f"gateway RSS grew by {(peak - baseline) // 1024} MiB for 50 MiB bodies"


class PausedStream:
    """Sends `first`, then waits until `go` is set before sending `second` and ending the response (chunked)."""

    def __init__(self) -> None:
        self.go = threading.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b"data: first\n\n", "more_body": True})
        await asyncio.get_running_loop().run_in_executor(None, self.go.wait, 10)
        await send({"type": "http.response.body", "body": b"data: second\n\n", "more_body": False})


async def test_a_streamed_piece_reaches_the_client_before_the_next_is_sent(key: str) -> None:
    app = PausedStream()
    flow_control = {"Flow-Control-Key": key, "Flow-Control-Value": "parallelism=1"}
    options: Any = {"timeout_graceful_shutdown": 1}
    with serve_in_thread(app, **options) as stream:
        try:
            async with (
                running_gateway(stream.url) as gateway,
                aiohttp.ClientSession() as session,
                session.get(f"{gateway.url}/events", headers=flow_control) as response,
            ):
                async with asyncio.timeout(5):  # held back until the next piece, it would never come
                    first = await response.content.readuntil(b"\n\n")
                assert first == b"data: first\n\n"
                app.go.set()
                assert await response.content.read() == b"data: second\n\n"
        finally:
            app.go.set()
