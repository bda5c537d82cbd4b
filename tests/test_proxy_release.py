"""The lease is released on every path (success, upstream error, timeout, client gone while waiting, mid-upload or
mid-download, task cancellation), and completion reporting (`Flow-Control-Hold: 1`) keeps it until released."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from typing import Any

import aiohttp
import pytest

from gateway.cycle import RequestCycle
from gateway.engine import Lease
from gateway.inbox import RequestInbox
from gateway.rules import Rule
from tests import proxy_fixtures
from tests.proxy_harness import eventually, key_idle, raw_exchange, running_gateway
from tests.upstream_app import free_port

upstream = proxy_fixtures.upstream
upstream_client = proxy_fixtures.upstream_client
key = proxy_fixtures.key
store_uri = proxy_fixtures.store_uri
Upstream = proxy_fixtures.Upstream
fc = proxy_fixtures.fc


async def get(url: str, headers: dict[str, str]) -> int:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        await response.read()
        return response.status


async def test_released_after_success_error_and_timeout(upstream: Upstream, store_uri: str, key: str) -> None:
    async with running_gateway(upstream.url, store_uri, upstream_timeout=0.3) as gateway:
        assert await get(f"{gateway.url}/ok", fc(key)) == 200
        assert await get(f"{gateway.url}/slow?sleep=2", fc(key)) == 504
        assert await get(f"{gateway.url}/boom?status=500", fc(key)) == 500  # an upstream answer, passed on
        await eventually(lambda: key_idle(gateway.store, key))
        assert gateway.controller.held == 0
    async with running_gateway(f"http://127.0.0.1:{free_port()}", store_uri) as gateway:
        assert await get(f"{gateway.url}/x", fc(key)) == 502
        await eventually(lambda: key_idle(gateway.store, key))
        assert gateway.controller.held == 0


@pytest.mark.parametrize("http", ["flowgate", "httptools"])  # disconnect reported by the server, or by receive()
@pytest.mark.parametrize("body", ["", "payload"])  # with a body that arrived whole, flowgate's server takes it at once
async def test_client_gone_while_waiting_is_never_forwarded(
    upstream: Upstream, store_uri: str, key: str, http: str, body: str
) -> None:
    async with running_gateway(upstream.url, store_uri, http=http) as gateway:
        first = asyncio.create_task(get(f"{gateway.url}/first?sleep=0.6", fc(key)))
        await eventually(lambda: upstream.app.in_flight(key) == 1)
        request = (
            f"{'POST' if body else 'GET'} /second HTTP/1.1\r\nHost: gw\r\nFlow-Control-Key: {key}\r\n"
            f"Flow-Control-Value: parallelism=1\r\nContent-Length: {len(body)}\r\n\r\n{body}"
        )
        with contextlib.suppress(TimeoutError):
            await raw_exchange(gateway.port, request.encode(), timeout=0.2)  # gives up while waiting
        await eventually(lambda: gateway.controller.waiting == 0)
        assert await first == 200
        await asyncio.sleep(0.3)  # a wrongly kept ticket would be admitted and forwarded by now
        assert [call.path for call in upstream.app.calls(key)] == ["/first"]
        await eventually(lambda: key_idle(gateway.store, key))
        assert gateway.controller.held == 0


@pytest.mark.parametrize("http", ["flowgate", "httptools"])
async def test_client_gone_mid_download_aborts_upstream(
    upstream: Upstream, store_uri: str, key: str, http: str
) -> None:
    async with running_gateway(upstream.url, store_uri, http=http) as gateway:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(
            f"GET /drip?drip=400 HTTP/1.1\r\nHost: gw\r\nFlow-Control-Key: {key}\r\n"
            "Flow-Control-Value: parallelism=1\r\n\r\n".encode()
        )
        await reader.readuntil(b"\r\n\r\n")
        await reader.read(2048)  # some of the body arrived
        writer.close()
        await eventually(lambda: upstream.app.in_flight(key) == 0)  # the upstream saw the gateway hang up
        assert upstream.app.calls(key)[0].body_size == -1
        await eventually(lambda: key_idle(gateway.store, key))
        assert gateway.controller.held == 0


async def test_client_gone_mid_upload_aborts_upstream(upstream: Upstream, store_uri: str, key: str) -> None:
    async with running_gateway(upstream.url, store_uri) as gateway:
        _reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(
            f"POST /up HTTP/1.1\r\nHost: gw\r\nFlow-Control-Key: {key}\r\nFlow-Control-Value: parallelism=1\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        for _ in range(5):
            writer.write(b"400\r\n" + b"u" * 1024 + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.02)
        await eventually(lambda: upstream.app.in_flight(key) == 1)  # forwarded while still uploading
        writer.close()
        await eventually(lambda: upstream.app.in_flight(key) == 0)
        await eventually(lambda: key_idle(gateway.store, key))
        assert gateway.controller.held == 0


async def test_cancellation_releases(upstream: Upstream, key: str) -> None:
    async with running_gateway(upstream.url) as gateway:
        app = gateway.app
        never: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def receive_then_block() -> dict[str, Any]:
            await never
            raise AssertionError

        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        def scope(path: str, query: bytes = b"") -> dict[str, Any]:
            return {
                "type": "http", "method": "GET", "path": path, "raw_path": path.encode(), "query_string": query,
                "headers": [(b"flow-control-key", key.encode()), (b"flow-control-value", b"parallelism=1")],
                "client": ("127.0.0.1", 1), "scheme": "http", "http_version": "1.1",
            }  # fmt: skip

        calls = [receive(), receive_then_block()]

        async def first_receive() -> dict[str, Any]:
            return await calls.pop(0) if calls else await never

        # cancelled while the upstream works
        task = asyncio.create_task(app(scope("/c", b"sleep=5"), first_receive, send))
        await eventually(lambda: upstream.app.in_flight(key) == 1)
        # and a second one cancelled while waiting for the token
        waiting = asyncio.create_task(app(scope("/w"), first_receive, send))
        await eventually(lambda: gateway.controller.waiting == 1)
        waiting.cancel()
        task.cancel()
        for cancelled in (task, waiting):
            with contextlib.suppress(asyncio.CancelledError):
                await cancelled
        await eventually(lambda: key_idle(gateway.store, key))
        assert gateway.controller.held == 0
        assert [call.path for call in upstream.app.calls(key)] == ["/c"]


async def test_completion_reporting_holds_until_released(upstream: Upstream, store_uri: str, key: str) -> None:
    rule = Rule(key=key, parallelism=1)
    async with running_gateway(upstream.url, store_uri, rules=[rule]) as gateway:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{gateway.url}/job?hold=1&status=202") as response:
                assert response.status == 202
                assert "flow-control-hold" not in {name.lower() for name in response.headers}
            token = upstream.app.calls(key)[0].lease
            state = await gateway.store.state(key)
            assert state is not None and state.active == 1  # still held after the response
            assert gateway.controller.held == 0  # detached: not renewed by the gateway

            second = asyncio.create_task(get(f"{gateway.url}/next", {}))
            await eventually(lambda: gateway.controller.waiting == 1)
            await asyncio.sleep(0.1)
            assert not second.done()  # the held token blocks the key
            assert await gateway.controller.release(Lease.from_token(token))
            assert await second == 200
        await eventually(lambda: key_idle(gateway.store, key))
        assert not await gateway.controller.release(Lease.from_token(token))  # already released


# without a body the server tells the proxy of a disconnect; with one, a task of the proxy reads the body
@pytest.mark.parametrize("body", [b"", b"payload"])
async def test_a_request_leaves_no_reference_cycles(upstream: Upstream, store_uri: str, key: str, body: bytes) -> None:
    """What a request makes is freed when it ends, by reference counting: objects caught in a loop of references
    wait for the garbage collector, whose passes then cost the gateway a tenth of its CPU under load."""

    def alive() -> int:
        return sum(1 for item in gc.get_objects() if type(item) in (RequestCycle, RequestInbox))

    async with running_gateway(upstream.url, store_uri) as gateway, aiohttp.ClientSession() as session:

        async def send() -> None:
            async with session.post(f"{gateway.url}/ok", data=body, headers=fc(key, "parallelism=2")) as response:
                await response.read()
                assert response.status == 200

        await send()
        gc.collect()
        gc.disable()
        try:
            before = alive()
            for _ in range(20):
                await send()
            after = alive()
        finally:
            gc.enable()
    assert after - before <= 2  # the connection's latest cycle and inbox, still in reach
