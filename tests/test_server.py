"""The server's own answers to bad request heads (BAD_INPUTS 1, 5-8) and the slow-head guard, on a real socket."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from gateway.config import Settings
from gateway.server import MAX_HEADER_BYTES, MAX_TARGET, LimitedHttpToolsProtocol, bind_socket, make_server
from gateway.types import Receive, Scope, Send
from tests.live import serving
from tests.proxy_harness import response_complete


async def echo_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    assert scope["type"] == "http"
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    payload = json.dumps({"path": scope["path"], "headers": len(scope["headers"]), "body": len(body)}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(payload))]})
    await send({"type": "http.response.body", "body": payload})


@pytest.fixture
async def port() -> AsyncIterator[int]:
    async with serving(echo_app, role="proxy") as url:
        yield int(url.rsplit(":", 1)[1])


async def exchange(port: int, *chunks: bytes, pause: float = 0.0) -> tuple[int, bytes, bool]:
    """Send `chunks`, read until the server closes (or 5 s); return (status, body, closed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for chunk in chunks:
            if reader.at_eof() or writer.is_closing():
                break
            try:
                writer.write(chunk)
                await writer.drain()
            except ConnectionError:
                break  # the server refused the request and closed: read its answer
            if pause:
                await asyncio.sleep(pause)
        data = b""
        closed = False
        try:
            async with asyncio.timeout(5):
                while True:
                    piece = await reader.read(65536)
                    if not piece:
                        closed = True
                        break
                    data += piece
                    if response_complete(data):
                        try:
                            closed = await asyncio.wait_for(reader.read(1), 0.5) == b""
                        except TimeoutError:
                            closed = False
                        break
        except TimeoutError:
            pass
        except ConnectionError:
            closed = True
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1]) if head else 0
        return status, body, closed
    finally:
        writer.close()


def error_code(body: bytes) -> str:
    payload = json.loads(body)
    assert set(payload) == {"error", "message"}
    return str(payload["error"])


async def test_a_normal_request_passes(port: int) -> None:
    status, body, _ = await exchange(port, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status == 200
    assert json.loads(body)["path"] == "/x"


async def test_header_block_over_16k_is_431(port: int) -> None:
    headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(20))
    status, body, closed = await exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\n" + headers + b"\r\n")
    assert (status, error_code(body), closed) == (431, "headers_too_large", True)

    just_under = b"X-A: " + b"v" * (MAX_HEADER_BYTES - 200) + b"\r\n"
    status, _, _ = await exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\n" + just_under + b"\r\n")
    assert status == 200


async def test_more_than_100_fields_is_431(port: int) -> None:
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(101))
    status, body, _ = await exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\n" + headers + b"\r\n")
    assert (status, error_code(body)) == (431, "headers_too_large")
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(99))
    status, _, _ = await exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\n" + headers + b"\r\n")
    assert status == 200


async def test_an_unfinished_giant_header_is_cut_off(port: int) -> None:
    pieces = [b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: "] + [b"v" * 4096] * 12  # never ends its line
    status, body, closed = await exchange(port, *pieces, pause=0.01)
    assert (status, error_code(body), closed) == (431, "headers_too_large", True)


async def test_target_over_8k_is_414(port: int) -> None:
    status, body, closed = await exchange(port, b"GET /" + b"a" * MAX_TARGET + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (status, error_code(body), closed) == (414, "uri_too_long", True)
    status, _, _ = await exchange(port, b"GET /" + b"a" * (MAX_TARGET - 100) + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status == 200


async def test_http11_without_host_is_400(port: int) -> None:
    status, body, closed = await exchange(port, b"GET / HTTP/1.1\r\nX-A: b\r\n\r\n")
    assert (status, error_code(body), closed) == (400, "missing_host", True)
    status, _, _ = await exchange(port, b"GET / HTTP/1.0\r\n\r\n")
    assert status == 200


@pytest.mark.parametrize("value", [b"a\x00b", b"a\rb", b"a\nb", b"a\x01b"])
async def test_control_characters_in_header_values_are_400(port: int, value: bytes) -> None:
    status, body, closed = await exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\nX-A: " + value + b"\r\n\r\n")
    assert (status, error_code(body), closed) == (400, "bad_request", True)


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
        b"Content-Length: 3\r\nContent-Length: 4\r\n",
        b"Content-Length: -1\r\n",
        b"Content-Length: abc\r\n",
    ],
)
async def test_conflicting_or_malformed_framing_is_400(port: int, framing: bytes) -> None:
    request = b"POST / HTTP/1.1\r\nHost: a\r\n" + framing + b"\r\n3\r\nabc\r\n0\r\n\r\n"
    status, body, closed = await exchange(port, request)
    assert (status, error_code(body), closed) == (400, "bad_request", True)


async def test_connect_is_405(port: int) -> None:
    request = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
    status, body, closed = await exchange(port, request)
    assert (status, error_code(body), closed) == (405, "method_not_allowed", True)


async def test_slow_head_gets_408(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(LimitedHttpToolsProtocol, "head_timeout", 0.3)
    async with serving(echo_app, role="proxy") as url:
        port = int(url.rsplit(":", 1)[1])
        status, body, closed = await exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\n")  # never finishes
        assert (status, error_code(body), closed) == (408, "request_timeout", True)
        status, body, closed = await exchange(port)  # connects, says nothing
        assert (status, error_code(body), closed) == (408, "request_timeout", True)
        # a slow response is not a slow head: the timer is off while the app works
        status, _, _ = await exchange(port, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n", b"ab")
        assert status == 200


async def test_a_failed_app_startup_is_a_clean_error() -> None:
    async def failing(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "no upstream client"})

    sock = bind_socket("127.0.0.1", 0)
    server = make_server(failing, Settings(log_level="critical"), "proxy")
    with pytest.raises(RuntimeError, match="the app's startup failed"):
        await server.start(sock)
    sock.close()


async def test_an_idle_keep_alive_connection_is_closed_after_its_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gateway.server.ADMIN_KEEP_ALIVE", 0.3)
    async with serving(echo_app) as url:
        reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
        started = asyncio.get_running_loop().time()
        for _ in range(3):  # each request moves the idle deadline on
            writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            data = b""
            while not response_complete(data):
                data += await reader.read(65536)
            assert data.startswith(b"HTTP/1.1 200 ")
            await asyncio.sleep(0.2)
        async with asyncio.timeout(2):
            assert await reader.read(1) == b""  # closed by the server
        assert asyncio.get_running_loop().time() - started >= 0.4 + 0.3 - 0.05  # the last request came at 0.4 s
        writer.close()
