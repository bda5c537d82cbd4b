"""LeanClient against real servers on loopback that misbehave on purpose (see tests/raw_http.py), plus uvicorn.

Timing: only generous upper bounds (the box is shared); every wait is bounded so the file stays well under 30 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.errors import ConfigError, UpstreamTimeout, UpstreamUnreachable
from gateway.upstream.base import UpstreamClient, UpstreamResponse
from gateway.upstream.lean import LeanClient
from tests.raw_http import Peer, Request, ScriptedServer, agen, ok, respond_each
from tests.uvicorn_thread import uvicorn_in_thread

MB = 1024 * 1024

# The uvloop parametrization below overrides `event_loop_policy`, deprecated in pytest-asyncio 1.x in favour of a
# conftest-wide `pytest_asyncio_loop_factories` hook (which would parametrize every test in the repository).
pytestmark = pytest.mark.filterwarnings('ignore:Overriding the "event_loop_policy" fixture:DeprecationWarning')


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    """Every async test runs on both loops: the proxy serves on uvloop, tests elsewhere use asyncio."""
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.EventLoopPolicy()  # type: ignore[no-any-return]
    return asyncio.DefaultEventLoopPolicy()


async def read_all(resp: UpstreamResponse) -> bytes:
    return b"".join([chunk async for chunk in resp.body()])


async def get(client: LeanClient, target: str = "/", method: str = "GET", timeout: float = 5.0) -> tuple[int, bytes]:
    resp = await client.request(method, target, [(b"Host", b"upstream")], None, timeout=timeout)
    return resp.status, await read_all(resp)


def test_lean_client_is_an_upstream_client() -> None:
    client: UpstreamClient = LeanClient("http://127.0.0.1:1")
    assert client is not None


@pytest.mark.parametrize(
    "url", ["https://example.com", "ftp://example.com", "http://", "http://h:1/?q=1", "http://u:p@h", "http://h:x"]
)
def test_bad_base_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        LeanClient(url)
    if url.startswith("https"):
        assert "http://" in str(info.value) and "aiohttp" in str(info.value)


# -- response framing --------------------------------------------------------------------------------------------


async def test_chunked_response_with_extensions_and_trailers_then_reuse() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'5;name=value;quoted="a b"\r\nhello\r\n'
        b"1;ext\r\n \r\n"
        b"5\r\nworld\r\n"
        b"0;last\r\nX-Checksum: abc\r\nX-Other: 2\r\n\r\n"
    )
    async with ScriptedServer(respond_each(lambda r: chunked if r.target == "/chunked" else ok())) as srv:
        client = LeanClient(srv.url)
        try:
            resp = await client.request("GET", "/chunked", [], None, timeout=5)
            assert resp.status == 200
            assert await read_all(resp) == b"hello world"
            assert resp.trailers == [(b"X-Checksum", b"abc"), (b"X-Other", b"2")]
            assert await get(client, "/next") == (200, b"ok")
        finally:
            await client.aclose()
        assert srv.accepted == 1  # the chunked exchange ended cleanly: its connection was reused


async def test_body_shorter_than_content_length_is_an_error_not_an_end() -> None:
    async def script(peer: Peer) -> None:
        await peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly-this")
        await peer.drain()
        peer.close()

    async with ScriptedServer(script) as srv:
        client = LeanClient(srv.url)
        try:
            resp = await client.request("GET", "/", [], None, timeout=5)
            received = []
            with pytest.raises(UpstreamUnreachable, match="before the response body was complete"):
                async for chunk in resp.body():
                    received.append(chunk)
            assert b"".join(received) == b"only-this"
            assert client.open_connections == 0
        finally:
            await client.aclose()


async def test_truncated_chunked_body_is_an_error() -> None:
    async def script(peer: Peer) -> None:
        await peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await peer.drain()
        peer.close()

    async with ScriptedServer(script) as srv:
        client = LeanClient(srv.url)
        try:
            resp = await client.request("GET", "/", [], None, timeout=5)
            with pytest.raises(UpstreamUnreachable):
                await read_all(resp)
        finally:
            await client.aclose()


async def test_read_until_close_body_and_connection_not_reused() -> None:
    async def script(peer: Peer) -> None:
        await peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart one, ")
        await peer.drain()
        await asyncio.sleep(0.05)
        peer.send(b"part two")
        await peer.drain()
        peer.writer.write_eof()  # half-close: the body ends here

    async with ScriptedServer(script) as srv:
        client = LeanClient(srv.url)
        try:
            assert await get(client) == (200, b"part one, part two")
            assert await get(client) == (200, b"part one, part two")
        finally:
            await client.aclose()
        assert srv.accepted == 2


async def test_http10_response_without_length_reads_until_close() -> None:
    async def script(peer: Peer) -> None:
        await peer.read_request()
        peer.send(b"HTTP/1.0 200 OK\r\n\r\nold school")
        await peer.drain()
        peer.close()

    async with ScriptedServer(script) as srv:
        client = LeanClient(srv.url)
        try:
            assert await get(client) == (200, b"old school")
        finally:
            await client.aclose()


async def test_interim_1xx_responses_are_skipped() -> None:
    interim = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 102 Processing\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
    )

    async def script(peer: Peer) -> None:
        await peer.read_request()
        peer.send(interim)
        await peer.drain()
        await asyncio.sleep(0.02)
        peer.send(b"HTTP/1.1 201 Created\r\nX-Final: yes\r\nContent-Length: 4\r\n\r\ndone")
        await peer.drain()
        while await peer.read_request():  # keep-alive continues after interim responses
            peer.send(interim + ok())

    async with ScriptedServer(script) as srv:
        client = LeanClient(srv.url)
        try:
            resp = await client.request("POST", "/", [(b"Expect", b"100-continue")], agen(b"x"), timeout=5)
            assert (resp.status, resp.reason, resp.headers) == (
                201,
                b"Created",
                [(b"X-Final", b"yes"), (b"Content-Length", b"4")],
            )
            assert await read_all(resp) == b"done"
            assert await get(client) == (200, b"ok")
        finally:
            await client.aclose()
        assert srv.accepted == 1


async def test_head_response_has_no_body_and_connection_is_reused() -> None:
    def answer(request: Request) -> bytes:
        if request.method == "HEAD":
            return b"HTTP/1.1 200 OK\r\nContent-Length: 12345\r\nContent-Type: text/html\r\n\r\n"
        return ok(b"after head")

    async with ScriptedServer(respond_each(answer)) as srv:
        client = LeanClient(srv.url)
        try:
            for _ in range(3):
                resp = await client.request("HEAD", "/", [], None, timeout=5)
                assert resp.status == 200 and (b"Content-Length", b"12345") in resp.headers
                assert await read_all(resp) == b""
                assert await get(client) == (200, b"after head")
        finally:
            await client.aclose()
        assert srv.accepted == 1


@pytest.mark.parametrize("status", [b"204 No Content", b"304 Not Modified"])
async def test_204_and_304_have_no_body(status: bytes) -> None:
    answer = b"HTTP/1.1 " + status + b'\r\nETag: "x"\r\n\r\n'
    async with ScriptedServer(respond_each(lambda r: answer if r.target == "/empty" else ok())) as srv:
        client = LeanClient(srv.url)
        try:
            resp = await client.request("GET", "/empty", [], None, timeout=5)
            assert resp.status == int(status[:3])
            assert await read_all(resp) == b""
            assert await get(client) == (200, b"ok")
        finally:
            await client.aclose()
        assert srv.accepted == 1


async def test_connection_close_is_honoured() -> None:
    async def script(peer: Peer) -> None:
        while await peer.read_request():
            peer.send(ok(b"bye", "Connection: close"))  # the server says close but keeps the socket open

    async with ScriptedServer(script) as srv:
        client = LeanClient(srv.url)
        try:
            for _ in range(3):
                assert await get(client) == (200, b"bye")
        finally:
            await client.aclose()
        assert srv.accepted == 3
        assert all(r.conn == i + 1 for i, r in enumerate(srv.requests))


async def test_switching_protocols_relays_raw_bytes_until_close() -> None:
    async def script(peer: Peer) -> None:
        await peer.read_request()
        peer.send(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\nraw\x00bytes")
        await peer.drain()
        peer.close()

    async with ScriptedServer(script) as srv:
        client = LeanClient(srv.url)
        try:
            resp = await client.request("GET", "/", [(b"Upgrade", b"x"), (b"Connection", b"upgrade")], None, timeout=5)
            assert resp.status == 101
            assert await read_all(resp) == b"raw\x00bytes"
        finally:
            await client.aclose()


STREAM = [  # (method, response bytes, expected body, expected trailers) on one keep-alive connection
    ("GET", b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"first"), b"first", []),
    (
        "GET",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;a=b\r\nabc\r\n4\r\ndefg\r\n0\r\nX-T: 1\r\n\r\n",
        b"abcdefg",
        [(b"X-T", b"1")],
    ),
    ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", b"", []),
    ("GET", b"HTTP/1.1 204 No Content\r\n\r\n", b"", []),
    ("GET", ok(b"last", "X-Long-Header: " + "h" * 300), b"last", []),
]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(cuts=[[], [], [36], [], []])  # HEAD head split inside its final CRLF: once judged "bytes after the head"
@given(cuts=st.lists(st.lists(st.integers(min_value=1, max_value=400), max_size=6), min_size=5, max_size=5))
def test_responses_split_at_any_byte_parse_the_same(
    cuts: list[list[int]], event_loop_policy: asyncio.AbstractEventLoopPolicy
) -> None:
    """Each response is written in pieces (cut at the drawn offsets, with a pause between pieces so they arrive
    as separate reads): the client must see the same statuses, bodies and trailers, on one connection."""

    answers = iter(zip(STREAM, cuts, strict=True))  # across connections, should the client open another

    async def script(peer: Peer) -> None:
        for (_, answer, _, _), offsets in answers:
            if await peer.read_request() is None:
                return
            start = 0
            for offset in sorted({o for o in offsets if o < len(answer)}):
                peer.send(answer[start:offset])
                await peer.drain()
                await asyncio.sleep(0.001)
                start = offset
            peer.send(answer[start:])
            await peer.drain()

    async def scenario() -> None:
        async with ScriptedServer(script) as srv:
            client = LeanClient(srv.url)
            try:
                for method, _, body, trailers in STREAM:
                    resp = await client.request(method, "/", [], None, timeout=5)
                    assert await read_all(resp) == body
                    assert resp.trailers == trailers
            finally:
                await client.aclose()
            assert srv.accepted == 1

    with asyncio.Runner(loop_factory=event_loop_policy.new_event_loop) as runner:
        runner.run(scenario())


# -- failures --------------------------------------------------------------------------------------------------


async def test_connection_refused_is_unreachable() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    client = LeanClient(f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(UpstreamUnreachable, match="could not connect"):
            await client.request("GET", "/", [], None, timeout=5)
        assert client.open_connections == 0
    finally:
        await client.aclose()


async def test_connect_timeout() -> None:
    """A listener whose accept queue is full drops new SYNs (Linux), so connecting hangs until the timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    client = LeanClient(f"http://127.0.0.1:{port}", connect_timeout=0.3)
    try:
        with pytest.raises(UpstreamTimeout, match="could not connect"):
            await client.request("GET", "/", [], None, timeout=5)
        assert client.open_connections == 0
    finally:
        await client.aclose()
        for sock in [*fillers, listener]:
            sock.close()


async def test_slow_headers_time_out() -> None:
    async def script(peer: Peer) -> None:
        await peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\n")  # the status line, then nothing
        await asyncio.sleep(10)

    async with ScriptedServer(script) as srv:
        client = LeanClient(srv.url)
        try:
            with pytest.raises(UpstreamTimeout, match="no response"):
                await client.request("GET", "/", [], None, timeout=0.3)
            assert srv.seen("GET") == 1  # a timeout is never retried
        finally:
            await client.aclose()


async def test_stalled_body_times_out() -> None:
    async def script(peer: Peer) -> None:
        await peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await asyncio.sleep(10)

    async with ScriptedServer(script) as srv:
        client = LeanClient(srv.url)
        try:
            resp = await client.request("GET", "/", [], None, timeout=0.3)
            with pytest.raises(UpstreamTimeout, match="stalled"):
                await read_all(resp)
        finally:
            await client.aclose()


async def test_upstream_not_reading_the_request_body_times_out() -> None:
    async def script(peer: Peer) -> None:
        await peer.read_head()
        await asyncio.sleep(10)  # never reads the body, never answers

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"z" * 65536

    async with ScriptedServer(script, rcvbuf=64 * 1024) as srv:
        client = LeanClient(srv.url)
        try:
            with pytest.raises(UpstreamTimeout, match="stopped reading"):
                await client.request("POST", "/", [], endless(), timeout=0.3)
            await srv.wait_for(lambda: client.open_connections == 0)  # aborted: unsent bytes do not hold it open
        finally:
            await client.aclose()


async def test_unsolicited_bytes_on_an_idle_connection_close_it() -> None:
    async def script(peer: Peer) -> None:
        await peer.read_request()
        peer.send(ok())
        await peer.drain()
        await asyncio.sleep(0.05)
        peer.send(ok(b"nobody asked"))  # while the client holds the connection idle
        await peer.drain()
        while await peer.read_request():
            peer.send(ok())

    async with ScriptedServer(script) as srv:
        client = LeanClient(srv.url)
        try:
            assert await get(client) == (200, b"ok")
            await srv.wait_for(lambda: srv.closed == 1)
            assert await get(client) == (200, b"ok")
        finally:
            await client.aclose()
        assert srv.accepted == 2


@pytest.mark.parametrize("pieces", [True, False], ids=["in-pieces", "at-once"])
async def test_huge_response_head_is_unreachable(pieces: bool) -> None:
    async def script(peer: Peer) -> None:
        await peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\n")
        for i in range(2000):  # ~100 KiB of headers
            peer.send(b"X-Filler-%d: %s\r\n" % (i, b"v" * 40))
            if pieces and i % 100 == 0:
                await peer.drain()
        peer.send(b"Content-Length: 0\r\n\r\n")
        await peer.drain()
        await asyncio.sleep(10)

    async with ScriptedServer(script) as srv:
        client = LeanClient(srv.url)
        try:
            with pytest.raises(UpstreamUnreachable, match="exceeds"):
                await client.request("GET", "/", [], None, timeout=5)
        finally:
            await client.aclose()


async def test_malformed_response_is_unreachable() -> None:
    async with ScriptedServer(respond_each(lambda r: b"HTTP/1.1 OK-ish\r\n\r\n")) as srv:
        client = LeanClient(srv.url)
        try:
            with pytest.raises(UpstreamUnreachable, match="malformed"):
                await client.request("GET", "/", [], None, timeout=5)
            assert srv.seen("GET") == 1  # bytes were received: no retry
        finally:
            await client.aclose()


async def test_reset_before_response_on_fresh_connection_is_not_retried() -> None:
    async def script(peer: Peer) -> None:
        await peer.read_request()
        peer.reset()

    async with ScriptedServer(script) as srv:
        client = LeanClient(srv.url)
        try:
            with pytest.raises(UpstreamUnreachable):
                await client.request("GET", "/", [], None, timeout=5)
        finally:
            await client.aclose()
        assert srv.seen("GET") == 1 and srv.accepted == 1


# -- keep-alive and retries --------------------------------------------------------------------------------------


async def test_server_closing_idle_connection_is_noticed() -> None:
    async def script(peer: Peer) -> None:
        await peer.read_request()
        peer.send(ok())
        await peer.drain()
        peer.close()  # keep-alive announced, then closed while idle

    async with ScriptedServer(script) as srv:
        client = LeanClient(srv.url)
        try:
            assert await get(client) == (200, b"ok")
            await srv.wait_for(lambda: client.idle_connections == 0)
            assert await get(client) == (200, b"ok")
        finally:
            await client.aclose()
        assert srv.seen("GET") == 2 and srv.accepted == 2


def drop_second_request(counter: list[int]) -> ScriptedServer:
    """Answers the first request on each connection; reads the second and closes without answering, as a server
    does when its keep-alive timeout races the client's next request."""

    async def script(peer: Peer) -> None:
        first = await peer.read_request()
        if first is None:
            return
        peer.send(ok(b"first"))
        await peer.drain()
        second = await peer.read_head()
        if second is None:
            return
        counter.append(1)
        peer.close()

    return ScriptedServer(script)


async def test_bodiless_request_on_reused_connection_is_retried_once() -> None:
    dropped: list[int] = []
    async with drop_second_request(dropped) as srv:
        client = LeanClient(srv.url)
        try:
            assert await get(client) == (200, b"first")
            assert await get(client) == (200, b"first")  # failed on the reused connection, answered on a fresh one
        finally:
            await client.aclose()
        assert len(dropped) == 1
        assert srv.seen("GET") == 3  # once answered, once dropped (reused connection), once answered (retry)
        assert srv.accepted == 2


async def test_streamed_request_on_reused_connection_is_not_retried() -> None:
    dropped: list[int] = []
    async with drop_second_request(dropped) as srv:
        client = LeanClient(srv.url)
        try:
            assert await get(client) == (200, b"first")
            with pytest.raises(UpstreamUnreachable, match="before responding"):
                await client.request("POST", "/pay", [], agen(b"amount=10"), timeout=5)
        finally:
            await client.aclose()
        assert srv.seen("POST") == 1 and srv.accepted == 1


async def test_retry_fails_cleanly_when_fresh_connection_also_fails() -> None:
    async def script(peer: Peer) -> None:
        if peer.n == 1:
            await peer.read_request()
            peer.send(ok())
            await peer.drain()
        await peer.read_head()
        peer.close()

    async with ScriptedServer(script) as srv:
        client = LeanClient(srv.url)
        try:
            assert await get(client) == (200, b"ok")
            with pytest.raises(UpstreamUnreachable):
                await get(client)
        finally:
            await client.aclose()
        assert srv.seen("GET") == 3 and srv.accepted == 2  # one retry, not more


# -- pool -------------------------------------------------------------------------------------------------------


async def test_pool_bound_is_respected_and_reached() -> None:
    async def slow_ok(request: Request) -> bytes:
        await asyncio.sleep(0.05)
        return ok(request.target.encode())

    async with ScriptedServer(respond_each(slow_ok)) as srv:
        client = LeanClient(srv.url, max_connections=3)
        try:
            results = await asyncio.gather(*(get(client, f"/{i}") for i in range(24)))
            assert results == [(200, f"/{i}".encode()) for i in range(24)]
            assert client.open_connections <= 3
        finally:
            await client.aclose()
        assert srv.max_live == 3 and srv.accepted == 3


async def test_busy_small_pool_completes_every_request() -> None:
    """As many tasks as connections and an instant upstream: a connection is often reused (popped idle) before the
    task of its previous exchange has resumed, which must not disturb either exchange."""
    async with ScriptedServer(respond_each(lambda r: ok(r.target.encode()))) as srv:
        client = LeanClient(srv.url, max_connections=8)

        async def worker(n: int) -> None:
            for i in range(150):
                assert await get(client, f"/{n}/{i}", timeout=10) == (200, f"/{n}/{i}".encode())

        try:
            async with asyncio.timeout(20):
                await asyncio.gather(*(worker(n) for n in range(8)))
        finally:
            await client.aclose()
        assert srv.accepted == 8 and len(srv.requests) == 1200


async def test_waiters_are_served_in_fifo_order() -> None:
    async def slow_ok(request: Request) -> bytes:
        await asyncio.sleep(0.01)
        return ok()

    async with ScriptedServer(respond_each(slow_ok)) as srv:
        client = LeanClient(srv.url, max_connections=1)
        try:
            tasks = []
            for i in range(10):
                tasks.append(asyncio.create_task(get(client, f"/{i}")))
                await asyncio.sleep(0)  # each task joins the queue in this order
            await asyncio.gather(*tasks)
        finally:
            await client.aclose()
        assert [r.target for r in srv.requests] == [f"/{i}" for i in range(10)]


async def test_cancelled_waiter_does_not_leak_a_slot() -> None:
    release = asyncio.Event()

    async def held(request: Request) -> bytes:
        if request.target == "/hold":
            await release.wait()
        return ok()

    async with ScriptedServer(respond_each(held)) as srv:
        client = LeanClient(srv.url, max_connections=1)
        try:
            holder = asyncio.create_task(get(client, "/hold"))
            await srv.wait_for(lambda: len(srv.requests) == 1)
            waiter = asyncio.create_task(get(client, "/cancelled"))
            await asyncio.sleep(0.02)
            waiter.cancel()
            release.set()
            assert await holder == (200, b"ok")
            assert await get(client, "/after") == (200, b"ok")
            assert client.open_connections == 1
        finally:
            await client.aclose()
        assert [r.target for r in srv.requests] == ["/hold", "/after"]


async def test_idle_connections_expire() -> None:
    async with ScriptedServer(respond_each(lambda r: ok())) as srv:
        client = LeanClient(srv.url, idle_timeout=0.2)
        try:
            await asyncio.gather(*(get(client) for _ in range(3)))
            assert client.idle_connections >= 1
            await srv.wait_for(lambda: srv.closed == srv.accepted)  # the server sees every connection closed
            assert client.idle_connections == 0 and client.open_connections == 0
            assert await get(client) == (200, b"ok")  # and the pool still works
        finally:
            await client.aclose()


async def test_response_aclose_before_end_closes_the_connection() -> None:
    async def script(peer: Peer) -> None:
        while await peer.read_request():
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
            await peer.drain()

    async with ScriptedServer(script) as srv:
        client = LeanClient(srv.url)
        try:
            resp = await client.request("GET", "/", [], None, timeout=5)
            async for _ in resp.body():
                break
            await resp.aclose()
            await srv.wait_for(lambda: srv.closed == 1)
            assert client.open_connections == 0
            resp = await client.request("GET", "/", [], None, timeout=5)
            await resp.aclose()
        finally:
            await client.aclose()
        assert srv.accepted == 2


async def test_response_aclose_wakes_a_waiting_reader() -> None:
    async def script(peer: Peer) -> None:
        await peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await asyncio.sleep(10)

    async with ScriptedServer(script) as srv:
        client = LeanClient(srv.url)
        try:
            resp = await client.request("GET", "/", [], None, timeout=30)
            reader = asyncio.create_task(read_all(resp))
            await asyncio.sleep(0.05)  # the reader now waits for more body
            await resp.aclose()
            async with asyncio.timeout(5):
                with pytest.raises(UpstreamUnreachable, match="closed"):
                    await reader
        finally:
            await client.aclose()


async def test_aclose_closes_busy_and_idle_connections() -> None:
    async def script(peer: Peer) -> None:
        while (request := await peer.read_request()) is not None:
            if request.target == "/hang":
                await peer.reader.read(1)  # no answer; returns when the client closes
                return
            peer.send(ok())

    async with ScriptedServer(script) as srv:
        client = LeanClient(srv.url)
        assert await get(client) == (200, b"ok")
        hanging = asyncio.create_task(get(client, "/hang"))
        await srv.wait_for(lambda: len(srv.requests) == 2)
        await client.aclose()
        with pytest.raises(UpstreamUnreachable):
            await hanging
        with pytest.raises(UpstreamUnreachable, match="closed"):
            await get(client)
        await srv.wait_for(lambda: srv.closed == srv.accepted)


# -- request framing and streaming --------------------------------------------------------------------------------


async def test_request_framing_as_seen_by_the_server() -> None:
    async with ScriptedServer(respond_each(lambda r: ok())) as srv:
        client = LeanClient(srv.url + "/prefix/")
        try:
            await client.request("GET", "/a?b=1", [(b"X-Id", b"1")], None, timeout=5)
            await client.request(
                "POST", "/len", [(b"Host", b"h"), (b"Content-Length", b"10")], agen(b"hello", b"world"), timeout=5
            )
            await client.request("POST", "/chunked", [(b"Host", b"h")], agen(b"hello", b"", b"world!"), timeout=5)
            await client.request("POST", "/empty", [(b"Host", b"h")], agen(), timeout=5)
            await client.request("PUT", "/zero", [(b"Host", b"h"), (b"content-length", b"0")], agen(), timeout=5)
            await client.request("GET", "/caf\u00e9?q=\u00fc", [(b"Host", b"h")], None, timeout=5)
        finally:
            await client.aclose()
    get_, length, chunked, empty, zero, utf8 = srv.requests
    assert get_.head == b"GET /prefix/a?b=1 HTTP/1.1\r\nX-Id: 1\r\nHost: 127.0.0.1:%d\r\n\r\n" % srv.port
    assert length.head == b"POST /prefix/len HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n"
    assert length.raw_body == b"helloworld"
    assert chunked.head == b"POST /prefix/chunked HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert chunked.raw_body == b"5\r\nhello\r\n6\r\nworld!\r\n0\r\n\r\n"
    assert empty.raw_body == b"0\r\n\r\n"
    assert zero.head.endswith(b"content-length: 0\r\n\r\n") and zero.raw_body == b""
    assert utf8.head.startswith("GET /prefix/café?q=ü HTTP/1.1\r\n".encode())  # the proxy's UTF-8 text, as sent
    assert srv.accepted == 1


async def test_a_whole_body_is_framed_by_its_content_length_or_chunked() -> None:
    async with ScriptedServer(respond_each(lambda r: ok())) as srv:
        client = LeanClient(srv.url)
        try:
            await client.request("POST", "/len", [(b"Content-Length", b"10")], b"helloworld", timeout=5)
            await client.request("POST", "/chunked", [], b"hello", timeout=5)
            await client.request("POST", "/empty", [], b"", timeout=5)
            with pytest.raises(ValueError, match="9 bytes under Content-Length 10"):
                await client.request("POST", "/short", [(b"Content-Length", b"10")], b"helloworl", timeout=5)
        finally:
            await client.aclose()
    length, chunked, empty = srv.requests
    assert b"\r\nContent-Length: 10\r\n" in length.head and length.raw_body == b"helloworld"
    assert (
        chunked.head.endswith(b"Transfer-Encoding: chunked\r\n\r\n") and chunked.raw_body == b"5\r\nhello\r\n0\r\n\r\n"
    )
    assert empty.raw_body == b"0\r\n\r\n"
    assert srv.accepted == 1


@pytest.mark.parametrize(
    ("headers", "chunks", "problem"),
    [
        ([(b"Content-Length", b"3")], None, "without a body"),
        ([(b"Content-Length", b"3"), (b"Transfer-Encoding", b"chunked")], [b"abc"], "both"),
        ([(b"Content-Length", b"3")], [b"abcd"], "longer"),
        ([(b"Content-Length", b"3")], [b"ab"], "ended after 2"),
        ([(b"Transfer-Encoding", b"gzip")], [b"ab"], "chunked"),
    ],
)
async def test_inconsistent_request_framing_is_refused(
    headers: list[tuple[bytes, bytes]], chunks: list[bytes] | None, problem: str
) -> None:
    body = None if chunks is None else agen(*chunks)
    async with ScriptedServer(respond_each(lambda r: ok())) as srv:
        client = LeanClient(srv.url)
        try:
            with pytest.raises(ValueError, match=problem):
                await client.request("POST", "/", headers, body, timeout=5)
            assert await get(client) == (200, b"ok")  # the pool is intact
        finally:
            await client.aclose()


async def test_request_body_iterator_error_propagates_and_closes_the_connection() -> None:
    async def failing() -> AsyncIterator[bytes]:
        yield b"part"
        raise RuntimeError("client went away")

    async with ScriptedServer(respond_each(lambda r: ok())) as srv:
        client = LeanClient(srv.url)
        try:
            with pytest.raises(RuntimeError, match="client went away"):
                await client.request("POST", "/", [], failing(), timeout=5)
            await srv.wait_for(lambda: srv.closed == 1)
            assert client.open_connections == 0
        finally:
            await client.aclose()


async def test_large_request_body_streams_with_back_pressure() -> None:
    total = 20 * MB
    produced = 0
    server_waited = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        nonlocal produced
        block = bytes(range(256)) * 256  # 64 KiB
        while produced < total:
            produced += len(block)
            yield block

    async def script(peer: Peer) -> None:
        request = await peer.read_head()
        assert request is not None
        await asyncio.sleep(0.5)  # not reading: the client must stop producing
        server_waited.set()
        stalled_at = produced
        size = await peer.read_body(request, keep=False)
        peer.send(ok(b"%d %d" % (size, stalled_at)))
        await peer.drain()

    async with ScriptedServer(script, rcvbuf=64 * 1024) as srv:
        client = LeanClient(srv.url)
        try:
            resp = await client.request("POST", "/upload", [], body(), timeout=10)
            size, stalled_at = map(int, (await read_all(resp)).split())
        finally:
            await client.aclose()
    assert size == total
    assert stalled_at < total // 2  # the producer waited for the upstream instead of buffering the body


async def test_large_response_body_streams_with_back_pressure() -> None:
    total = 20 * MB
    sent = 0

    async def script(peer: Peer) -> None:
        nonlocal sent
        await peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        block = b"y" * (256 * 1024)
        while sent < total:
            peer.send(block)
            await peer.drain()
            sent += len(block)

    async with ScriptedServer(script) as srv:
        client = LeanClient(srv.url)
        try:
            resp = await client.request("GET", "/download", [], None, timeout=10)
            received = 0
            largest = 0
            async for chunk in resp.body():
                if received == 0:
                    await asyncio.sleep(0.5)  # a slow consumer: the upstream must be held back
                    sent_while_slow = sent
                received += len(chunk)
                largest = max(largest, len(chunk))
            assert received == total
            assert sent_while_slow < total // 2
            assert largest <= 2 * MB  # chunks as they come, never the whole body
        finally:
            await client.aclose()


async def test_upstream_answering_early_stops_the_upload() -> None:
    async def script(peer: Peer) -> None:
        await peer.read_head()
        peer.send(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo big!")
        await peer.drain()
        while await peer.reader.read(1 << 16):  # discard whatever else comes
            pass

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"z" * 65536
            await asyncio.sleep(0)

    async with ScriptedServer(script) as srv:
        client = LeanClient(srv.url)
        try:
            resp = await client.request("POST", "/", [], endless(), timeout=5)
            assert resp.status == 413 and await read_all(resp) == b"too big!"
            await srv.wait_for(lambda: srv.closed == 1)  # half-sent request: the connection is not reused
            assert client.open_connections == 0
        finally:
            await client.aclose()


# -- a real server ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uvicorn_url() -> Iterator[str]:
    with uvicorn_in_thread() as url:
        yield url


async def test_keep_alive_sequence_against_uvicorn(uvicorn_url: str) -> None:
    client = LeanClient(uvicorn_url, max_connections=4)
    try:
        assert await get(client, "/hello") == (200, b"hello")
        resp = await client.request("POST", "/echo", [(b"Content-Length", b"11")], agen(b"hello ", b"world"), timeout=5)
        assert resp.status == 200 and await read_all(resp) == b"hello world"
        resp = await client.request("POST", "/echo", [], agen(b"chunked ", b"body"), timeout=5)
        assert await read_all(resp) == b"chunked body"
        resp = await client.request("GET", "/stream", [], None, timeout=5)
        assert (b"transfer-encoding", b"chunked") in resp.headers
        assert await read_all(resp) == b"".join(b"part %d;" % i for i in range(50))
        resp = await client.request("HEAD", "/hello", [], None, timeout=5)
        assert await read_all(resp) == b""
        assert await get(client, "/hello") == (200, b"hello")
        assert client.open_connections == 1  # every exchange above reused the same connection
        results = await asyncio.gather(*(get(client, "/hello") for _ in range(20)))
        assert results == [(200, b"hello")] * 20
        assert client.open_connections <= 4
    finally:
        await client.aclose()
