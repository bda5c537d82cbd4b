"""The lean client's response: status, headers, and the body as the connection delivers it.

`Connection` (lean_conn.py) appends body chunks to `_chunks`, sets `_done` or `_error` and calls `_wake()`; the two
classes are one unit split for size, and share these private fields. The consumer drains every buffered chunk at
once (joined), which also resumes the connection's reading if it paused at `HIGH_WATER`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from gateway.errors import DeliveryError, UpstreamTimeout, UpstreamUnreachable
from gateway.upstream.base import Headers

if TYPE_CHECKING:
    from gateway.upstream.lean_conn import Connection

HIGH_WATER = 256 * 1024  # buffered response bytes above which the connection stops reading


class LeanResponse:
    __slots__ = (
        *("_chunks", "_conn", "_done", "_error", "_size", "_timeout", "_waiter"),
        *("headers", "reason", "sink", "status", "trailers"),
    )

    def __init__(self, status: int, reason: bytes, headers: Headers, conn: Connection, timeout: float) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.trailers: Headers = []  # chunked trailer fields, complete once body() has ended
        self._conn: Connection | None = conn  # None once the exchange is over
        self._chunks: list[bytes] = []
        self._size = 0
        self._done = False
        self._error: DeliveryError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.sink: Callable[[], object] | None = None  # a relayed exchange's callback (Connection.relay)
        self._timeout = timeout

    @property
    def complete(self) -> bool:
        return self._done and not self._chunks and self._error is None

    @property
    def ended(self) -> bool:
        """The body has all arrived (some of it may still wait in the buffer)."""
        return self._done

    @property
    def failure(self) -> DeliveryError | None:
        """Why the body cannot be read to its end, if it cannot."""
        return self._error

    @property
    def connection(self) -> Connection | None:
        """The connection of the exchange while it lasts."""
        return self._conn

    def take(self) -> bytes:
        """Every buffered body byte, joined (b"" when none); the connection reads again if it paused for them."""
        chunks = self._chunks
        if not chunks:
            return b""
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._size = 0
        conn = self._conn
        if conn is not None and conn.read_paused:
            conn.resume_reading()
        return data

    def body(self) -> AsyncIterator[bytes]:
        # the response is its own iterator: no async generator (asyncio tracks each one in a WeakSet)
        return self

    def __aiter__(self) -> LeanResponse:
        return self

    async def __anext__(self) -> bytes:
        while True:
            if self._chunks:
                return self.take()
            if self._error is not None:
                raise self._error
            if self._done:
                raise StopAsyncIteration
            conn = self._conn
            assert conn is not None  # not done and no error: the exchange is live
            loop = conn.loop
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiter = waiter
            timer = loop.call_later(self._timeout, self._stalled)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None

    def _wake(self) -> None:
        sink = self.sink
        if sink is not None:
            sink()
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _stalled(self) -> None:
        waiter = self._waiter
        conn = self._conn
        if waiter is not None and not waiter.done() and conn is not None:  # else: woken just before the timer fired
            conn.fail(UpstreamTimeout(f"upstream {conn.pool.authority} response body stalled for {self._timeout:g} s"))

    async def aclose(self) -> None:
        if not self._done and self._error is None:
            self._error = UpstreamUnreachable("response closed before its body was read")
            self._wake()  # a reader waiting elsewhere sees the error
            conn = self._conn
            if conn is not None:
                conn.abort()
        self._chunks.clear()
