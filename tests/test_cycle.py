"""flowgate serve's request cycle (gateway/cycle.py) on a real socket: framing, pipelining, 100-continue, app errors
and the access log, as uvicorn's own cycle does them."""

from __future__ import annotations

import asyncio
import logging
import re

import pytest

from gateway.config import Settings
from gateway.inbox import BODY_EXTENSION
from gateway.types import Receive, Scope, Send
from tests.live import serving
from tests.proxy_harness import response_complete
from tests.uvicorn_thread import read_body


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """/body: echoes the body (Content-Length); /chunked: no Content-Length; /fail: raises; /late-fail: raises after
    the response head; /empty: returns without answering; /take: echoes the body as the flowgate.body extension
    or receive() gave it."""
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/fail":
        raise RuntimeError("the app failed")
    if path == "/empty":
        return
    if path == "/take":  # the whole body through the flowgate.body extension, or (not all there yet) receive()
        taken = scope["extensions"][BODY_EXTENSION]["take"]()
        body = b"taken:" + taken if taken is not None else b"received:" + await read_body(receive)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})
        return
    body = await read_body(receive)
    if path == "/chunked":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-kind", b"chunked")]})
        for part in (b"one,", b"two"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    if path == "/late-fail":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"10")]})
        raise RuntimeError("failed after the head")
    answer = path.encode() + b":" + body
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(answer))]})
    await send({"type": "http.response.body", "body": answer})


async def talk(port: int, data: bytes, *, until_closed: bool = False, responses: int = 1) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        received = b""
        async with asyncio.timeout(5):
            while True:
                piece = await reader.read(65536)
                received += piece
                if not piece or (not until_closed and received.count(b"HTTP/1.1 ") >= responses and done(received)):
                    return received
    finally:
        writer.close()


def done(data: bytes) -> bool:
    """The last response in `data` is complete (Content-Length or chunked)."""
    last = data[data.rfind(b"HTTP/1.1 ") :]
    if b"\r\ntransfer-encoding: chunked\r\n" in last.partition(b"\r\n\r\n")[0] + b"\r\n":
        return last.endswith(b"\r\n0\r\n\r\n")
    return response_complete(last)


@pytest.fixture
async def port() -> object:
    async with serving(app, role="proxy") as url:
        yield int(url.rsplit(":", 1)[1])


async def test_pipelined_requests_are_answered_in_order(port: int) -> None:
    requests = b"".join(b"POST /%d HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\n%d" % (i, i) for i in range(3))
    data = await talk(port, requests, responses=3)
    assert re.findall(rb"/\d:\d", data) == [b"/0:0", b"/1:1", b"/2:2"]


async def test_expect_100_continue_is_answered_when_the_app_reads(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /body HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    async with asyncio.timeout(5):
        interim = await reader.readuntil(b"\r\n\r\n")
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert await reader.readexactly(11) == b"/body:hello"
    writer.close()


async def test_a_response_without_length_is_chunked_and_head_has_no_body(port: int) -> None:
    data = await talk(port, b"GET /chunked HTTP/1.1\r\nHost: a\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head
    assert body == b"4\r\none,\r\n3\r\ntwo\r\n0\r\n\r\n"
    data = await talk(port, b"HEAD /chunked HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", until_closed=True)
    assert data.endswith(b"\r\n\r\n") and b"transfer-encoding" not in data  # a head alone, as uvicorn answers HEAD


async def test_app_errors_are_a_500_or_a_cut_connection(port: int) -> None:
    for path in (b"/fail", b"/empty"):
        data = await talk(port, b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % path, until_closed=True)
        assert data.startswith(b"HTTP/1.1 500 ") and data.endswith(b"Internal Server Error")
    data = await talk(port, b"GET /late-fail HTTP/1.1\r\nHost: a\r\n\r\n", until_closed=True)
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"\r\n\r\n")  # the head, then the connection ends


async def test_access_log_line(caplog: pytest.LogCaptureFixture) -> None:
    async with serving(app, Settings(log_level="info", access_log=True), role="proxy") as url:
        with caplog.at_level(logging.INFO, logger="uvicorn.access"):
            await talk(int(url.rsplit(":", 1)[1]), b"GET /body?x=1 HTTP/1.1\r\nHost: a\r\n\r\n")
    lines = [record.getMessage() for record in caplog.records if record.name == "uvicorn.access"]
    assert len(lines) == 1
    assert lines[0].startswith("127.0.0.1:") and lines[0].endswith(' - "GET /body?x=1 HTTP/1.1" 200')


async def test_the_admin_port_still_checks_response_headers() -> None:
    async def bad(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-split", b"a\r\nx-evil: 1")]})
        await send({"type": "http.response.body", "body": b""})

    async with serving(bad, role="admin") as url:
        data = await talk(int(url.rsplit(":", 1)[1]), b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", until_closed=True)
    assert data == b""  # as uvicorn does: the head is refused, the connection cut; nothing reaches the client


async def test_a_body_that_came_with_the_head_is_taken_whole_else_received(port: int) -> None:
    whole = await talk(port, b"POST /take HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
    assert whole.endswith(b"\r\n\r\ntaken:hello")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        # the body comes only once the app reads it (100-continue): take() finds none of it
        writer.write(b"POST /take HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        async with asyncio.timeout(5):
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"hello")
            answer = await reader.readuntil(b"received:hello")
        assert answer.startswith(b"HTTP/1.1 200 ")
    finally:
        writer.close()
