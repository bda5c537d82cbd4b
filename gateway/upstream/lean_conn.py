"""One upstream HTTP/1.1 connection: an asyncio.Protocol feeding httptools, writing requests, filling responses.

An exchange: `Connection.exchange` writes the request (head, then the body with flow control), waits for the
response head, and returns a `LeanResponse`; the parser callbacks fill the response's chunk list and the consumer
drains it through `body()`. Reading pauses while more than `HIGH_WATER` bytes wait for the consumer. When the response
ends (`on_message_complete`, or EOF for a read-until-close body), the connection goes back to the pool if the exchange
ended cleanly, else it is closed. Errors are recorded once (`_error`) and every waiter is woken to see it: waiters are
always resolved with a value, never an exception, so no exception is ever left unretrieved.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Callable
from typing import TYPE_CHECKING, cast

from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade, HttpResponseParser

from gateway.errors import DeliveryError, UpstreamTimeout, UpstreamUnreachable
from gateway.upstream.base import Headers
from gateway.upstream.lean_response import HIGH_WATER, LeanResponse

if TYPE_CHECKING:
    from gateway.upstream.lean_pool import Pool

MAX_HEAD = 64 * 1024  # response status line + headers (interim responses included)


class _StopParsing(Exception):
    """Raised from on_headers_complete to stop the parser (after a HEAD response's head, or an oversized head)."""


class Connection(asyncio.Protocol):
    def __init__(self, pool: Pool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = HttpResponseParser(self)
        self.closed = False  # transport gone
        self.closing = False  # close() called
        self.counted = False  # holds a pool slot
        self.idle = False  # on the pool's idle stack
        self.idle_since = 0.0
        self.exchanges = 0  # exchanges started on this connection
        self.read_paused = False
        self.lost_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        # per exchange
        self._active = False
        self._error: DeliveryError | None = None
        self._waiter: asyncio.Future[LeanResponse | None] | None = None
        self._resp: LeanResponse | None = None
        self._reason = b""
        self._headers: Headers = []
        self._head_size = 0
        self._headers_done = False
        self._interim = False
        self._complete = False
        self._keep_alive = False
        self._req_done = False
        self._is_head = False
        self._tail = b""  # last bytes received, kept for HEAD exchanges only
        self._tunnel = False
        self._got_bytes = False
        self._timeout = 0.0
        self._sink: Callable[[], object] | None = None  # a relayed exchange's progress callback (see `relay`)

    # -- the exchange, driven by LeanClient.request ------------------------------------------------------------

    @property
    def retryable(self) -> bool:
        """The exchange failed on a reused connection before any response byte: safe to re-send a bodiless request."""
        return self.exchanges > 1 and not self._got_bytes and isinstance(self._error, UpstreamUnreachable)

    async def exchange(
        self, head: bytes, body: AsyncIterable[bytes] | None, length: int, timeout: float, is_head: bool
    ) -> LeanResponse:
        """Send one request and return the response once its head arrived. `length` < 0: chunked body."""
        seq = self._begin(timeout, is_head, None)
        transport = self.transport
        assert transport is not None
        try:
            if body is None:
                transport.write(head)
                self._req_done = True
            else:
                self._req_done = False
                await self._send_body(transport, head, body, length, timeout)
            resp = self._resp
            if resp is None and self._error is None:
                waiter: asyncio.Future[LeanResponse | None] = self.loop.create_future()
                self._waiter = waiter
                deadlines = self.pool.head_deadlines
                deadlines.set(self, self.loop.time() + timeout)
                try:
                    resp = await waiter
                finally:
                    deadlines.drop(self)
                    if self._waiter is waiter:  # else the connection already serves the next exchange
                        self._waiter = None
        except BaseException:
            if self._active and self.exchanges == seq:
                self.fail(UpstreamUnreachable("request abandoned"))
            raise
        if resp is None:
            assert self._error is not None
            raise self._error
        return resp

    def relay(self, request: bytes, timeout: float, is_head: bool, sink: Callable[[], object]) -> None:
        """Send a whole request (head and body in `request`) and drive the exchange by callbacks, with no waiting
        coroutine: `sink()` is called each time it moves (response head, body bytes, its end, an error, the
        connection lost) and reads the state: `error`, or `response` (then its `take()`, `ended`, `failure`).
        The response head must come within `timeout`; afterwards the consumer keeps a stall deadline itself."""
        self._begin(timeout, is_head, sink)
        self._req_done = True
        assert self.transport is not None
        self.transport.write(request)
        self.pool.head_deadlines.set(self, self.loop.time() + timeout)

    @property
    def response(self) -> LeanResponse | None:
        return self._resp

    @property
    def error(self) -> DeliveryError | None:
        return self._error

    def _begin(self, timeout: float, is_head: bool, sink: Callable[[], object] | None) -> int:
        """Reset the per-exchange state; returns the exchange's number on this connection."""
        self.exchanges += 1
        self._active = True
        self._complete = False
        self._headers_done = False
        self._got_bytes = False
        self._head_size = 0
        self._reason = b""
        self._headers = []
        self._resp = None
        self._is_head = is_head
        self._tail = b""
        self._timeout = timeout
        self._sink = sink
        return self.exchanges

    async def _send_body(
        self, transport: asyncio.Transport, head: bytes, body: AsyncIterable[bytes], length: int, timeout: float
    ) -> None:
        chunked = length < 0
        sent = 0
        first = True
        async for chunk in body:
            if not chunk:
                continue
            if self._stopped():
                return  # failed, or answered early: stop sending; the connection will not be reused
            size = len(chunk)
            if chunked:
                parts = [b"%x\r\n" % size, chunk, b"\r\n"]
            else:
                sent += size
                if sent > length:
                    raise ValueError(f"request body is longer than its Content-Length ({length})")
                parts = [chunk]
            if first:
                parts.insert(0, head)
                first = False
            transport.writelines(parts)
            if sent == length:  # Content-Length reached: done, without advancing the iterator further
                self._req_done = True
                return
            if self._write_paused:
                await self._drain(timeout)
                if self._stopped():
                    return
        if self._stopped():
            return
        if chunked:
            transport.writelines([head, b"0\r\n\r\n"] if first else [b"0\r\n\r\n"])
        elif sent < length:
            raise ValueError(f"request body ended after {sent} of its Content-Length {length} bytes")
        elif first:
            transport.write(head)  # Content-Length: 0
        self._req_done = True

    def _stopped(self) -> bool:
        """The exchange failed or was answered while the body was being sent. A method, not an expression: the
        checks above must not inherit mypy's narrowing across an `await` (mypyc would trust it)."""
        return self._error is not None or self._resp is not None

    async def _drain(self, timeout: float) -> None:
        waiter: asyncio.Future[LeanResponse | None] = self.loop.create_future()
        self._waiter = waiter
        timer = self.loop.call_later(timeout, self._write_timeout, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            if self._waiter is waiter:
                self._waiter = None

    def headers_timeout(self) -> None:
        """The response head (or, when relayed, the next body bytes) did not come in time (called by the pool's
        `head_deadlines`)."""
        waiter = self._waiter
        relayed = self._sink is not None and self._active
        if (waiter is not None and not waiter.done()) or (relayed and self._resp is None):
            self.fail(UpstreamTimeout(f"no response from upstream {self.pool.authority} within {self._timeout:g} s"))
        elif relayed:
            self.fail(UpstreamTimeout(f"upstream {self.pool.authority} response body stalled for {self._timeout:g} s"))

    def _write_timeout(self, waiter: asyncio.Future[LeanResponse | None]) -> None:
        if not waiter.done():
            self.fail(
                UpstreamTimeout(f"upstream {self.pool.authority} stopped reading the request for {self._timeout:g} s")
            )

    def fail(self, error: DeliveryError) -> None:
        """End the exchange with `error` (first one wins) and drop the connection."""
        if self._error is None:
            self._error = error
        if self._sink is not None:
            self.pool.head_deadlines.drop(self)
        self._wake()
        resp = self._resp
        if resp is not None and not resp._done:
            if resp._error is None:
                resp._error = self._error
            resp._wake()
        self._sink = None
        self.abort()

    def _wake(self) -> None:
        sink = self._sink
        if sink is not None:
            sink()
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(self._resp)

    def _end_exchange(self) -> None:
        """The response is complete: pool the connection if the exchange ended cleanly, else close it."""
        resp = self._resp
        assert resp is not None
        if self._sink is not None:
            self.pool.head_deadlines.drop(self)  # a relayed exchange's deadline (an awaited one drops its own)
        resp._done = True
        resp._conn = None
        resp._wake()
        self._sink = None
        self._active = False
        if self._keep_alive and self._req_done and not self.closing:
            if self.read_paused:
                self.resume_reading()
            self.pool.release(self)
        elif self._req_done:
            self.close()
        else:
            self.abort()  # answered before the request was fully sent: unsent bytes would hold the socket open

    def close(self) -> None:
        """Close after flushing what is buffered (nothing is, after a complete exchange)."""
        if not self.closing:
            self.closing = True
            transport = self.transport
            if transport is not None:
                transport.close()

    def abort(self) -> None:
        """Close now, dropping unsent bytes: a failed upstream may never read them."""
        transport = self.transport
        if transport is not None and not self.closed:
            self.closing = True
            transport.abort()

    def resume_reading(self) -> None:
        self.read_paused = False
        if self.transport is not None and not self.closing:
            self.transport.resume_reading()

    def closing_waiter(self) -> asyncio.Future[None]:
        waiter = self.lost_waiter = self.loop.create_future()
        if self.closed:
            waiter.set_result(None)
        return waiter

    # -- asyncio.Protocol ----------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self._active:
            self.close()  # bytes nobody asked for: the connection is not trustworthy any more
            return
        self._got_bytes = True
        if self._tunnel:
            self._on_tunnel(data)
            return
        if not self._headers_done:
            self._head_size += len(data)  # an upper bound of the head's size; exact only when it matters
            if self._is_head:
                self._tail = (self._tail + data[-4:])[-4:]
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:  # 101: what follows the head is another protocol, relayed as the body
            self._tunnel = True
            self._keep_alive = False
            rest = data[exc.args[0] :]
            if rest:
                self._on_tunnel(rest)
            return
        except HttpParserError as exc:
            if not self._complete:
                self.fail(UpstreamUnreachable(f"malformed response from upstream {self.pool.authority}: {exc}"))
                return
            if isinstance(exc, HttpParserCallbackError) and isinstance(exc.__context__, _StopParsing):
                # HEAD: the parser stopped after the head (it cannot skip the announced body): start a fresh one
                self.parser = HttpResponseParser(self)
                if self._tail != b"\r\n\r\n":
                    self._keep_alive = False  # bytes after the head of a HEAD response: do not trust the connection
            else:
                self._keep_alive = False  # garbage after a complete response
        if self._complete:
            self._end_exchange()
            return
        resp = self._resp
        if resp is None:
            if self._head_size > MAX_HEAD:
                message = f"upstream {self.pool.authority} response head exceeds {MAX_HEAD} bytes"
                self.fail(UpstreamUnreachable(message))
            return
        resp._wake()
        if resp._size > HIGH_WATER and not self.read_paused:
            self.read_paused = True
            assert self.transport is not None
            self.transport.pause_reading()

    def _on_tunnel(self, data: bytes) -> None:
        resp = self._resp
        assert resp is not None
        resp._chunks.append(data)
        resp._size += len(data)
        resp._wake()
        if resp._size > HIGH_WATER and not self.read_paused:
            self.read_paused = True
            assert self.transport is not None
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        return None  # close; connection_lost decides whether the response was complete

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.closing = True
        self.transport = None
        self.read_paused = False
        if self._active and not self._complete:
            resp = self._resp
            if resp is None:
                self.fail(UpstreamUnreachable(self._lost_message(exc, "before responding")))
            elif exc is None and (self._tunnel or _reads_until_close(resp.headers)):
                self._complete = True
                self._end_exchange()  # read-until-close body ended cleanly
            else:
                self.fail(UpstreamUnreachable(self._lost_message(exc, "before the response body was complete")))
        elif self._waiter is not None:  # writing a body when the upstream answered early and closed
            self._wake()
        self.pool.lost(self)

    def _lost_message(self, exc: Exception | None, when: str) -> str:
        how = f"reset the connection ({exc})" if exc is not None else "closed the connection"
        return f"upstream {self.pool.authority} {how} {when}"

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake()

    # -- httptools callbacks -------------------------------------------------------------------------------------

    def on_status(self, status: bytes) -> None:
        if self._complete:
            raise ValueError("response bytes after a complete response")
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._headers_done:
            resp = self._resp
            assert resp is not None
            resp.trailers.append((name, value))
        else:
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()
        if status < 200 and status != 101:  # interim response: skip it
            self._interim = True
            self._headers = []
            self._reason = b""
            return
        if self._head_size > MAX_HEAD and _head_size(self._reason, self._headers) > MAX_HEAD:
            self.fail(UpstreamUnreachable(f"upstream {self.pool.authority} response head exceeds {MAX_HEAD} bytes"))
            raise _StopParsing  # stop parsing
        self._headers_done = True
        self._keep_alive = parser.should_keep_alive()
        resp = self._resp = LeanResponse(status, self._reason, self._headers, self, self._timeout)
        resp.sink = self._sink
        if self._sink is None or status == 101:  # a relay hears of the head once the data at hand is parsed
            self._wake()
        if self._is_head:
            self._complete = True
            raise _StopParsing

    def on_body(self, body: bytes) -> None:
        resp = self._resp
        assert resp is not None
        resp._chunks.append(body)
        resp._size += len(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
        elif not self._tunnel and self._resp is not None and self._resp.status != 101:
            self._complete = True


def _head_size(reason: bytes, headers: Headers) -> int:
    """The size of a response head (status line and header lines) as it was on the wire, give or take spaces."""
    return len(reason) + 15 + sum(len(name) + len(value) + 4 for name, value in headers) + 2


def _reads_until_close(headers: Headers) -> bool:
    """True when the response is delimited by the connection's end (no Content-Length, no chunked coding)."""
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"content-length":
            return False
        if lowered == b"transfer-encoding" and value.rstrip().lower().endswith(b"chunked"):
            return False
    return True
