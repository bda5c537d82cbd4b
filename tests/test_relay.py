"""The express lane (gateway/relay.py): which requests take it, and that a relayed request keeps the proxy's
promises: the same answers, back-pressure to the upstream, a stale connection's request sent again, and its token
released on every path.

The lane needs an idle upstream connection, so each test first sends one request that opens it (through the app).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from gateway.cycle import RequestCycle
from gateway.engine import Lease
from gateway.proxy import ProxyApp
from gateway.server import LimitedHttpToolsProtocol
from gateway.types import ASGIApp
from gateway.upstream.lean import LeanClient
from tests import proxy_fixtures
from tests.proxy_harness import Gateway, eventually, key_idle, parse_response, raw_exchange, running_gateway
from tests.redis_servers import RedisServer

upstream = proxy_fixtures.upstream
key = proxy_fixtures.key
store_uri = proxy_fixtures.store_uri
Upstream = proxy_fixtures.Upstream
fc = proxy_fixtures.fc


@pytest.fixture
def app_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The paths of the HTTP requests that ran as the ASGI app; the other requests took the lane. Counted where
    the server starts the app (server.py stays Python in the compiled build, so this works in both)."""
    calls: list[str] = []
    original = LimitedHttpToolsProtocol._start_asgi_task

    def counting(self: LimitedHttpToolsProtocol, cycle: RequestCycle, app: ASGIApp) -> None:
        if isinstance(app, ProxyApp):
            calls.append(cycle.scope["path"])
        original(self, cycle, app)

    monkeypatch.setattr(LimitedHttpToolsProtocol, "_start_asgi_task", counting)
    yield calls


@contextlib.asynccontextmanager
async def lean_gateway(upstream_url: str, store: str = "memory://", **options: Any) -> AsyncIterator[Gateway]:
    async with running_gateway(upstream_url, store, client=LeanClient(upstream_url), **options) as gateway:
        yield gateway


async def warm_up(
    session: aiohttp.ClientSession, gateway: Gateway, path: str = "/warm", headers: dict[str, str] | None = None
) -> None:
    """One request, read to its end: the upstream connection it used is idle again when this returns."""
    async with session.get(gateway.url + path, headers=headers) as response:
        await response.read()
        assert response.status == 200


async def test_requests_that_can_go_at_once_take_the_lane(
    upstream: Upstream, store_uri: str, key: str, app_calls: list[str]
) -> None:
    """On Redis the lane asks for the token with one batched round trip and waits for it by callback; a key this
    gateway has not seen yet goes through the app first (its `max_keys` check)."""
    busy = f"{key}-busy"
    async with lean_gateway(upstream.url, store_uri) as gateway, aiohttp.ClientSession() as session:
        await warm_up(session, gateway)
        for known in (key, busy):
            await warm_up(session, gateway, "/warm", fc(known))
        app_calls.clear()
        async with session.get(f"{gateway.url}/get?x=1", headers=fc(key, "parallelism=2")) as response:
            echoed = await response.json()
            assert response.status == 200
            assert int(response.headers["Flow-Control-Waited"]) < 1000  # ms: the store round trip, if any
        sent = dict(echoed["headers"])
        assert sent["flow-control-key"] == key and "." in sent["flow-control-lease"]
        assert echoed["path"] == "/get" and echoed["query"] == "x=1"
        async with session.post(f"{gateway.url}/post", data=b'{"id":1}', headers=fc(key, "parallelism=2")) as response:
            assert (await response.json())["body_size"] == 8

        async def chunks() -> AsyncIterator[bytes]:
            yield b"streamed"

        async with session.post(f"{gateway.url}/chunked", data=chunks()) as response:  # body not all there
            assert (await response.json())["body_size"] == 8

        async def status(path: str) -> int:
            async with session.get(gateway.url + path, headers=fc(busy)) as response:
                await response.read()
                return response.status

        held = asyncio.create_task(status("/held?sleep=0.5"))
        await eventually(lambda: len(upstream.app.calls(busy)) == 2)  # after its warm-up
        assert await status("/waits") == 200  # its key's one token is taken: it waits, as the app
        assert await held == 200
        assert await key_idle(gateway.store, key) and await key_idle(gateway.store, busy)
    assert app_calls == ["/chunked", "/waits"]


async def test_with_the_lane_off_every_request_runs_as_the_app(
    upstream: Upstream, key: str, app_calls: list[str]
) -> None:
    async with lean_gateway(upstream.url, express_lane=False) as gateway, aiohttp.ClientSession() as session:
        await warm_up(session, gateway)
        await warm_up(session, gateway, "/again")
    assert app_calls == ["/warm", "/again"]


async def test_a_relayed_answer_for_a_slow_client_holds_the_upstream_back(upstream: Upstream, key: str) -> None:
    """The client reads nothing for a while: the gateway stops reading the upstream (the call cannot end), then
    relays every byte once the client reads, and frees the token."""
    size = 64 * 1024 * 1024  # more than the sockets' buffers on the way hold
    async with lean_gateway(upstream.url) as gateway, aiohttp.ClientSession() as session:
        await warm_up(session, gateway)
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port, limit=64 * 1024)
        try:
            request = f"GET /big?size={size} HTTP/1.1\r\nHost: x\r\nFlow-Control-Key: {key}\r\n"
            writer.write(request.encode() + b"Flow-Control-Value: parallelism=1\r\n\r\n")
            await eventually(lambda: bool(upstream.app.calls(key)))
            await asyncio.sleep(0.5)
            assert upstream.app.calls(key)[0].end == 0.0  # still sending: held back by the gateway
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            received = 0
            while received < size:  # chunked framing adds a little; read the body's bytes and more
                chunk = await reader.read(1 << 20)
                assert chunk
                received += len(chunk)
        finally:
            writer.close()
        await eventually(lambda: upstream.app.calls(key)[0].end > 0)
        await eventually(lambda: key_idle(gateway.store, key))


@contextlib.asynccontextmanager
async def scripted_upstream(*answers: bytes | None) -> AsyncIterator[tuple[str, list[bytes]]]:
    """An upstream answering its n-th request with `answers[n]`, keeping the connection open after each (None:
    close it without answering; b"": never answer). Yields its URL and the request heads it read."""
    heads: list[bytes] = []
    writers: list[asyncio.StreamWriter] = []
    done = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while len(heads) < len(answers):
                head = await reader.readuntil(b"\r\n\r\n")
                answer = answers[len(heads)]
                heads.append(head)
                if answer is None:
                    break
                if not answer:
                    await done.wait()
                writer.write(answer)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", heads
    finally:
        done.set()
        server.close()
        for writer in writers:
            writer.close()


OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


@pytest.mark.parametrize(("method", "expected"), [("GET", 200), ("POST", 502)])
async def test_a_reused_connection_that_fails_first_is_sent_again_only_when_that_is_safe(
    key: str, method: str, expected: int
) -> None:
    """The upstream closed a kept-alive connection as the request came: a GET goes again on a new connection (once),
    a bodiless POST is answered 502 (it may have been acted on)."""
    async with scripted_upstream(OK, None, OK) as (url, heads), lean_gateway(url) as gateway:
        async with aiohttp.ClientSession() as session:
            await warm_up(session, gateway)
            async with session.request(method, f"{gateway.url}/again", headers=fc(key)) as response:
                assert response.status == expected
                if expected == 502:
                    assert (await response.json())["error"] == "upstream_unreachable"
        assert len(heads) == (3 if method == "GET" else 2)
        assert await key_idle(gateway.store, key)


async def test_a_relayed_request_gets_504_when_the_upstream_does_not_answer(key: str) -> None:
    async with scripted_upstream(OK, b"") as (url, _), lean_gateway(url, upstream_timeout=0.3) as gateway:
        async with aiohttp.ClientSession() as session:
            await warm_up(session, gateway)
            async with session.get(f"{gateway.url}/silent", headers=fc(key)) as response:
                assert response.status == 504
                assert (await response.json())["error"] == "upstream_timeout"
        assert await key_idle(gateway.store, key)


async def test_a_relayed_body_that_stalls_cuts_the_response_and_frees_the_token(key: str) -> None:
    partial = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"x" * 10
    async with scripted_upstream(OK, partial) as (url, _), lean_gateway(url, upstream_timeout=0.3) as gateway:
        async with aiohttp.ClientSession() as session:
            await warm_up(session, gateway)
            async with session.get(f"{gateway.url}/stalls", headers=fc(key)) as response:
                assert response.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    await response.read()
        assert await key_idle(gateway.store, key)


async def test_a_client_leaving_a_relayed_request_frees_its_token_and_the_connection(key: str) -> None:
    async with scripted_upstream(OK, b"") as (url, heads), lean_gateway(url) as gateway:
        async with aiohttp.ClientSession() as session:
            await warm_up(session, gateway)
        client = gateway.app.client
        assert isinstance(client, LeanClient)
        await eventually(lambda: client.open_connections == client.idle_connections)  # none kept by the relay
        _, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(f"GET /left HTTP/1.1\r\nHost: x\r\nFlow-Control-Key: {key}\r\n".encode())
        writer.write(b"Flow-Control-Value: parallelism=1\r\n\r\n")
        await eventually(lambda: len(heads) == 2)  # the upstream has it, and never answers
        assert not await key_idle(gateway.store, key)
        writer.close()
        await eventually(lambda: key_idle(gateway.store, key))
        await eventually(lambda: gateway.app.client.open_connections == 0)  # abandoned, not pooled again


async def test_an_upstream_holding_the_token_keeps_it_after_a_relayed_answer(upstream: Upstream, key: str) -> None:
    async with lean_gateway(upstream.url) as gateway, aiohttp.ClientSession() as session:
        await warm_up(session, gateway)
        async with session.get(f"{gateway.url}/hold?hold=1", headers=fc(key)) as response:
            echoed = json.loads(await response.read())
            assert "flow-control-hold" not in response.headers
        assert not await key_idle(gateway.store, key)
        lease = dict(echoed["headers"])["flow-control-lease"]
        assert await gateway.controller.release(Lease.from_token(lease))
        assert await key_idle(gateway.store, key)


@pytest.mark.redis
async def test_a_client_leaving_before_redis_answers_leaves_no_token_behind(
    upstream: Upstream, own_redis: RedisServer, key: str
) -> None:
    """The token comes after the client left: it is released, the upstream never sees the request, and the idle
    connection the relay held is not kept."""
    async with lean_gateway(upstream.url, own_redis.url) as gateway, aiohttp.ClientSession() as session:
        await warm_up(session, gateway, "/warm", fc(key))
        own_redis.freeze()
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            writer.write(f"GET /late HTTP/1.1\r\nHost: x\r\nFlow-Control-Key: {key}\r\n".encode())
            writer.write(b"Flow-Control-Value: parallelism=1\r\n\r\n")
            await asyncio.sleep(0.3)
            writer.close()
            await asyncio.sleep(0.1)
        finally:
            own_redis.thaw()
        await eventually(lambda: key_idle(gateway.store, key))
        assert [call.path for call in upstream.app.calls(key)] == ["/warm"]
        client = gateway.app.client
        assert isinstance(client, LeanClient)
        await eventually(lambda: client.open_connections == client.idle_connections)  # none kept by the relay


@pytest.mark.redis
async def test_a_relayed_request_gets_503_when_redis_is_gone(
    upstream: Upstream, own_redis: RedisServer, key: str
) -> None:
    async with lean_gateway(upstream.url, own_redis.url) as gateway, aiohttp.ClientSession() as session:
        await warm_up(session, gateway, "/warm", fc(key))
        own_redis.kill()
        async with session.get(f"{gateway.url}/down", headers=fc(key)) as response:
            assert response.status == 503
            assert (await response.json())["error"] == "store_unavailable"


@pytest.mark.redis
async def test_an_upstream_connection_closed_while_redis_answers_sends_the_request_on_a_new_one(
    own_redis: RedisServer, key: str
) -> None:
    """The relay holds an idle connection while it waits for the token; the upstream closes it meanwhile (its
    keep-alive timeout): the request goes through the app, on a new connection, and is answered."""
    closers: list[asyncio.Task[None]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(OK)  # then close the kept-alive connection soon, as an upstream's idle timeout does
        closers.append(asyncio.create_task(close_soon(writer)))

    async def close_soon(writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.2)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with lean_gateway(url, own_redis.url) as gateway, aiohttp.ClientSession() as session:
            await warm_up(session, gateway, "/warm", fc(key))
            own_redis.freeze()
            try:
                head = f"GET /late HTTP/1.1\r\nHost: x\r\nFlow-Control-Key: {key}\r\n"
                data = head.encode() + b"Flow-Control-Value: parallelism=1\r\nConnection: close\r\n\r\n"
                request = asyncio.create_task(raw_exchange(gateway.port, data))  # a client that does not retry
                await asyncio.sleep(0.5)  # the upstream closes the connection the relay holds
            finally:
                own_redis.thaw()
            status, _, body = parse_response(await request)
            assert (status, body) == (200, b"ok")
            await eventually(lambda: key_idle(gateway.store, key))
    finally:
        server.close()
        await asyncio.gather(*closers)
